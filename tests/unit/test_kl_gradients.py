"""What a KL estimator does as a loss, by exact enumeration over a small vocabulary.

A one-token policy pi = softmax(theta) over V tokens and a fixed reference q. As a loss on
tokens sampled from pi (on-policy: the samples carry no gradient), estimator k contributes
grad_theta k(a) for each sample a, so its expected gradient is sum_a pi(a) grad_theta k(a).
That sum is computed exactly here and compared with the gradient of each KL direction.
"""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.advantages import kl_estimate
from rlhf_ray.config import KLConfig
from rlhf_ray.config_loader import ConfigError, build_config

V = 7
DT = torch.float64


def setup(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(V, generator=gen, dtype=DT)
    ref_logprobs = torch.log_softmax(torch.randn(V, generator=gen, dtype=DT), -1)
    return theta, ref_logprobs


def expected_loss_gradient(theta: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """sum_a pi(a) * grad_theta k(a; theta), the weights pi(a) held fixed (sampled tokens)."""
    theta = theta.clone().requires_grad_(True)
    logprobs = torch.log_softmax(theta, -1)
    weights = logprobs.detach().exp()
    per_token = kl_estimate(logprobs, ref_logprobs, estimator)
    (grad,) = torch.autograd.grad((weights * per_token).sum(), theta)
    return grad


def kl_gradient(theta: torch.Tensor, ref_logprobs: torch.Tensor, direction: str) -> torch.Tensor:
    theta = theta.clone().requires_grad_(True)
    logprobs = torch.log_softmax(theta, -1)
    if direction == "policy||ref":
        kl = (logprobs.exp() * (logprobs - ref_logprobs)).sum()
    else:  # ref||policy
        kl = (ref_logprobs.exp() * (ref_logprobs - logprobs)).sum()
    (grad,) = torch.autograd.grad(kl, theta)
    return grad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k3_loss_follows_the_gradient_of_kl_ref_to_policy(seed):
    theta, ref = setup(seed)
    got = expected_loss_gradient(theta, ref, "k3")
    assert torch.allclose(got, kl_gradient(theta, ref, "ref||policy"), atol=1e-12)
    assert not torch.allclose(got, kl_gradient(theta, ref, "policy||ref"), atol=1e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k2_loss_follows_the_gradient_of_kl_policy_to_ref(seed):
    theta, ref = setup(seed)
    got = expected_loss_gradient(theta, ref, "k2")
    assert torch.allclose(got, kl_gradient(theta, ref, "policy||ref"), atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k1_loss_has_zero_expected_gradient(seed):
    theta, ref = setup(seed)
    assert kl_gradient(theta, ref, "policy||ref").abs().max() > 1e-2  # there is a KL to follow
    assert expected_loss_gradient(theta, ref, "k1").abs().max() < 1e-12  # ... and k1 ignores it


def test_the_config_refuses_k1_as_a_loss_and_keeps_k1_in_the_reward():
    from rlhf_ray.config import PPOConfig

    with pytest.raises(ConfigError, match="kl.loss_estimator: k1 has zero expected gradient"):
        build_config(PPOConfig, None, ["kl.mode=loss", "kl.loss_estimator=k1"])
    cfg = build_config(PPOConfig, None, [])
    assert (cfg.kl.reward_estimator, cfg.kl.loss_estimator) == ("k1", "k3") == \
        (KLConfig().reward_estimator, KLConfig().loss_estimator)
    with pytest.raises(ConfigError, match="unknown key 'kl.estimator'.*reward_estimator"):
        build_config(PPOConfig, None, ["kl.estimator=k3"])  # the old key names the new ones
