"""The rollout engine's decode attention on a CPU: a kernel of this project in place of vLLM's.

At decode every sequence of the batch adds one token, and each layer's attention reads that
layer's whole KV cache: about 10 MB a layer for 128 sequences of SmolLM2 at ~100 tokens, never
in cache, since the model's KV (30 layers) is far larger than L3. vLLM's CPU kernel computes
and then waits on those loads (about 1 ms a layer on the 2-core VM, 0.5 ms when the same KV is
warm). ``decode_attention.c`` prefetches the next task's K and V rows while it computes the
current one, and shares every row it reads among a KV head's query heads: about 0.5 ms a layer,
cold. Prefill and mixed batches, and any layer setting the kernel does not take (ALiBi, a
sliding window, soft-capping, sinks, a quantised cache, another head size), still run vLLM's.

:func:`install` builds the kernel once per machine (``cc``, AVX-512F), checks it against
vLLM's own kernel on a cache written by vLLM, and only then routes vLLM's CPU attention
through it. Where any step fails it says why and vLLM's kernel stays.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_attention.c")
HEAD_SIZES = (32, 64, 128)
MAX_QUERIES_PER_KV_HEAD = 8
ENV_FLAG = "RLHF_RAY_DECODE_ATTENTION"  # "1": engine processes install the kernel too (vllm_ext)
CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mfma", "-fopenmp", "-shared", "-fPIC"]

active = False  # the patched forward runs the kernel only while this is set (use(False) clears it)
calls = 0  # layers whose attention this process's kernel computed (tests and the engine summary read it)
_lib: ctypes.CDLL | None = None
_installed: str | None = None  # None: not tried; "" installed; else why not


CPU_FLAGS = {"avx512f", "avx512bw", "avx512dq", "avx512vl", "fma"}  # what CFLAGS compile for


def cpu_flags() -> set[str]:
    """This CPU's feature flags (``/proc/cpuinfo``; empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def compiler() -> str | None:
    """The C compiler the kernel is built with: ``CC``, else ``cc`` or ``gcc`` on PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def unavailable() -> str | None:
    """Why this machine cannot run the kernel (no C compiler, a CPU without the flags it is
    compiled for), found without building it; None where it can try."""
    cc = compiler()
    if not cc:
        return "no C compiler (cc or gcc on PATH, or CC)"
    if not shutil.which(cc):
        return f"C compiler {cc} not found"
    missing = sorted(CPU_FLAGS - cpu_flags())
    return f"this CPU lacks {', '.join(missing)} (the kernel is built for AVX-512)" if missing else None


def cache_dir() -> Path:
    """Where built kernels are kept: ``RLHF_RAY_KERNEL_CACHE``, else ``~/.cache/rlhf_ray/kernels``."""
    return Path(os.environ.get("RLHF_RAY_KERNEL_CACHE") or Path.home() / ".cache" / "rlhf_ray" / "kernels")


def build() -> Path:
    """Compile ``decode_attention.c`` (once: the library is named by a hash of the source, the
    flags and the compiler) against torch's OpenMP runtime, so the kernel's threads are the
    ones torch already runs. Raises ``RuntimeError`` naming what failed."""
    import torch

    cc = compiler()
    if not cc:
        raise RuntimeError("no C compiler (cc or gcc on PATH, or CC)")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"C compiler {cc} does not run: {e}") from e
    torch_lib = Path(torch.__file__).parent / "lib"
    flags = CFLAGS + [f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}"]
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode() + version.encode()).hexdigest()[:16]
    out = cache_dir() / f"decode_attention-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")  # several workers may build at once: rename is atomic
    try:
        proc = subprocess.run([cc, *flags, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True, timeout=300)
        if proc.returncode:
            raise RuntimeError(f"{cc} failed on {SOURCE.name}: {(proc.stderr or proc.stdout).strip()[-800:]}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    for stale in out.parent.glob("decode_attention-*.so"):  # builds of earlier sources or compilers
        if stale != out:
            stale.unlink(missing_ok=True)  # a process that has one loaded keeps its mapping
    return out


def library() -> ctypes.CDLL:
    """The built kernel, loaded once per process. Raises ``RuntimeError`` where this CPU or
    machine cannot run it."""
    global _lib
    if _lib is None:
        missing = sorted(CPU_FLAGS - cpu_flags())
        if missing:
            raise RuntimeError(f"this CPU lacks {', '.join(missing)} (the kernel is built for AVX-512)")
        lib = ctypes.CDLL(str(build()))
        f = lib.rlhf_decode_attention
        i64, i32, vp = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
        f.argtypes = [vp, i64, vp, i64, vp, i64, i64, i32, vp, i64, vp, i32, i32, i32, i32, ctypes.c_float, i32]
        f.restype = i32
        _lib = lib
    return _lib


def takes(query, kv_cache) -> bool:
    """Whether the kernel takes these tensors' shapes and layout (else vLLM's kernel runs).

    ``query``: (tokens, num_heads, head_size), heads contiguous in a row; ``kv_cache``: one
    layer's cache, (num_blocks, num_kv_heads, block_size, 2 * head_size), rows contiguous."""
    import torch

    if query.dtype not in (torch.bfloat16, torch.float32) or kv_cache.dtype != query.dtype:
        return False
    _, heads, head_size = query.shape
    kv_heads = kv_cache.shape[1]
    return (head_size in HEAD_SIZES and heads % kv_heads == 0 and heads // kv_heads <= MAX_QUERIES_PER_KV_HEAD
            and kv_cache.shape[2] % 32 == 0 and kv_cache.shape[3] == 2 * head_size
            and query.stride(2) == 1 and query.stride(1) == head_size
            and kv_cache.stride(3) == 1 and kv_cache.stride(2) == 2 * head_size)


def decode_attention(query, kv_cache, block_table, seq_lens, scale: float, output) -> None:
    """Attention of one query token per sequence over its first ``seq_lens[i]`` cached tokens.

    - ``query``: (num_seqs, num_heads, head_size), bf16 or fp32;
    - ``kv_cache``: the layer's cache, (num_blocks, num_kv_heads, block_size, 2 * head_size),
      the layout vLLM's CPU attention writes (see ``decode_attention.c``);
    - ``block_table``: (num_seqs, max_blocks) int32, the blocks of each sequence in order;
    - ``seq_lens``: (num_seqs,) int32, tokens each sequence attends to, its new one included;
    - ``output``: (num_seqs, num_heads, head_size) or (num_seqs, num_heads * head_size), written.
    Raises ``ValueError`` for a shape :func:`takes` refuses."""
    global calls
    import torch

    if not takes(query, kv_cache):
        raise ValueError(f"decode_attention: query {tuple(query.shape)} {query.dtype} over a cache "
                         f"{tuple(kv_cache.shape)} {kv_cache.dtype} is not a layout this kernel takes")
    num_seqs, heads, head_size = query.shape
    out = output.view(output.shape[0], heads, head_size)
    assert out.stride(2) == 1 and out.stride(1) == head_size and out.dtype == query.dtype
    assert block_table.dtype == torch.int32 and seq_lens.dtype == torch.int32 and block_table.stride(1) == 1
    assert seq_lens.is_contiguous() and seq_lens.numel() >= num_seqs
    rc = library().rlhf_decode_attention(
        query.data_ptr(), query.stride(0), out.data_ptr(), out.stride(0),
        kv_cache.data_ptr(), kv_cache.stride(0), kv_cache.stride(1), kv_cache.shape[2],
        block_table.data_ptr(), block_table.stride(0), seq_lens.data_ptr(),
        num_seqs, heads, kv_cache.shape[1], head_size, scale, int(query.dtype == torch.bfloat16))
    if rc:
        raise RuntimeError(f"decode_attention: the kernel returned {rc} for query {tuple(query.shape)}")
    calls += 1


def paged_cache(dtype, head_size: int, heads: int, kv_heads: int, seq_lens, seed: int = 0, fill: float = 0.0):
    """A random paged cache written by vLLM's own ``cpu_attn_reshape_and_cache`` (so the
    layout is vLLM's), blocks in shuffled order and ``fill`` in every slot no sequence holds.
    Returns ``(kv_cache, key_cache, value_cache, block_table, key, value, query)``: the cache,
    vLLM's K and V views of it, the int32 block table, the K and V written (tokens of every
    sequence in order) and one query token per sequence."""
    import torch
    from vllm import _custom_ops as ops

    block_size = 128
    gen = torch.Generator().manual_seed(seed)
    per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(per_seq) + 2
    order = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    block_table = torch.zeros(len(seq_lens), max(per_seq) + 1, dtype=torch.int32)  # a spare column
    slots, used = [], 0
    for i, (n, nb) in enumerate(zip(seq_lens, per_seq)):
        block_table[i, :nb] = order[used: used + nb]
        used += nb
        slots += [int(block_table[i, t // block_size]) * block_size + t % block_size for t in range(n)]
    kv_cache = torch.full((num_blocks, kv_heads, block_size, 2 * head_size), fill, dtype=dtype)
    key_cache, value_cache = kv_cache.view(num_blocks, kv_heads, 2 * block_size, head_size).chunk(2, dim=2)
    key = (torch.randn(len(slots), kv_heads, head_size, generator=gen) * 2).to(dtype)
    value = torch.randn(len(slots), kv_heads, head_size, generator=gen).to(dtype)
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, torch.tensor(slots, dtype=torch.int64), "vec")
    query = torch.randn(len(seq_lens), heads, head_size, generator=gen).to(dtype)
    return kv_cache, key_cache, value_cache, block_table, key, value, query


def vllm_decode_attention(query, key_cache, value_cache, block_table, seq_lens, scale: float):
    """vLLM's own CPU decode attention on the same inputs (one query token per sequence)."""
    import torch
    from vllm import _custom_ops as ops

    num_seqs, heads, head_size = query.shape
    starts = torch.arange(num_seqs + 1, dtype=torch.int32)
    meta = ops.cpu_attn_get_scheduler_metadata(num_seqs, heads, key_cache.shape[1], head_size, seq_lens,
                                               query.dtype, starts, True, -1, "vec", False)
    output = torch.empty_like(query)
    ops.cpu_attention_with_kv_cache(query, key_cache, value_cache, output, starts, seq_lens, scale, True, None, -1,
                                    block_table, 0.0, meta, None)
    return output


def check_against_vllm(dtype, seq_lens: tuple[int, ...] = (1, 31, 32, 100, 128, 129, 300)) -> float:
    """Largest difference between this kernel's output and vLLM's CPU kernel's on one
    :func:`paged_cache` (SmolLM2's attention shape: 9 query heads on 3 KV heads of 64)."""
    import torch

    kv_cache, key_cache, value_cache, block_table, _, _, query = paged_cache(dtype, 64, 9, 3, seq_lens)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    theirs = vllm_decode_attention(query, key_cache, value_cache, block_table, lens, 64 ** -0.5)
    ours = torch.empty_like(query)
    decode_attention(query, kv_cache, block_table, lens, 64 ** -0.5, ours)
    return float((ours.float() - theirs.float()).abs().max())


def use(on: bool) -> str:
    """Decode attention by this kernel (``on``, :func:`install`-ing it first) or by vLLM's,
    for engines built from now on in this process and the engine processes it starts.
    Returns "" when the kernel runs, else why vLLM's does ("off" when asked)."""
    global active
    why_not = install() if on else "off"
    active = not why_not
    if active:
        os.environ[ENV_FLAG] = "1"
    else:
        os.environ.pop(ENV_FLAG, None)
    return why_not


def install() -> str:
    """Build, check and patch the kernel into vLLM's CPU attention in this process (it then runs
    while :data:`active`). Returns "" when installed, else the reason vLLM's kernel stays;
    tried once per process."""
    global _installed
    if _installed is not None:
        return _installed
    try:
        import torch

        library()
        # the layout is vLLM's: agree with its kernel, bf16 within its rounding, fp32 closely
        for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float32, 1e-4)):
            err = check_against_vllm(dtype)
            if not err <= tol:
                raise RuntimeError(f"differs from vLLM's kernel by {err:.3g} in {dtype} (tolerance {tol})")
        _patch()
        _installed = ""
    except Exception as e:  # any failure leaves vLLM's kernel in place, and says why
        _installed = f"{type(e).__name__}: {e}"
        log.warning("decode attention: vLLM's CPU kernel stays (%s)", _installed)
    return _installed


def _patch() -> None:
    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    if getattr(CPUAttentionBackendImpl.forward, "rlhf_ray_decode", False):
        return
    vllm_forward = CPUAttentionBackendImpl.forward

    def layer_takes(impl, layer) -> bool:
        """The layer's settings the kernel takes; fixed for the layer, so worked out at its first call
        (once vLLM's metadata builder has set the layer's ``isa``)."""
        ok = getattr(impl, "_rlhf_ray_decode_ok", None)
        if ok is None:
            ok = impl._rlhf_ray_decode_ok = (
                impl.attn_type == AttentionType.DECODER and impl.alibi_slopes is None
                and impl.sliding_window == -1 and not impl.logits_soft_cap and impl.sinks is None
                and impl.kv_cache_dtype == "auto" and getattr(layer, "isa", None) == "vec")
        return ok

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        m = attn_metadata
        if (active and m is not None and m.max_query_len == 1 and m.num_actual_tokens == m.seq_lens.shape[0]
                and m.dynamic_causal is None and m.encoder_cache is None and output_scale is None
                and output_block_scale is None and layer_takes(self, layer) and takes(query, kv_cache)):
            n = m.num_actual_tokens
            decode_attention(query[:n], kv_cache, m.block_table, m.seq_lens, self.scale, output[:n])
            return output
        return vllm_forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                            output_scale, output_block_scale)

    forward.rlhf_ray_decode = True
    CPUAttentionBackendImpl.forward = forward
