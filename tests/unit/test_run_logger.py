"""RunLogger: namespaced keys, metrics.jsonl written as it goes, and a resumed run that keeps
its history and its W&B run."""

from __future__ import annotations

import json

import pytest

from rlhf_ray.config import LoggingConfig
from rlhf_ray.metrics import RunLogger


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_are_written_as_they_are_logged(tmp_path):
    log = RunLogger(tmp_path, LoggingConfig(wandb_mode="disabled"), {}, "sft")
    log.log({"policy/loss": 2.0}, 1)
    assert lines(tmp_path / "metrics.jsonl") == [{"step": 1, "policy/loss": 2.0}]  # before finish
    log.log({"policy/loss": 1.0, "eval/score": 0.5}, 2)
    summary = log.finish({})
    assert [r["step"] for r in lines(tmp_path / "metrics.jsonl")] == [1, 2]
    assert summary["metrics"]["policy/loss"] == {"first": 2.0, "final": 1.0}
    with pytest.raises(ValueError, match="no known namespace"):
        log.log({"loss": 1.0}, 3)


def test_restore_puts_the_first_half_back(tmp_path):
    first = RunLogger(tmp_path, LoggingConfig(wandb_mode="disabled"), {}, "ppo")
    first.log({"reward/mean": 0.1}, 1)
    first.log({"reward/mean": 0.2}, 2)
    state = first.state()
    second = RunLogger(tmp_path, LoggingConfig(wandb_mode="disabled"), {}, "ppo", resuming=True)
    second.restore(**state)
    second.log({"reward/mean": 0.3}, 3)
    assert [r["reward/mean"] for r in lines(tmp_path / "metrics.jsonl")] == [0.1, 0.2, 0.3]
    assert second.finish({})["metrics"]["reward/mean"] == {"first": 0.1, "final": 0.3}


def test_a_resumed_run_continues_its_wandb_run(tmp_path):
    cfg = LoggingConfig(wandb_mode="offline")
    RunLogger(tmp_path, cfg, {}, "sft").finish({})
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    RunLogger(tmp_path, cfg, {}, "sft", resuming=True).finish({})
    RunLogger(tmp_path / "other", cfg, {}, "sft").finish({})
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    # both halves, one W&B run (a second folder in the same second gets a "-1" suffix)
    assert len(runs) == 2 and all(f"-{run_id}" in r for r in runs), runs
    assert (tmp_path / "other" / "wandb_run_id").read_text().strip() != run_id  # a new run: a new id
