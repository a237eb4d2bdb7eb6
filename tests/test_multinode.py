"""Placement on a multi-node cluster: three Ray nodes on this machine
(`cluster/local_multinode.sh`), a tiny PPO job submitted to it, and every role where its
config put it, read back from the node ids the workers report in summary.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cluster" / "local_multinode.sh"


def _cluster(action: str, state: Path) -> subprocess.CompletedProcess:
    # this session's own Ray may have put RAY_AUTH_MODE=token in our environment
    env = {**os.environ, "PYTHON": sys.executable, "RAY_AUTH_MODE": "disabled"}
    return subprocess.run(["bash", str(SCRIPT), action, str(state)], env=env, capture_output=True,
                          text=True, timeout=300)


def _processes_of(ray_tmp: str) -> list[str]:
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if ray_tmp in " ".join(p.info["cmdline"] or []):
                found.append(f"{p.pid} {' '.join(p.info['cmdline'])[:120]}")
        except psutil.Error:
            continue
    return found


def test_roles_run_on_the_nodes_their_resources_name(tmp_path):
    state = tmp_path / "cluster"
    ray_tmp = None
    try:
        up = _cluster("start", state)
        ray_tmp = (state / "ray_tmp").read_text().strip()
        assert up.returncode == 0, up.stdout + up.stderr
        nodes = json.loads((state / "nodes.json").read_text())
        by_resource = {name: n["node_id"] for n in nodes for name in n["resources"]
                       if name in ("rollout_node", "learner_node")}
        head = next(n["node_id"] for n in nodes if not {"rollout_node", "learner_node"} & set(n["resources"]))
        assert len({by_resource["rollout_node"], by_resource["learner_node"], head}) == 3

        run_dir = tmp_path / "run"
        job = subprocess.run(
            [sys.executable, "-m", "rlhf_ray.cli", "submit", "--address", (state / "dashboard").read_text().strip(),
             "ppo", "launch/configs/ppo_tiny.yaml", f"run_dir={run_dir}", "steps=2",
             "logging.wandb_mode=disabled", "logging.progress_bar=false",
             "rollout.resources={rollout_node: 1}", "learner.resources={learner_node: 1}",
             "reward.resources={learner_node: 1}", "reference.resources={rollout_node: 1}"],
            cwd=ROOT, capture_output=True, text=True, timeout=900,
            env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        assert job.returncode == 0 and "SUCCEEDED" in job.stdout + job.stderr, job.stdout[-4000:] + job.stderr[-2000:]
        workers = json.loads((run_dir / "summary.json").read_text())["workers"]
        placed = {role: {w["node_id"] for w in ws} for role, ws in workers.items()}
        assert placed == {"rollout": {by_resource["rollout_node"]}, "reference": {by_resource["rollout_node"]},
                          "learner": {by_resource["learner_node"]}, "reward": {by_resource["learner_node"]}}
    finally:
        down = _cluster("stop", state) if (state / "pgids").exists() else None
    assert down is None or down.returncode == 0, down.stderr
    if ray_tmp:
        assert _processes_of(ray_tmp) == [] and not Path(ray_tmp).exists()
