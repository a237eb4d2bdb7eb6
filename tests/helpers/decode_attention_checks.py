"""Checks of ``rlhf_ray.workers.decode_attention``, run in a subprocess (vLLM stays out of
pytest); prints one JSON line.

    python decode_attention_checks.py kernel            # outputs against vLLM's kernel and fp64
    python decode_attention_checks.py engine MODEL_DIR  # a tiny engine's greedy decode, kernel on and off
"""

from __future__ import annotations

import json
import sys


def kernel() -> dict:
    import torch

    from rlhf_ray.workers import decode_attention as da

    seq_lens = [1, 2, 31, 32, 33, 100, 127, 128, 129, 256, 300, 517]
    cases = []
    for dtype in (torch.bfloat16, torch.float32):
        for head_size, heads, kv_heads in ((64, 9, 3), (32, 2, 2), (128, 8, 1), (64, 16, 2), (32, 4, 4)):
            # unheld slots: a large finite value, which would dominate any softmax it leaked into
            kv_cache, key_cache, value_cache, block_table, key, value, query = da.paged_cache(
                dtype, head_size, heads, kv_heads, seq_lens, seed=len(cases), fill=30.0)
            lens = torch.tensor(seq_lens, dtype=torch.int32)
            scale = head_size ** -0.5
            ours = torch.full((len(seq_lens), heads * head_size), float("nan"), dtype=dtype)  # 2-D, as vLLM's
            da.decode_attention(query, kv_cache, block_table, lens, scale, ours)
            ours = ours.view(len(seq_lens), heads, head_size)
            theirs = da.vllm_decode_attention(query, key_cache, value_cache, block_table, lens, scale)
            # fp64 from the K and V the cache was written from (not read back from it)
            reference = torch.empty(ours.shape, dtype=torch.float64)
            group, at = heads // kv_heads, 0
            for i, n in enumerate(seq_lens):
                k, v = key[at: at + n].double(), value[at: at + n].double()
                at += n
                for h in range(heads):
                    p = torch.softmax(k[:, h // group] @ query[i, h].double() * scale, 0)
                    reference[i, h] = p @ v[:, h // group]
            # and NaN there (vLLM's kernel would return NaN; the kernel never reads past a sequence)
            nan_cache = da.paged_cache(dtype, head_size, heads, kv_heads, seq_lens, seed=len(cases), fill=float("nan"))[0]
            ours_nan = torch.empty_like(query)
            da.decode_attention(query, nan_cache, block_table, lens, scale, ours_nan)
            cases.append({"dtype": str(dtype), "head_size": head_size, "heads": heads, "kv_heads": kv_heads,
                          "nan_filled_vs_clean": float((ours_nan.float() - ours.float()).abs().max()),
                          "vs_vllm": float((ours.float() - theirs.float()).abs().max()),
                          "vs_fp64": float((ours.double() - reference).abs().max()),
                          "vllm_vs_fp64": float((theirs.double() - reference).abs().max())})
    # layouts the kernel refuses, with the reason named
    refused = {}
    kv = torch.zeros(4, 2, 128, 160)
    for name, q, cache in (("head_size_80", torch.zeros(3, 2, 80), kv),
                           ("fp16", torch.zeros(3, 2, 64, dtype=torch.float16), torch.zeros(4, 2, 128, 128, dtype=torch.float16)),
                           ("16_queries_per_kv_head", torch.zeros(3, 32, 64), torch.zeros(4, 2, 128, 128)),
                           ("dtype_mismatch", torch.zeros(3, 2, 64), torch.zeros(4, 2, 128, 128, dtype=torch.bfloat16))):
            try:
                da.decode_attention(q, cache, torch.zeros(3, 1, dtype=torch.int32), torch.ones(3, dtype=torch.int32),
                                    1.0, torch.empty_like(q))
                refused[name] = None
            except ValueError as e:
                refused[name] = str(e)
    return {"cases": cases, "refused": refused, "calls": da.calls}  # calls: 2 per case


def engine(model_dir: str) -> dict:
    import random

    from vllm import SamplingParams, TokensPrompt

    from rlhf_ray.workers import decode_attention as da
    from rlhf_ray.workers.engine import make_llm, shutdown_llm

    rng = random.Random(0)
    prompts = [[rng.randrange(3, 1000) for _ in range(n)] for n in (5, 17, 40, 126, 127, 140, 200, 64)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=0)
    out = {}
    for on in (True, False):
        calls = da.calls
        llm = make_llm(model_dir, dtype="float32", max_model_len=512, decode_attention=on)
        try:
            results = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
            out["on" if on else "off"] = {
                "attention": llm.rlhf_ray_decode_attention,
                "tokens": [list(r.outputs[0].token_ids) for r in results],
                "logprobs": [[next(iter(d.values())).logprob for d in r.outputs[0].logprobs] for r in results],
                "kernel_calls": da.calls - calls}
        finally:
            shutdown_llm(llm)
    return out


if __name__ == "__main__":
    result = kernel() if sys.argv[1] == "kernel" else engine(sys.argv[2])
    print("RESULT " + json.dumps(result))
