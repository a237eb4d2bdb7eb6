"""Streaming: the GRPO step with generation running ahead of training (max_staleness=1)
against the on-policy step (max_staleness=0), same settings, same run.

    .venv/bin/python bench/streaming.py                 # SmolLM2-135M, 8 prompts x 4, 64 tokens, 4 steps
    .venv/bin/python bench/streaming.py --extra learner.autocast=none

Both runs use ``bench/grpo_bench.yaml`` as ``bench/grpo_vs_trl.py`` sets it up (all 8 prompts
of a step in one generate call), each a subprocess with its own local Ray:

- ``staleness0``: on-policy. Generation and training take turns, so the learner uses every
  core of the node while it trains (``learner.threads`` default) and pi_old is the update's
  own forward;
- ``staleness1``: generation of step s+1 overlaps training of step s. The roles run at the
  same time on separate cores: vLLM computes on one core (it keeps the other for its front
  end), the learner keeps its one reserved CPU.

``--extra`` adds overrides to both (default: the learner under bf16 autocast, the fastest
learner on this machine). The ratio is the median step time of staleness1 over that of
staleness0 (below 1: streaming pays), with each step split into generation wait, training
and sync. Writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from grpo_vs_trl import ROOT, add_run_args, bench_ours  # noqa: E402

RUNS = {"staleness0": ["chunk_size=8", "max_staleness=0"],
        "staleness1": ["chunk_size=8", "max_staleness=1"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(ap, steps=4)
    ap.add_argument("--extra", default="learner.autocast=bfloat16",
                    help="comma-separated overrides for both runs")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "streaming.json"))
    args = ap.parse_args()

    extra = [o for o in args.extra.split(",") if o]
    results = {}
    for name, overrides in RUNS.items():
        print(f"rlhf-ray {name} ...", flush=True)
        results[name] = bench_ours(args, name, overrides + extra)
    ratio = results["staleness1"]["median_step_s"] / results["staleness0"]["median_step_s"]
    print(f"\n{'run':<12} {'step s':>8} {'gen wait':>9} {'train':>7} {'sync':>6} {'sync share':>11}")
    for name, r in results.items():
        p = r["parts_median_s"]
        print(f"{name:<12} {r['median_step_s']:>8.1f} {p['perf/gen_s']:>9.1f} {p['perf/train_s']:>7.1f} "
              f"{p['perf/sync_s']:>6.1f} {p['perf/sync_s'] / r['median_step_s']:>10.1%}")
    print(f"step time, max_staleness=1 vs 0: {ratio:.2f}x (target <= 0.7x)")
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "extra": extra, "results": results, "ratio_staleness1_vs_0": ratio}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
