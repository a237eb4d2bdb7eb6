"""GRPO end to end: rlhf-ray against TRL's GRPOTrainer, same settings, same run.

    .venv/bin/python bench/grpo_vs_trl.py                       # SmolLM2-135M fp32, 8 prompts x 4, 64 tokens
    .venv/bin/python bench/grpo_vs_trl.py --steps 4 --variants before,threads,staleness1

Both sides train the same model on the same prompts (Alpaca-templated arithmetic, the same
text, so the same tokens) with the same group size, ``max_new_tokens``, temperature 1,
learning rate, beta (a k3 KL term in the loss against the frozen start model, TRL's form),
one optimizer step per batch of ``prompts x n`` completions, fp32, and the arithmetic
checker as the reward. TRL generates with plain ``generate`` (its default; vLLM is not
carried to CPU machines by TRL).

Timing: the wall time of each training step, its median over the steps after the first
(warm-up); completions/s = completions per step / median step time. rlhf-ray: ``perf/step_s``
from ``history.jsonl`` (collect + advantages + train + sync), with its parts
(``perf/gen_s``, ``perf/train_s``, ``perf/sync_s``, ``perf/score_s``); TRL: a callback around
each step (generation happens inside it). Start-up is left out on both sides.

rlhf-ray variants (each a subprocess with its own local Ray, run one after another):

- ``before``: ``learner.threads=1``, ``chunk_size=4`` and ``pi_old=recompute``: the learner
  thread count an actor with 1 reserved CPU got before ``learner.threads``, the issue's
  chunking, and a separate pi_old pass;
- ``threads``: ``learner.threads`` at its default (the node's cores: nothing else computes
  during an on-policy step's training);
- ``chunk8``: ``threads`` plus all 8 prompts of a step in one generate call;
- ``staleness1``: ``threads`` with ``max_staleness=1`` (generation overlaps training, so the
  learner keeps its reserved CPU: ``learner.threads`` defaults to ``cpus_per_worker``);
- ``fused``: ``chunk8`` with pi_old taken from the update's own forward (``pi_old=auto``,
  the default: one optimizer step per batch, KL in the loss), no separate pass; the
  learner and the reference compute each prompt once for its n samples
  (``learner.shared_prompt``, ``reference.shared_prompt``, the defaults);
- ``unshared``: ``fused`` with one row per sample in the learner and the reference (each
  prompt computed n times, as before the shared-prompt rows);
- ``autocast``: ``fused`` with the learner under bf16 autocast (fp32 weights and optimizer);
- ``bf16``: ``autocast`` plus the reference and the vLLM rollouts in bf16 (the rollout
  correction covers the rollout/learner mismatch, logged as ``rollout/mismatch_*``).

rlhf-ray's workers keep freed memory in their heap for reuse (``reuse_freed_memory``); TRL
runs in this process with glibc's defaults, as a user runs it. ``--trl-heap`` runs TRL once
more (fp32, after the plain run) with that heap setting, as ``trl_heap``.

Prints a table with each ratio to TRL, writes JSON to ``--out`` and a stacked-bar plot of
the step time split into generation, training, sync and the rest to ``--plot``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "before": ["learner.threads=1", "chunk_size=4", "pi_old=recompute"],
    "threads": ["chunk_size=4", "pi_old=recompute"],
    "chunk8": ["chunk_size=8", "pi_old=recompute"],
    "staleness1": ["chunk_size=4", "max_staleness=1"],
    "fused": ["chunk_size=8"],
    "unshared": ["chunk_size=8", "learner.shared_prompt=false", "reference.shared_prompt=false"],
    "autocast": ["chunk_size=8", "learner.autocast=bfloat16"],
    "bf16": ["chunk_size=8", "learner.autocast=bfloat16", "reference.dtype=bfloat16", "rollout.dtype=bfloat16"],
}


def settings(args) -> dict:
    return {"model": "smollm2-135m-instruct", "dtype": "float32", "prompts_per_step": args.prompts,
            "n": args.n, "max_new_tokens": args.max_new_tokens, "lr": args.lr, "beta": args.beta,
            "steps": args.steps}


def load_prompts(n_rows: int):
    from rlhf_ray.assets import resolve_model
    from rlhf_ray.config import DataConfig
    from rlhf_ray.data import load_tokenizer
    from rlhf_ray.driver.prompts import load_prompts as load

    model = resolve_model("smollm2-135m-instruct", role="policy")
    data = DataConfig(source="arithmetic", format="prompt", template="alpaca", num_rows=n_rows)
    return model, load(data, load_tokenizer(model), 512, "train")


# --------------------------------------------------------------------------- TRL


def bench_trl(args, bf16: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_ray.data.checkers import check_arithmetic

    model_path, prompts = load_prompts(args.rows)
    # the same prompts in the same order as rlhf-ray's steps walk them
    rows = [{"prompt": p.text, "answer": p.answer} for p in prompts[: args.prompts * args.steps]]

    def reward(prompts, completions, answer, **_):
        return [check_arithmetic(c, a) for c, a in zip(completions, answer)]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self._t = [], 0.0

        def on_step_begin(self, *_, **__):
            self._t = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.seconds.append(time.perf_counter() - self._t)

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(output_dir=out, per_device_train_batch_size=args.prompts * args.n,
                            num_generations=args.n, max_completion_length=args.max_new_tokens,
                            learning_rate=args.lr, beta=args.beta, temperature=1.0, max_steps=args.steps,
                            gradient_accumulation_steps=1, num_iterations=1, logging_steps=1,
                            report_to=[], save_strategy="no", use_cpu=True, bf16=bf16, fp16=False,
                            seed=0, dataloader_num_workers=0, shuffle_dataset=False,
                            disable_dropout=True, log_completions=False)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        tokenizer.padding_side = "left"
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config,
                              train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                              callbacks=[timer])
        trainer.train()
    return summarize(timer.seconds, args.prompts * args.n, {"threads": torch.get_num_threads(),
                                                            "bf16_autocast": bf16})


# --------------------------------------------------------------------------- rlhf-ray


def bench_ours(args, name: str, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / name
        command = [sys.executable, "-m", "rlhf_ray.cli", "ppo", str(ROOT / "bench" / "grpo_bench.yaml"),
                   f"run_dir={run_dir}", f"steps={args.steps}", f"prompts_per_step={args.prompts}",
                   f"sampling.n={args.n}", f"sampling.max_new_tokens={args.max_new_tokens}",
                   f"optim.lr={args.lr}", f"kl.coef={args.beta}", f"data.num_rows={args.rows}", *overrides]
        env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
        t0 = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"rlhf-ray {name} failed:\n{done.stderr[-4000:]}")
        history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
        summary = json.loads((run_dir / "summary.json").read_text())
    parts = {key: statistics.median(h[key] for h in history[1:] or history)
             for key in ("perf/gen_s", "perf/train_s", "perf/sync_s", "perf/score_s",
                         "perf/sync_publish_s", "perf/sync_load_s")
             if all(key in h for h in history)}
    # the log-prob agreement the variant costs: vLLM's sampling log-probs vs the learner's
    agreement = {key: statistics.median(h[key] for h in history if key in h)
                 for key in ("rollout/mismatch_kl", "rollout/is_weight_mean", "perf/pi_old_s")
                 if any(key in h for h in history)}
    per_step = [{key: h[key] for key in ("perf/gen_s", "perf/train_s", "perf/sync_s", "perf/score_s")
                 if key in h} for h in history]
    extra = {"overrides": overrides, "parts_median_s": parts, "parts_per_step_s": per_step,
             "agreement": agreement,
             "wall_s": time.perf_counter() - t0,
             "learner_threads": summary.get("learner", {}).get("threads")}
    return summarize([h["perf/step_s"] for h in history], args.prompts * args.n, extra)


def summarize(step_seconds: list[float], completions: int, extra: dict) -> dict:
    timed = step_seconds[1:] or step_seconds
    median = statistics.median(timed)
    return {"step_s": step_seconds, "median_step_s": median, "completions_per_s": completions / median,
            **extra}


# --------------------------------------------------------------------------- report


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(8, 4))
    labelled: set[str] = set()

    def bar(i: int, height: float, bottom: float, color: str, label: str) -> None:
        ax.bar(i, height, bottom=bottom, color=color, label=None if label in labelled else label)
        labelled.add(label)

    for i, name in enumerate(names):
        r = results[name]
        if "parts_median_s" not in r:
            bar(i, r["median_step_s"], 0.0, "grey", "TRL step (generate + train)")
            continue
        parts = r["parts_median_s"]
        bottom = 0.0
        for key, color, label in (("perf/gen_s", "tab:blue", "generation + scoring wait"),
                                  ("perf/train_s", "tab:orange", "training"),
                                  ("perf/sync_s", "tab:green", "weight sync")):
            bar(i, parts[key], bottom, color, label)
            bottom += parts[key]
        bar(i, max(r["median_step_s"] - bottom, 0.0), bottom, "tab:purple", "pi_old pass, advantages, other")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("median seconds per step")
    ax.set_title("GRPO step time: rlhf-ray variants vs TRL GRPOTrainer")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_run_args(ap: argparse.ArgumentParser, steps: int = 3) -> None:
    """The GRPO settings every rlhf-ray run here takes (``bench_ours`` reads them)."""
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--rows", type=int, default=400)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(ap)
    ap.add_argument("--variants", default="before,fused,autocast,bf16",
                    help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--trl-bf16", action="store_true",
                    help="also run TRL with bf16=True (autocast; fp32 weights), the peer of the bf16 variants")
    ap.add_argument("--trl-heap", action="store_true",
                    help="also run TRL (fp32) with the heap setting rlhf-ray's workers make, as trl_heap")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "grpo_vs_trl.json"))
    ap.add_argument("--plot", default=str(ROOT / "bench" / "results" / "grpo_vs_trl.png"))
    args = ap.parse_args()

    results: dict[str, dict] = {}
    if not args.skip_trl:
        print("TRL GRPOTrainer ...", flush=True)
        results["trl"] = bench_trl(args)
    if args.trl_bf16:
        print("TRL GRPOTrainer, bf16 autocast ...", flush=True)
        results["trl_bf16"] = bench_trl(args, bf16=True)
    if args.trl_heap:  # last of the TRL runs: the setting stays for the rest of the process
        from rlhf_ray.workers.group import reuse_freed_memory

        print("TRL GRPOTrainer, heap setting ...", flush=True)
        reuse_freed_memory()
        results["trl_heap"] = bench_trl(args)
    for name in args.variants.split(","):
        print(f"rlhf-ray {name} ...", flush=True)
        results[name] = bench_ours(args, name, VARIANTS[name])

    base = results.get("trl")
    print(f"\n{'run':<12} {'median step s':>14} {'completions/s':>14} {'vs TRL':>8}  (TRL: fp32)")
    for name, r in results.items():
        ratio = r["completions_per_s"] / base["completions_per_s"] if base else float("nan")
        r["ratio_vs_trl"] = ratio
        print(f"{name:<12} {r['median_step_s']:>14.1f} {r['completions_per_s']:>14.3f} {ratio:>7.2f}x")
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores", "settings": settings(args), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    plot(results, Path(args.plot))
    print(f"\nwrote {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
