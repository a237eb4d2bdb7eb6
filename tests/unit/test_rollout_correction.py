"""Rollout correction: the learners' pi_old against the rollout engine's pi_rollout, with a
deliberately biased rollout log-prob, reacts as the formulas say."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_ray.experience import rollout_correction
from rlhf_ray.losses import ppo_policy_loss

DT = torch.float64


def biased(offsets: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of response tokens; old = rollout + offset (log pi_old - log pi_rollout)."""
    width = max(len(r) for r in offsets)
    gen = torch.Generator().manual_seed(0)
    rollout = -torch.rand(len(offsets), width, generator=gen, dtype=DT) - 0.1
    offset = torch.zeros(len(offsets), width, dtype=DT)
    mask = torch.zeros(len(offsets), width, dtype=DT)
    for i, row in enumerate(offsets):
        offset[i, : len(row)] = torch.tensor(row, dtype=DT)
        mask[i, : len(row)] = 1
    return rollout + offset, rollout, mask


OFFSETS = [[0.0, math.log(3.0), 0.0], [math.log(0.5), 0.0], [math.log(1.5)] * 4]


def test_tis_caps_each_token_weight_and_reports_the_mismatch():
    old, rollout, mask = biased(OFFSETS)
    weights, m = rollout_correction(old, rollout, mask, "tis", cap=2.0)
    expected = [[1.0, 2.0, 1.0], [0.5, 1.0], [1.5] * 4]  # min(ratio, 2)
    for i, row in enumerate(expected):
        assert weights[i, : len(row)].tolist() == pytest.approx(row)
        assert float(weights[i, len(row):].abs().sum()) == 0.0
    ratios = [r for row in OFFSETS for r in map(math.exp, row)]
    assert m["rollout/is_weight_mean"] == pytest.approx(sum(ratios) / len(ratios))
    assert m["rollout/is_clipped_frac"] == pytest.approx(1 / len(ratios))  # the one ratio of 3
    k3 = [r - 1 - math.log(r) for r in ratios]  # KL(pi_rollout || pi_old), per sampled token
    assert m["rollout/mismatch_kl"] == pytest.approx(sum(k3) / len(k3))


def test_mask_drops_whole_sequences_beyond_the_cap():
    old, rollout, mask = biased([[math.log(3.0)] * 2, [math.log(1.9), math.log(1.9)], [0.1, -0.1]])
    weights, m = rollout_correction(old, rollout, mask, "mask", cap=2.0)
    assert weights.sum(-1).tolist() == [0.0, 2.0, 2.0]
    assert m["rollout/is_clipped_frac"] == pytest.approx(1 / 3)


def test_no_mismatch_means_unit_weights_and_zero_kl():
    old, rollout, mask = biased([[0.0, 0.0], [0.0]])
    for mode in ("none", "tis", "mask"):
        weights, m = rollout_correction(old, rollout, mask, mode)
        assert torch.equal(weights, mask)
        assert m["rollout/mismatch_kl"] == pytest.approx(0.0, abs=1e-12)
        assert m["rollout/is_clipped_frac"] == 0.0
    with pytest.raises(ValueError, match="choose one of"):
        rollout_correction(old, rollout, mask, "bogus")


def test_weighting_the_advantages_weights_each_tokens_clipped_surrogate():
    """w * min(r A, clip(r) A) == min(r (w A), clip(r) (w A)) for w >= 0: the driver may put the
    correction in the advantages."""
    gen = torch.Generator().manual_seed(3)
    logprobs = torch.randn(3, 4, generator=gen, dtype=DT) * 0.3 - 1
    old = logprobs + torch.randn(3, 4, generator=gen, dtype=DT) * 0.3
    advantages = torch.randn(3, 4, generator=gen, dtype=DT)
    mask = torch.ones(3, 4, dtype=DT)
    weights = torch.rand(3, 4, generator=gen, dtype=DT) * 2
    loss, _ = ppo_policy_loss(logprobs, old, advantages * weights, mask, 0.2)
    ratio = torch.exp(logprobs - old)
    naive = -(weights * torch.minimum(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages)).mean()
    assert float(loss) == pytest.approx(float(naive), rel=1e-10)


@pytest.mark.parametrize("overrides,fused", [
    ([], False),  # the default kl.mode is in the reward: advantages need pi_old first
    (["kl.mode=loss"], True),
    (["kl.mode=loss", "pi_old=recompute"], False),
    # pi_old is the train-time policy, not the sampler's: the update's forward is on it
    (["kl.mode=loss", "max_staleness=1"], True),
    (["kl.mode=loss", "ppo_epochs=2"], False),
    (["kl.mode=loss", "mini_batches=2"], False),
    (["kl.mode=loss", "advantage=gae"], False),
])
def test_pi_old_comes_from_the_update_only_when_it_is_the_same_forward(overrides, fused):
    from rlhf_ray.config import PPOConfig
    from rlhf_ray.config_loader import build_config
    from rlhf_ray.recipes.ppo import pi_old_in_update

    assert pi_old_in_update(build_config(PPOConfig, None, overrides)) is fused
