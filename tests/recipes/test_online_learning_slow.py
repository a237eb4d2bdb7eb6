"""Online learning on SmolLM2-135M-Instruct (slow: tens of minutes on 2 cores; not in CI).

    pytest -m slow tests/recipes/test_online_learning_slow.py -s

SFT (sft_smollm2.yaml) gives the starting policy; then each recipe runs
its smollm2 launch config through the CLI, as a user would, on held-out arithmetic prompts
scored by the exact-answer checker.
"""

from __future__ import annotations

import pytest
from test_learning_slow import launch  # same CLI runner (tests/recipes is on sys.path)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


@pytest.fixture(scope="module")
def sft_model(smollm2, tmp_path_factory) -> str:
    run = tmp_path_factory.mktemp("sft")
    return launch("sft", "sft_smollm2.yaml", run, "eval_every=0")["outputs"]["model"]


def test_rejection_sampling_raises_single_sample_reward(sft_model, tmp_path):
    m = launch("rs", "rs_smollm2.yaml", tmp_path, f"model.path={sft_model}")["metrics"]
    print("rs reward/mean", m["reward/mean"], "eval/score", m["eval/score"])
    assert m["reward/mean"]["final"] > m["reward/mean"]["first"]
    assert m["eval/score_sampled"]["final"] > m["eval/score_sampled"]["first"]


@pytest.mark.parametrize("config", ["grpo_smollm2.yaml", "ppo_smollm2.yaml"])
def test_rl_raises_heldout_score_with_bounded_kl(sft_model, tmp_path, config):
    m = launch("ppo", config, tmp_path, f"model.path={sft_model}")["metrics"]
    print(config, "eval/score", m["eval/score"], "eval/score_sampled", m["eval/score_sampled"],
          "kl/mean", m["kl/mean"])
    # the expected reward of one sampled answer on the 379 held-out prompts (4 samples each)
    # and greedy accuracy on the same prompts, both above the SFT start (docs/learning.md)
    assert m["eval/score_sampled"]["final"] > m["eval/score_sampled"]["first"] + 0.03
    assert m["eval/score"]["final"] > m["eval/score"]["first"]
    assert m["kl/mean"]["final"] < 5.0
