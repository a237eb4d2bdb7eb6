"""Rollout throughput: the project's vLLM engine against Hugging Face ``generate``, same run.

    .venv/bin/python bench/rollout_throughput.py                       # SmolLM2, CPU, fp32, 128 prompts x 128 tokens
    .venv/bin/python bench/rollout_throughput.py --prompts 256 --dtype bfloat16
    .venv/bin/python bench/rollout_throughput.py --dtype bfloat16 --compile --interleave --repeats 3  # make bench

Both engines answer the same Alpaca-templated arithmetic prompts with exactly
``--max-new-tokens`` tokens each (EOS ignored, greedy), so they do the same work.
``--stop-at-eos`` lets each sequence end at its EOS, as rollouts do: both sides still decode
greedily (the same completions, up to numerics, recorded as ``same_completions``), tokens/s
counts the tokens up to EOS, and HF keeps a finished row in its batch until the batch ends
while vLLM drops it. Both run in
this one process with the heap setting a rollout worker makes (freed memory kept for reuse,
:func:`rlhf_ray.workers.group.reuse_freed_memory`: vLLM +12-16 %, HF ``generate`` no change)
and vLLM's KV cache holds the whole batch in whole blocks (no preemption). HF runs in
left-padded batches of ``--hf-batch``; vLLM takes every prompt at once, as a rollout worker
does. The engine decodes with the project's CPU attention kernel
(``rollout.decode_attention``, :mod:`rlhf_ray.workers.decode_attention`);
``--compare-attention`` also times an engine on vLLM's own kernel in the same run, and
``--vllm-attention`` times that one alone. Each side gets one warm-up call first, then ``--repeats`` timed runs; the best of each
side is compared. ``--interleave`` (``make bench``) loads both at once and times them in
turns, one run each per round, so each round's pair meets the same state of a shared
machine; it also records every round's ratio and their median. Prints a table and writes
JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prompts(tokenizer, n: int) -> list[list[int]]:
    from rlhf_ray.config import DataConfig
    from rlhf_ray.driver.prompts import load_prompts

    data = DataConfig(source="arithmetic", format="prompt", template="alpaca", num_rows=2 * n)
    return [p.prompt_ids for p in load_prompts(data, tokenizer, 512, "train")[:n]]


def kv_gib_for(model: str, ids: list[list[int]], new_tokens: int, dtype: str) -> float:
    """The KV cache that holds every sequence of the batch at full length, in whole blocks,
    rounded up to a quarter GiB: the engine sized for its batch, as a rollout worker's
    ``rollout.kv_cache_gib`` should be (too small and vLLM preempts and recomputes sequences
    near the end). Counting tokens rather than blocks undersizes it: 128 sequences of
    40 + 128 tokens hold 256 blocks of 128, not the 168 blocks their tokens fill, and the
    fp32 run used to get 227 blocks and preempt."""
    import math

    from rlhf_ray.workers.engine import CPU_KV_BLOCK, kv_bytes_per_token

    slots = sum(math.ceil((len(p) + new_tokens) / CPU_KV_BLOCK) * CPU_KV_BLOCK for p in ids)
    return math.ceil(kv_bytes_per_token(model, dtype) * slots * 1.1 / 2**30 * 4) / 4


def measure(run) -> tuple[int, float]:
    """One call of ``run()`` (which returns the tokens it generated): (tokens, seconds)."""
    t0 = time.perf_counter()
    tokens = run()
    return tokens, time.perf_counter() - t0


def best_of(runs: list[tuple[int, float]]) -> dict:
    """Every run's tokens/s, and the best, the figure the ratio compares (the same rule on both
    sides; a shared VM's stalls only ever slow a run down)."""
    tokens, seconds = min(runs, key=lambda r: r[1] / r[0])
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "runs_tokens_per_s": [round(t / s, 1) for t, s in runs]}


def timed(run, repeats: int) -> dict:
    """``run()`` ``repeats`` times, summarised by :func:`best_of`."""
    return best_of([measure(run) for _ in range(repeats)])


@contextmanager
def vllm_engine(model: str, ids: list[list[int]], new_tokens: int, dtype: str, kv_gib: float,
                compile: bool = False, stop_at_eos: bool = False, completions: list | None = None,
                decode_attention: bool = True):
    """A warmed-up engine: yields ``(run, info)``, where ``run()`` generates the batch once and
    returns its tokens, and ``info`` the engine's settings. Shut down on exit."""
    from vllm import SamplingParams, TokensPrompt

    from rlhf_ray.workers.engine import make_llm, shutdown_llm

    start = time.perf_counter()
    llm = make_llm(model, dtype=dtype, max_model_len=512, kv_cache_gib=kv_gib, enforce_eager=not compile,
                   decode_attention=decode_attention)
    start_s = time.perf_counter() - start
    try:
        cache = llm.llm_engine.vllm_config.cache_config
        blocks, blocks_needed = cache.num_gpu_blocks, sum(-(-(len(p) + new_tokens) // cache.block_size) for p in ids)
        if blocks is not None and blocks < blocks_needed:
            raise SystemExit(f"--kv-cache-gib {kv_gib}: {blocks} KV blocks of {cache.block_size} "
                             f"tokens, the batch needs {blocks_needed}; vLLM would preempt and recompute")
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens) if stop_at_eos else \
            SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True)
        inputs = [TokensPrompt(prompt_token_ids=p) for p in ids]
        llm.generate(inputs[:2], params, use_tqdm=False)  # warm-up

        def run() -> int:
            outs = [list(o.outputs[0].token_ids) for o in llm.generate(inputs, params, use_tqdm=False)]
            if completions is not None:
                completions[:] = outs
            return sum(map(len, outs))

        yield run, {"kv_cache_gib": kv_gib, "kv_blocks": blocks, "kv_blocks_needed": blocks_needed,
                    "compiled": compile, "decode_attention": llm.rlhf_ray_decode_attention,
                    "engine_start_s": start_s}
    finally:
        shutdown_llm(llm)


def bench_vllm(model: str, ids: list[list[int]], new_tokens: int, dtype: str, kv_gib: float,
               compile: bool = False, repeats: int = 1, stop_at_eos: bool = False,
               completions: list | None = None, decode_attention: bool = True) -> dict:
    with vllm_engine(model, ids, new_tokens, dtype, kv_gib, compile, stop_at_eos, completions,
                     decode_attention) as (run, info):
        return {**timed(run, repeats), **info}


@contextmanager
def hf_model(model: str, ids: list[list[int]], new_tokens: int, dtype: str, batch: int,
             stop_at_eos: bool = False, completions: list | None = None):
    """HF ``generate``, warmed up: yields ``(run, info)`` as :func:`vllm_engine` does."""
    import torch
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
    pad = lm.config.pad_token_id or 0
    eos = lm.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    length = {} if stop_at_eos else {"min_new_tokens": new_tokens}

    def run(chunk: list[list[int]]) -> list[list[int]]:
        width = max(map(len, chunk))
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.inference_mode():
            out = lm.generate(input_ids=input_ids, attention_mask=attention, do_sample=False,
                              max_new_tokens=new_tokens, pad_token_id=pad, **length)
        rows = out[:, width:].tolist()
        if stop_at_eos:  # a finished row is padded to the batch's longest: count up to its EOS
            rows = [row[: next((i + 1 for i, t in enumerate(row) if t in eos), len(row))] for row in rows]
        return rows

    def run_all() -> int:
        outs = [row for i in range(0, len(ids), batch) for row in run(ids[i: i + batch])]
        if completions is not None:
            completions[:] = outs
        return sum(map(len, outs))

    run(ids[:2])  # warm-up
    yield run_all, {"batch": batch}


def bench_hf(model: str, ids: list[list[int]], new_tokens: int, dtype: str, batch: int, repeats: int = 1,
             stop_at_eos: bool = False, completions: list | None = None) -> dict:
    with hf_model(model, ids, new_tokens, dtype, batch, stop_at_eos, completions) as (run, info):
        return {**timed(run, repeats), **info}


def bench_interleaved(vllm_args: dict, hf_args: dict, repeats: int) -> tuple[dict, dict, list[float]]:
    """Both engines loaded at once and timed in turns (vLLM, then HF, ``repeats`` rounds), so
    each round's pair meets the same state of a shared machine. Returns each side's
    :func:`best_of` figures and every round's ratio (vLLM / HF tokens/s)."""
    with vllm_engine(**vllm_args) as (run_vllm, vllm_info), hf_model(**hf_args) as (run_hf, hf_info):
        rounds = [(measure(run_vllm), measure(run_hf)) for _ in range(repeats)]
    vllm_runs, hf_runs = zip(*rounds)
    ratios = [(vt / vs) / (ht / hs) for (vt, vs), (ht, hs) in rounds]
    return {**best_of(list(vllm_runs)), **vllm_info}, {**best_of(list(hf_runs)), **hf_info}, ratios


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="asset name or HF folder")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--hf-batch", type=int, default=128,
                    help="HF generate batch (default: the whole batch, its fastest here: 217 tokens/s at 128 vs 125-144 at 16)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--kv-cache-gib", type=float, default=None,
                    help="vLLM's KV cache (default: enough for the whole batch at full length)")
    ap.add_argument("--compile", action="store_true",
                    help="vLLM with torch.compile (rollout.enforce_eager=false): about 60 s more to start")
    ap.add_argument("--repeats", type=int, default=1,
                    help="timed runs per side; the best of each is compared (all are recorded)")
    ap.add_argument("--stop-at-eos", action="store_true",
                    help="each sequence stops at its EOS (up to --max-new-tokens), as rollouts do: "
                         "tokens/s counts the tokens up to EOS on both sides")
    ap.add_argument("--vllm-attention", action="store_true",
                    help="vLLM's own CPU decode attention instead of rlhf-ray's kernel (rollout.decode_attention=false)")
    ap.add_argument("--compare-attention", action="store_true",
                    help="also time an engine on vLLM's own decode attention, in the same run (the before "
                         "figure; one run with --interleave)")
    ap.add_argument("--interleave", action="store_true",
                    help="load vLLM and HF together and time them in turns, one run each per round "
                         "(--repeats rounds): each pair meets the same state of the machine; records every "
                         "round's ratio and their median")
    ap.add_argument("--skip-hf", action="store_true", help="vLLM only (tuning runs)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "rollout_throughput.json"))
    args = ap.parse_args()

    from rlhf_ray.assets import resolve_model
    from rlhf_ray.data import load_tokenizer
    from rlhf_ray.workers.engine import cpu_env_defaults
    from rlhf_ray.workers.group import reuse_freed_memory

    cpu_env_defaults()
    reuse_freed_memory()
    model = resolve_model(args.model, role="bench model")
    ids = prompts(load_tokenizer(model), args.prompts)
    vllm_outs: list[list[int]] = []
    hf_outs: list[list[int]] = []
    if args.interleave and args.skip_hf:
        raise SystemExit("--interleave times vLLM and HF in turns: it cannot run with --skip-hf")
    result = {
        "model": args.model, "dtype": args.dtype, "prompts": len(ids),
        "max_new_tokens": args.max_new_tokens, "stop_at_eos": args.stop_at_eos,
        "cpus": os.cpu_count(), "machine": platform.machine(), "interleaved": args.interleave,
    }
    kv_gib = args.kv_cache_gib or kv_gib_for(model, ids, args.max_new_tokens, args.dtype)
    vllm_args = dict(model=model, ids=ids, new_tokens=args.max_new_tokens, dtype=args.dtype, kv_gib=kv_gib,
                     compile=args.compile, stop_at_eos=args.stop_at_eos, completions=vllm_outs,
                     decode_attention=not args.vllm_attention)
    if args.interleave:
        hf_args = dict(model=model, ids=ids, new_tokens=args.max_new_tokens, dtype=args.dtype, batch=args.hf_batch,
                       stop_at_eos=args.stop_at_eos, completions=hf_outs)
        result["vllm"], result["hf_generate"], ratios = bench_interleaved(vllm_args, hf_args, args.repeats)
        result["round_ratios"] = [round(r, 3) for r in ratios]
        result["median_round_ratio"] = statistics.median(ratios)
    else:
        result["vllm"] = bench_vllm(repeats=args.repeats, **vllm_args)
    if args.compare_attention and not args.vllm_attention:
        # the before figure: one run with --interleave (whose rounds are the headline), else --repeats
        result["vllm_own_attention"] = bench_vllm(model, ids, args.max_new_tokens, args.dtype, kv_gib, args.compile,
                                                  1 if args.interleave else args.repeats, args.stop_at_eos, None,
                                                  decode_attention=False)
        result["decode_kernel_gain"] = result["vllm"]["tokens_per_s"] / result["vllm_own_attention"]["tokens_per_s"]
    if args.skip_hf:
        print(f"vLLM: {result['vllm']['tokens_per_s']:.1f} tokens/s ({result['vllm']})")
        return 0
    if not args.interleave:
        result["hf_generate"] = bench_hf(model, ids, args.max_new_tokens, args.dtype, args.hf_batch, args.repeats,
                                         args.stop_at_eos, hf_outs)
    result["speedup_vllm_over_hf"] = result["vllm"]["tokens_per_s"] / result["hf_generate"]["tokens_per_s"]
    if "vllm_own_attention" in result:
        result["speedup_vllm_own_attention_over_hf"] = (result["vllm_own_attention"]["tokens_per_s"]
                                                        / result["hf_generate"]["tokens_per_s"])
    # greedy on both sides: the same completions up to numerics (bf16 drifts sooner)
    result["same_completions"] = sum(a == b for a, b in zip(vllm_outs, hf_outs)) / len(ids)
    if args.stop_at_eos:
        result["batch_seconds_ratio"] = result["hf_generate"]["seconds"] / result["vllm"]["seconds"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'engine':<20}{'tokens':>8}{'seconds':>10}{'tokens/s':>11}")
    for name in ("vllm", "vllm_own_attention", "hf_generate"):
        if name not in result:
            continue
        r = result[name]
        print(f"{name:<20}{r['tokens']:>8}{r['seconds']:>10.2f}{r['tokens_per_s']:>11.1f}  runs: {r['runs_tokens_per_s']}")
    if "vllm_own_attention" in result:
        print(f"vLLM on its own decode attention / HF generate: {result['speedup_vllm_own_attention_over_hf']:.2f}x; "
              f"rlhf-ray's decode kernel / vLLM's: {result['decode_kernel_gain']:.2f}x")
    if args.interleave:
        print(f"per round (vLLM / HF, same round): {result['round_ratios']}, median "
              f"{result['median_round_ratio']:.2f}x")
    print(f"vLLM / HF generate: {result['speedup_vllm_over_hf']:.2f}x; identical completions: "
          f"{result['same_completions']:.0%}  -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
