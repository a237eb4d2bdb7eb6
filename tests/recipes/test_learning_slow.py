"""Learning on real offline data with SmolLM2-135M-Instruct (slow: a few minutes each on 2 cores).

Each test runs one launch config through the CLI, exactly as a user would:

    pytest -m slow tests/recipes/test_learning_slow.py::test_sft_lowers_heldout_loss
    pytest -m slow tests/recipes/test_learning_slow.py::test_reward_model_reaches_90_percent_heldout_accuracy
    pytest -m slow tests/recipes/test_learning_slow.py::test_dpo_beats_its_sft_starting_point

The DPO test starts from SmolLM2-135M-Instruct, itself an SFT (chat) model; ``model.path``
takes any SFT export instead, e.g. the SFT test's.
Numbers are printed (``-s``) and kept in each run folder's summary.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "launch" / "configs"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]  # minutes each; more on a busy machine


def launch(recipe: str, config: str, run_dir: Path, *overrides: str) -> dict:
    """``rlhf-ray <recipe> launch/configs/<config> run_dir=... [overrides]``; returns summary.json."""
    cmd = [sys.executable, "-m", "rlhf_ray.cli", recipe, str(CONFIGS / config), f"run_dir={run_dir}",
           "logging.progress_bar=false", *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=3300,
                         env={**os.environ, "WANDB_MODE": "offline"})
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stderr[-5000:]}"
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = {k: v for k, v in summary["metrics"].items() if k.startswith("eval/")}
    print(f"\n{recipe} ({config}): wall {summary['wall_s']:.0f} s, phases {summary['phases_s']}")
    for key, value in metrics.items():
        print(f"  {key:24s} {value['first']:10.4f} -> {value['final']:10.4f}")
    return summary


def test_sft_lowers_heldout_loss(smollm2, tmp_path):
    m = launch("sft", "sft_smollm2.yaml", tmp_path / "sft")["metrics"]
    assert m["eval/loss"]["final"] < 0.7 * m["eval/loss"]["first"]
    assert m["eval/perplexity"]["final"] < m["eval/perplexity"]["first"]


def test_reward_model_reaches_90_percent_heldout_accuracy(smollm2, tmp_path):
    summary = launch("rm", "rm_smollm2.yaml", tmp_path / "rm")
    m = summary["metrics"]
    assert m["eval/accuracy"]["final"] >= 0.9
    assert m["eval/accuracy"]["final"] > m["eval/accuracy"]["first"]
    config = json.loads((Path(summary["outputs"]["model"]) / "config.json").read_text())
    assert config["reward_std"] > 0 and "reward_mean" in config


def test_dpo_beats_its_sft_starting_point(smollm2, tmp_path):
    """From SmolLM2-135M-Instruct (the SFT model, also the frozen reference) on sorting pairs."""
    m = launch("dpo", "dpo_smollm2.yaml", tmp_path / "dpo")["metrics"]
    # implicit-reward accuracy and margin on held-out pairs (0 at the start: policy = reference)
    assert m["eval/accuracy"]["final"] > max(0.5, m["eval/accuracy"]["first"])
    assert m["eval/margin"]["final"] > m["eval/margin"]["first"]
    # the policy itself prefers the correct answers more often, and by more, than the SFT model
    assert m["eval/logp_accuracy"]["final"] > m["eval/logp_accuracy"]["first"]
    assert m["eval/logp_margin"]["final"] > m["eval/logp_margin"]["first"]
