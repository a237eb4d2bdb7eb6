"""resume=auto: an interrupted run continues where it stopped (optimizer, LR schedule, step
counter and data position) and ends with the weights of an uninterrupted run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from rlhf_ray import checkpoint
from rlhf_ray.config_loader import ConfigError, save_config


def jsonl(summary: dict) -> list[dict]:
    with open(summary["outputs"]["metrics"]) as f:
        return [json.loads(line) for line in f]


def weights(summary: dict) -> dict[str, torch.Tensor]:
    return load_file(f"{summary['outputs']['model']}/model.safetensors")


def test_interrupted_sft_resumes_at_the_next_step_and_matches(tiny_run, tmp_path,
                                                              monkeypatch):
    from rlhf_ray.driver.run import Run

    run = tmp_path / "interrupted"
    # warm-up + cosine decay over 4 steps: the LR schedule must be restored, not restarted
    args = ("max_steps=4", "checkpoint.save_every=1", "optim.warmup_steps=1",
            "optim.schedule=cosine")
    save = Run.save_checkpoint

    def save_then_crash(self, learners, step, *rest):
        path = save(self, learners, step, *rest)
        if step == 2:
            raise RuntimeError("simulated crash after step 2")
        return path

    monkeypatch.setattr(Run, "save_checkpoint", save_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        tiny_run("sft", run, *args)
    monkeypatch.undo()
    # ... and a save of step 3 that died before writing its state.json
    checkpoint.step_dir(run, 3).mkdir()
    assert checkpoint.latest(run).name == "step_00000002"

    resumed = tiny_run("sft", run, *args, "resume=auto")
    straight = tiny_run("sft", tmp_path / "straight", *args)
    assert resumed["start_step"] == 2 and resumed["steps"] == 4
    assert resumed["resumed_from"].endswith("step_00000002")
    # the logged history of the first half is kept ("first" = before the interruption)
    for key in ("eval/loss", "policy/loss", "policy/lr"):
        assert resumed["metrics"][key]["first"] == straight["metrics"][key]["first"], key
    # metrics.jsonl (and the plot) hold the whole run, both halves
    losses = [(r["step"], r["policy/loss"]) for r in jsonl(resumed) if "policy/loss" in r]
    assert [step for step, _ in losses] == [1, 2, 3, 4]
    assert [v for _, v in losses] == pytest.approx(
        [r["policy/loss"] for r in jsonl(straight) if "policy/loss" in r], rel=1e-5)
    kept = [p.name for p in checkpoint.complete_checkpoints(run)]
    assert kept == ["step_00000003", "step_00000004"]
    # same optimizer state, LR schedule and data order: the same final weights
    a, b = weights(resumed), weights(straight)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    for key in ("eval/loss", "policy/loss", "policy/lr"):
        assert resumed["metrics"][key]["final"] == pytest.approx(
            straight["metrics"][key]["final"], rel=1e-5), key


def test_resumed_two_rank_dpo_continues_from_k_plus_one(tiny_run, tmp_path):
    """Two data-parallel learner ranks; the resumed run trains steps 2 and 3 only."""
    first = tiny_run("dpo", tmp_path, "max_steps=1", "learner.num_workers=2")
    resumed = tiny_run("dpo", tmp_path, "max_steps=3", "resume=auto", "learner.num_workers=2")
    assert (first["start_step"], resumed["start_step"], resumed["steps"]) == (0, 1, 3)
    assert resumed["metrics"]["dpo/loss"]["first"] == first["metrics"]["dpo/loss"]["first"]
    assert first["metrics"]["dpo/loss"]["first"] == pytest.approx(math.log(2), abs=1e-4)
    # steps 2 and 3 trained against the reference, starting from the step-1 weights
    assert resumed["metrics"]["dpo/margin"]["final"] != 0.0
    state = json.loads((checkpoint.latest(tmp_path) / checkpoint.STATE_FILE).read_text())
    assert state["step"] == 3


# --------------------------------------------------------------------------- refusals (no Ray)


def fake_checkpoint(cfg, step: int = 1, data_fingerprint: str = "0" * 16) -> None:
    """A run folder as a previous run would leave it (config + a complete checkpoint)."""
    save_config(cfg, cfg.run_dir)
    path = checkpoint.step_dir(cfg.run_dir, step)
    (path / "policy").mkdir(parents=True)  # where the learners' DeepSpeed state would be
    state = checkpoint.JobState(step=step, epoch=0, data_fingerprint=data_fingerprint)
    (path / checkpoint.STATE_FILE).write_text(json.dumps(state.__dict__))


def test_resume_refuses_what_would_not_continue_the_same_run(tiny_cfg, tmp_path):
    from rlhf_ray.recipes import sft

    fake_checkpoint(tiny_cfg("sft", tmp_path))
    with pytest.raises(ConfigError, match="already holds checkpoints .* pass resume=auto"):
        sft.run(tiny_cfg("sft", tmp_path))
    with pytest.raises(ConfigError, match="differs from the one that wrote .* in optim.lr, "
                                          "optim.warmup_steps"):
        sft.run(tiny_cfg("sft", tmp_path, "resume=auto", "optim.lr=0.5", "optim.warmup_steps=2"))
    with pytest.raises(ConfigError, match="the training data differ"):
        sft.run(tiny_cfg("sft", tmp_path, "resume=auto"))  # the fake's data fingerprint
    # a checkpoint without state.json is an interrupted save: a new run ignores it
    (checkpoint.step_dir(tmp_path, 1) / checkpoint.STATE_FILE).unlink()
    assert checkpoint.check_run_dir(tiny_cfg("sft", tmp_path)) is None


def test_keys_that_may_change_on_resume():
    old = {"max_steps": 2, "optim": {"lr": 1.0}, "logging": {"wandb_mode": "offline"},
           "learner": {"micro_batch_size": 4, "zero_stage": 0}}
    new = {"max_steps": 9, "optim": {"lr": 1.0}, "logging": {"wandb_mode": "disabled"},
           "learner": {"micro_batch_size": 2, "zero_stage": 2}}
    assert checkpoint.config_changes(old, new) == ["learner.zero_stage"]
