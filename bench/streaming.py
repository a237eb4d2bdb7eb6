"""Streaming: the GRPO step with generation running ahead of training (max_staleness=1)
against the on-policy step (max_staleness=0), same settings, same run.

    .venv/bin/python bench/streaming.py                 # SmolLM2-135M, 8 prompts x 4, 64 tokens, 4 steps
    .venv/bin/python bench/streaming.py --extra learner.autocast=none

All runs use ``bench/grpo_bench.yaml`` as ``bench/grpo_vs_trl.py`` sets it up (all 8 prompts
of a step in one generate call), each a subprocess with its own local Ray:

- ``staleness0``: on-policy. Generation and training take turns. The roles sit on separate
  cores: the rollout worker reserves one CPU and computes on one thread, the learner
  reserves the other and trains on one thread, the reference scores on one thread;
- ``staleness1``: the same placement with generation of step s+1 overlapping training of
  step s;
- ``staleness0_all_cores`` (unless ``--no-all-cores``): on-policy with every role taking
  every core while it computes (the defaults: nothing else computes while it does). This is
  the fastest on-policy step on a machine this small, so the one to beat.

The target ratio is staleness1 over staleness0 with the roles on separate cores (below 1:
streaming pays); the ratio to ``staleness0_all_cores`` is printed beside it. ``--extra``
adds overrides to every run (default: the learner under bf16 autocast). Each step is split
into generation wait, training and sync. Writes JSON to ``--out``.
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

SEPARATE_CORES = ["rollout.cpus_per_worker=1", "learner.cpus_per_worker=1", "learner.threads=1",
                  "reference.threads=1"]
RUNS = {"staleness0": ["chunk_size=8", "max_staleness=0", *SEPARATE_CORES],
        "staleness1": ["chunk_size=8", "max_staleness=1", *SEPARATE_CORES],
        "staleness0_all_cores": ["chunk_size=8", "max_staleness=0"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(ap, steps=4)
    ap.add_argument("--extra", default="learner.autocast=bfloat16",
                    help="comma-separated overrides for both runs")
    ap.add_argument("--no-all-cores", action="store_true", help="skip the staleness0_all_cores run")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "streaming.json"))
    args = ap.parse_args()

    extra = [o for o in args.extra.split(",") if o]
    results = {}
    for name, overrides in RUNS.items():
        if name == "staleness0_all_cores" and args.no_all_cores:
            continue
        print(f"rlhf-ray {name} ...", flush=True)
        results[name] = bench_ours(args, name, overrides + extra)
    ratio = results["staleness1"]["median_step_s"] / results["staleness0"]["median_step_s"]
    print(f"\n{'run':<12} {'step s':>8} {'gen wait':>9} {'train':>7} {'sync':>6} {'sync share':>11}")
    for name, r in results.items():
        p = r["parts_median_s"]
        print(f"{name:<12} {r['median_step_s']:>8.1f} {p['perf/gen_s']:>9.1f} {p['perf/train_s']:>7.1f} "
              f"{p['perf/sync_s']:>6.1f} {p['perf/sync_s'] / r['median_step_s']:>10.1%}")
    print(f"step time, max_staleness=1 vs 0, roles on separate cores: {ratio:.2f}x (target <= 0.7x)")
    if "staleness0_all_cores" in results:
        best = results["staleness1"]["median_step_s"] / results["staleness0_all_cores"]["median_step_s"]
        print(f"step time, max_staleness=1 vs 0 with every role on every core: {best:.2f}x")
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "extra": extra, "results": results, "ratio_staleness1_vs_0": ratio,
              "ratio_staleness1_vs_0_all_cores": (results["staleness1"]["median_step_s"]
                                                  / results["staleness0_all_cores"]["median_step_s"]
                                                  if "staleness0_all_cores" in results else None)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
