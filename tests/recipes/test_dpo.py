"""rlhf-ray dpo on the tiny model: a two-step run against a ReferenceServer, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from rlhf_ray.assets import AssetError
from rlhf_ray.config_loader import ConfigError


def test_dpo_two_steps_with_reference_server(tiny_run, tiny_llama, tmp_path):
    summary = tiny_run("dpo", tmp_path / "run")
    m = summary["metrics"]
    # The first step's loss is computed before any update, with policy == reference: the
    # ReferenceServer's log-probs equal the learner's, so the DPO loss is exactly ln 2.
    assert m["dpo/loss"]["first"] == pytest.approx(math.log(2), abs=1e-4)
    assert m["dpo/margin"]["first"] == pytest.approx(0.0, abs=1e-4)
    assert m["eval/margin"]["first"] == pytest.approx(0.0, abs=1e-4)
    for key in ("dpo/loss", "dpo/accuracy", "dpo/margin", "dpo/chosen_rewards",
                "dpo/rejected_rewards", "eval/loss", "eval/accuracy", "eval/margin",
                "eval/logp_accuracy", "eval/logp_margin", "policy/grad_norm"):
        assert math.isfinite(m[key]["first"]) and math.isfinite(m[key]["final"]), key
    assert m["dpo/chosen_rewards"]["final"] != 0.0  # the policy moved away from the reference

    from transformers import AutoModelForCausalLM

    model_dir = summary["outputs"]["model"]
    AutoModelForCausalLM.from_pretrained(model_dir)
    before = load_file(f"{tiny_llama}/model.safetensors")
    after = load_file(f"{model_dir}/model.safetensors")
    assert all(not torch.equal(before[k], after[k]) for k in after)


def test_ipo_step_uses_its_own_loss(tiny_run, tmp_path):
    """IPO's loss (h - 1/(2 beta))^2 is 1/(4 beta^2) = 25 at the start (h = 0, beta = 0.1)."""
    m = tiny_run("dpo", tmp_path, "loss_type=ipo", "max_steps=1", "data.heldout_fraction=0",
                 "checkpoint.save_every=0")["metrics"]
    assert m["dpo/loss"]["first"] == pytest.approx(25.0, rel=1e-4)
    assert "eval/loss" not in m  # no held-out rows: no evaluation


def test_ipo_and_conservative_dpo_settings(tiny_cfg, tmp_path):
    cfg = tiny_cfg("dpo", tmp_path, "loss_type=ipo", "beta=0.5")
    assert cfg.loss_type == "ipo" and cfg.data.format == "preference"
    assert tiny_cfg("dpo", tmp_path, "label_smoothing=0.2").label_smoothing == 0.2
    with pytest.raises(ConfigError, match="conservative DPO needs loss_type=sigmoid"):
        tiny_cfg("dpo", tmp_path, "loss_type=ipo", "label_smoothing=0.1")
    with pytest.raises(ConfigError, match="label_smoothing: expected 0 <= x <= 0.5"):
        tiny_cfg("dpo", tmp_path, "label_smoothing=0.7")
    with pytest.raises(ConfigError, match="beta: expected a positive number"):
        tiny_cfg("dpo", tmp_path, "beta=0")


def test_dpo_names_a_missing_reference(tiny_cfg, tmp_path):
    from rlhf_ray.recipes import dpo

    with pytest.raises(AssetError, match="dpo reference: model path '.*absent' does not exist"):
        dpo.run(tiny_cfg("dpo", tmp_path / "run", "reference_is_policy=false",
                         f"reference.path={tmp_path / 'absent'}"))
