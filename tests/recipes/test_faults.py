"""Faults with real SIGKILLs to real worker processes, on the tiny model.

Each test runs the PPO driver and, from a thread, kills a worker process by the pid the
run lists in ``workers.json`` at a chosen point (after a step is logged, or while a
checkpoint is being saved). The tests check what survives: the step finishes, the ledger
shows every prompt trained exactly once, and the replaced worker took work with the
current weights (no episode of an old version is ever trained on).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from rlhf_ray import checkpoint
from rlhf_ray.config import PPOConfig
from rlhf_ray.config_loader import build_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "launch" / "configs" / "ppo_tiny.yaml"
PROMPTS_PER_STEP = 4


def _rows(run_dir: Path, name: str) -> list[dict]:
    try:
        return [json.loads(line) for line in (run_dir / name).read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def _logged_step(run_dir: Path) -> int:
    """The newest training step in metrics.jsonl (0 before the first)."""
    return max((r["step"] for r in _rows(run_dir, "metrics.jsonl") if "rollout/episodes" in r), default=0)


def _pid(run_dir: Path, role: str, rank: int) -> int:
    return json.loads((run_dir / "workers.json").read_text())[role][rank]["pid"]


class Killer(threading.Thread):
    """SIGKILLs worker ``(role, rank)`` once ``ready()`` holds, for each planned kill."""

    def __init__(self, run_dir: Path, plan: list[tuple]):
        super().__init__(daemon=True)
        self.run_dir, self.plan, self.kills, self.stop = run_dir, plan, [], threading.Event()

    def run(self) -> None:
        for ready, role, rank in self.plan:
            while not self.stop.is_set() and not ready(self.run_dir):
                time.sleep(0.005)
            if self.stop.is_set():
                return
            pid = _pid(self.run_dir, role, rank)
            os.kill(pid, signal.SIGKILL)
            self.kills.append({"role": role, "rank": rank, "pid": pid, "at": time.time()})


def after_step(n: int):
    return lambda run_dir: _logged_step(run_dir) >= n


def run_ppo_killing(run_dir: Path, plan: list[tuple], *overrides: str):
    """Run PPO on the tiny config while ``plan``'s kills land; returns (summary or the
    error raised, history, kills)."""
    from rlhf_ray.recipes import ppo

    cfg = build_config(PPOConfig, TINY, [f"run_dir={run_dir}", "logging.progress_bar=false", *overrides])
    killer = Killer(run_dir, plan)
    killer.start()
    try:
        result = ppo.run(cfg)
    except Exception as e:  # noqa: BLE001 - the test inspects it
        result = e
    finally:
        killer.stop.set()
        killer.join(timeout=10)
    history = _rows(run_dir, "history.jsonl")
    return result, history, killer.kills


def check_every_prompt_trained_once(summary: dict, history: list[dict], steps: int, n: int) -> None:
    """The ledger and the history: each step trained its own prompts, each exactly once, all
    with the weights of that step (a replacement that missed the weights would show)."""
    from rlhf_ray.data import load_tokenizer
    from rlhf_ray.driver.prompts import prompts_for_step

    ledger = summary["episode_ledger"]
    assert ledger["prompts_submitted"] == ledger["prompts_collected"] == steps * PROMPTS_PER_STEP, ledger
    assert ledger["trained"] == ledger["collected"] == steps * PROMPTS_PER_STEP * n, ledger
    assert ledger["generated"] == ledger["scored"] == ledger["collected"], ledger  # none twice
    assert ledger["prompts_pending"] == ledger["scoring"] == ledger["waiting"] == 0, ledger
    assert [h["step"] for h in history] == list(range(1, steps + 1))
    cfg = build_config(PPOConfig, TINY, [])
    from rlhf_ray.driver.prompts import load_prompts

    train = load_prompts(cfg.data, load_tokenizer(summary["outputs"]["model"]), cfg.rollout.max_model_len, "train")
    for h in history:
        expected = sorted(p.index for p in prompts_for_step(train, h["step"] - 1, PROMPTS_PER_STEP))
        assert h["prompts_trained"] == expected, h
        assert h["rollout/episodes"] == PROMPTS_PER_STEP * n
        assert h["versions_trained"] == [h["trained_at_version"]], h
        assert h["rollout/dropped_stale"] == 0, h


def test_rollout_reward_and_reference_workers_killed_are_replaced_with_no_prompt_lost(ray_local, tmp_path):
    """Two rollout workers, two reward replicas, one reference: rollout rank 1 is killed
    while the next step generates, then reward rank 1 (a live replica takes its calls),
    then the only reference server (the stream waits for its replacement)."""
    run_dir = tmp_path / "run"
    plan = [(after_step(1), "rollout", 1), (after_step(2), "reward", 1), (after_step(3), "reference", 0)]
    summary, history, kills = run_ppo_killing(
        run_dir, plan, "steps=4", "rollout.num_workers=2", "reward.num_replicas=2", "chunk_size=1",
        "sampling.max_new_tokens=48", "reward.function=reward_fns:response_length")
    assert isinstance(summary, dict), summary
    assert [k["role"] for k in kills] == ["rollout", "reward", "reference"]
    faults = summary["faults"]
    assert faults["restarts"] == {"rollout": 1, "reward": 1, "reference": 1}, faults
    # the killed rollout worker held chunks of step 2: they were generated again, elsewhere
    assert faults["requeued_prompts"] >= 1, faults
    assert faults["retried_calls"] >= 2, faults  # the reward's and the reference's calls
    events = {e["role"]: e for e in faults["events"]}
    for kill in kills:
        event = events[kill["role"]]
        assert event["old_pid"] == kill["pid"] and event["new_pid"] != kill["pid"]
        print(f"{kill['role']}: detected {event['detected_at'] - kill['at']:.2f} s after the kill, "
              f"replaced in {event['recover_s']:.2f} s")
    # the new workers are the ones listed now
    listed = json.loads((run_dir / "workers.json").read_text())
    assert listed["rollout"][1]["pid"] == events["rollout"]["new_pid"]
    assert listed["rollout"][1]["restarts"] == 1
    check_every_prompt_trained_once(summary, history, 4, 2)
    m = summary["metrics"]
    assert m["faults/restarts/rollout"]["final"] == 1 and m["faults/requeued_prompts"]["final"] >= 1
    assert m["rollout/ledger_prompts_requeued_fault"]["final"] == faults["requeued_prompts"]
