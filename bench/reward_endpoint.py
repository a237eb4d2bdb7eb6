"""Reward endpoint throughput: `rlhf-ray serve-rm` over HTTP against the in-process
RewardServer (a Ray actor), same run, same episodes, same reward model.

    .venv/bin/python bench/reward_endpoint.py                     # tiny RM, 8 clients
    .venv/bin/python bench/reward_endpoint.py --model smollm2-135m-instruct --clients 4

``--clients`` threads each send ``--requests`` requests of ``--batch`` episodes, at once.
The HTTP side goes through the project's client (``RemoteReward``), as a RewardServer with
``reward.url`` would; the in-process side calls the actor's ``score`` from the same
number of threads. Prints requests/s and episodes/s for both and the ratio; writes JSON
to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def items(n: int):
    from rlhf_ray.workers.reward import ScoreItem

    return [ScoreItem(f"What is {i} + {i + 1}?", f"{i} + {i + 1} = {2 * i + 1}. Done.", str(2 * i + 1))
            for i in range(n)]


def drive(call, clients: int, requests: int) -> float:
    """Seconds for ``clients`` threads to make ``requests`` calls each."""
    call()  # warm-up
    threads = [threading.Thread(target=lambda: [call() for _ in range(requests)]) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def bench_http(model: str, batch: list, clients: int, requests: int) -> float:
    from rlhf_ray.workers.reward_http import RemoteReward

    proc = subprocess.Popen([sys.executable, "-m", "rlhf_ray.cli", "serve-rm", "port=0",
                             f"reward.model={model}", "reward.function=arithmetic"],
                            stdout=subprocess.PIPE, text=True)
    try:
        url = re.search(r"listening on (http://\S+)", proc.stdout.readline()).group(1)
        client = RemoteReward(url, retries=0)
        client.check()
        return drive(lambda: client.score(batch), clients, requests)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def bench_actor(model: str, batch: list, clients: int, requests: int) -> float:
    import ray

    from rlhf_ray.batch import Episode
    from rlhf_ray.config import RewardConfig
    from rlhf_ray.workers.group import WorkerGroup, WorkerResources
    from rlhf_ray.workers.reward import RewardServer

    episodes = [Episode(prompt_ids=[1], response_ids=[2], prompt_text=i.prompt, response_text=i.response,
                        logprobs=[0.0], finish_reason="stop", policy_version=0, answer=i.answer)
                for i in batch]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    group = WorkerGroup(RewardServer, "reward", 1,
                        args=(RewardConfig(model=model, function="arithmetic"),),
                        resources=WorkerResources(num_cpus=0))
    try:
        return drive(lambda: group.call("score", episodes), clients, requests)
    finally:
        group.shutdown()
        ray.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llama-rm", help="reward model asset or folder")
    parser.add_argument("--batch", type=int, default=16, help="episodes per request")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25, help="requests per client")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "reward_endpoint.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rlhf_ray.assets import resolve_model

    model = resolve_model(args.model, role="reward")
    batch = items(args.batch)
    total = args.clients * args.requests
    rows = {}
    for name, fn in (("http (serve-rm + RemoteReward)", bench_http),
                     ("in-process (RewardServer actor)", bench_actor)):
        seconds = fn(model, batch, args.clients, args.requests)
        rows[name] = {"seconds": seconds, "requests_per_s": total / seconds,
                      "episodes_per_s": total * args.batch / seconds}
    http, actor = rows.values()
    ratio = http["requests_per_s"] / actor["requests_per_s"]
    print(f"{'':34s} {'req/s':>8s} {'episodes/s':>11s}")
    for name, r in rows.items():
        print(f"{name:34s} {r['requests_per_s']:8.1f} {r['episodes_per_s']:11.1f}")
    print(f"http / in-process: {ratio:.2f}x  ({args.clients} clients x {args.requests} requests "
          f"x {args.batch} episodes, model {args.model})")
    result = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "command": " ".join(sys.argv), "model": args.model,
              "batch": args.batch, "clients": args.clients, "requests": args.requests,
              "rows": rows, "ratio_http_vs_in_process": ratio}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
