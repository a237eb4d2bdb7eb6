"""Learner throughput: a DeepSpeed learner rank against a plain single-process torch loop.

    .venv/bin/python bench/learner_throughput.py                    # SmolLM2-135M fp32, 32 x ~110 tokens
    .venv/bin/python bench/learner_throughput.py --threads 1 --micro-batch 8
    .venv/bin/python bench/learner_throughput.py --bf16 --out bench/results/learner_throughput_bf16.json

Both sides run the same optimizer step on the same batch, in one process, with the same
torch thread count: a forward pass, the response-token cross entropy, a backward pass and an
AdamW step (gradient clipping at 1.0 on both), with gradient accumulation over
``--micro-batch`` sized micro-batches. The learner is ``LearnerWorker`` exactly as the
recipes build it (DeepSpeed ZeRO-0 on gloo, one rank), called in-process rather than as a
Ray actor so that nothing but the learner's own code is timed; the peer is the textbook loop
over the Hugging Face model. Tokens/s counts the real (unpadded) tokens of the batch.
Prints both and the ratio; writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def make_batch(args, vocab: int):
    """``--batch`` rows: a prompt of 30-60 tokens, a response of 16-``--response`` tokens."""
    import torch

    from rlhf_ray.batch import SequenceBatch

    g = torch.Generator().manual_seed(0)
    pairs = []
    for _ in range(args.batch):
        p = int(torch.randint(30, 61, (1,), generator=g))
        r = int(torch.randint(16, args.response + 1, (1,), generator=g))
        ids = torch.randint(10, vocab - 10, (p + r,), generator=g).tolist()
        pairs.append((ids[:p], ids[p:]))
    return SequenceBatch.from_pairs(pairs, pad_id=2)


def bench_learner(model: str, batch, args) -> list[float]:
    import torch

    from rlhf_ray.config import LearnerConfig, OptimConfig
    from rlhf_ray.workers.learner import LearnerWorker

    learner = LearnerWorker(model, LearnerConfig(micro_batch_size=args.micro_batch, threads=args.threads,
                                                 autocast="bfloat16" if args.bf16 else "none"),
                            OptimConfig(lr=1e-6, grad_clip=1.0))
    learner.init()
    assert torch.get_num_threads() == args.threads
    try:
        seconds = []
        for _ in range(args.steps + 1):
            t0 = time.perf_counter()
            learner.sft_step(batch)
            seconds.append(time.perf_counter() - t0)
        return seconds
    finally:
        learner.shutdown()


def bench_plain(model: str, batch, args) -> list[float]:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    lm.train()
    optim = torch.optim.AdamW(lm.parameters(), lr=1e-6, weight_decay=0.0)
    targets = batch.loss_mask.sum()
    seconds = []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        optim.zero_grad(set_to_none=True)
        for start in range(0, len(batch), args.micro_batch):
            mb = batch.select(slice(start, start + args.micro_batch))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                logits = lm(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits[:, :-1]
            losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                     mb.input_ids[:, 1:].reshape(-1), reduction="none")
            loss = (losses * mb.loss_mask[:, 1:].reshape(-1)).sum() / targets
            loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        optim.step()
        seconds.append(time.perf_counter() - t0)
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--response", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--bf16", action="store_true", help="both sides under bf16 autocast (fp32 weights)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "learner_throughput.json"))
    args = ap.parse_args()

    from rlhf_ray.assets import resolve_model
    from rlhf_ray.data import load_tokenizer

    model = resolve_model(args.model, role="learner")
    batch = make_batch(args, len(load_tokenizer(model)))
    tokens = int(batch.attention_mask.sum())
    results = {}
    for name, fn in (("plain torch", bench_plain), ("rlhf-ray learner", bench_learner)):
        seconds = fn(model, batch, args)
        median = statistics.median(seconds[1:])
        results[name] = {"step_s": seconds, "median_step_s": median, "tokens_per_s": tokens / median}
        print(f"{name:<18} {median:7.2f} s/step  {tokens / median:8.1f} tokens/s", flush=True)
    ratio = results["rlhf-ray learner"]["tokens_per_s"] / results["plain torch"]["tokens_per_s"]
    print(f"ratio (rlhf-ray / plain): {ratio:.2f}x")
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "model": args.model, "batch": args.batch, "tokens": tokens, "micro_batch": args.micro_batch,
              "threads": args.threads, "bf16_autocast": args.bf16, "results": results, "ratio": ratio}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
