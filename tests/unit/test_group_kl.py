"""GRPO / RLOO with the KL penalty in the reward: the group normalisation sees the task score
only; the penalty -kl_coef * (KL still to come) is added per token, unnormalised."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.batch import Episode
from rlhf_ray.experience import critic_free_advantages, episodes_to_batch

COEF = 0.05


def group(scores: list[float], kls: list[list[float]]) -> tuple:
    """One prompt's samples: response token j has log-prob -1 and reference log-prob -1 - kl_j,
    so its k1 estimate is exactly kl_j."""
    episodes = [Episode([5, 6], [7 + j for j in range(len(kl))], "", "", [-1.0] * len(kl), "stop", 0,
                        prompt_index=0, sample_index=i, score=s,
                        ref_logprobs=[-1.0 - k for k in kl])
                for i, (s, kl) in enumerate(zip(scores, kls))]
    return episodes_to_batch(episodes, pad_id=0), torch.tensor(scores)


KLS = [[0.1, 0.4], [0.0, 0.0, 0.3], [0.2], [0.5, 0.1, 0.1]]


def kl_to_go(kl: list[float]) -> list[float]:
    return [sum(kl[t:]) for t in range(len(kl))]


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_a_group_of_equal_scores_gets_the_kl_term_alone(estimator):
    """All four samples scored 0: nothing to learn from the task, so each token's advantage is
    -coef times its KL to come, not KL noise divided by a tiny std."""
    batch, scores = group([0.0, 0.0, 0.0, 0.0], KLS)
    adv, _ = critic_free_advantages(batch, scores, estimator, 4, kl_coef=COEF, kl_estimator="k1")
    for i, kl in enumerate(KLS):
        response = adv[i, 1: 1 + len(kl)]  # response token j sits at next-token position 1 + j
        assert response.tolist() == pytest.approx([-COEF * k for k in kl_to_go(kl)], abs=1e-7)
    assert adv.abs().max() <= COEF * 0.7 + 1e-7  # the largest KL to come is 0.7


def test_unequal_scores_keep_the_group_advantage_and_add_the_penalty():
    scores = [1.0, 0.0, 0.0, 1.0]
    batch, t = group(scores, KLS)
    adv, _ = critic_free_advantages(batch, t, "grpo", 4, kl_coef=COEF, kl_estimator="k1")
    plain, _ = critic_free_advantages(batch, t, "grpo", 4)
    normalised = (t - t.mean()) / (t.std() + 1e-6)
    for i, kl in enumerate(KLS):
        assert plain[i, 1: 1 + len(kl)].tolist() == pytest.approx([float(normalised[i])] * len(kl), abs=1e-5)
        assert (adv - plain)[i, 1: 1 + len(kl)].tolist() == pytest.approx(
            [-COEF * k for k in kl_to_go(kl)], abs=1e-6)
    assert float(((adv - plain) * (1 - batch.response_mask)).abs().max()) == 0.0  # nothing outside responses


def test_dr_grpo_and_reinforce_pp_baseline_through_the_driver_function():
    """critic_free_advantages routes grpo.normalize_std=false and reinforce++-baseline to the
    pure math: unnormalised group centring, and group centring whitened over the batch."""
    from rlhf_ray.advantages import masked_whiten

    scores = [1.0, 0.0, 0.0, 0.0]
    batch, t = group(scores, KLS)
    mask = batch.response_mask
    dr, _ = critic_free_advantages(batch, t, "grpo", 4, normalize_std=False)
    for i, kl in enumerate(KLS):
        assert dr[i, 1: 1 + len(kl)].tolist() == pytest.approx([scores[i] - 0.25] * len(kl))
    baseline, _ = critic_free_advantages(batch, t, "reinforce++-baseline", 4)
    centred = torch.zeros_like(mask)
    for i, kl in enumerate(KLS):
        centred[i, 1: 1 + len(kl)] = scores[i] - 0.25
    assert torch.allclose(baseline, masked_whiten(centred, mask) * mask, atol=1e-6)
    with_kl, _ = critic_free_advantages(batch, t, "reinforce++-baseline", 4, kl_coef=COEF)
    assert not torch.allclose(with_kl, baseline, atol=1e-4)  # the KL enters before whitening
