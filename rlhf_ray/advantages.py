"""Rewards, KL control and advantage estimators for RLHF (PPO, GRPO, RLOO, REINFORCE++).

Pure torch: this module must never import ray, vllm, deepspeed or transformers.

Shape conventions: ``B`` - batch size (sequences), ``A`` - response length (right-padded),
``G`` - group size (number of samples per prompt). Per-token tensors are (B, A) and aligned
with the response tokens; ``response_mask`` is 1 on real response tokens and 0 on padding.
Masks may be ``bool`` or float 0/1.
"""

from __future__ import annotations

from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")


def _float_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    dtype = like.dtype if like.is_floating_point() else torch.float32
    return mask.to(dtype)


# --- KL estimators and reward shaping -------------------------------------------------------------


def kl_estimate(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from tokens sampled by the policy.

    Following Schulman, "Approximating KL divergence" (2020), with ``d = ref - logp``:

    * ``"k1"``: ``-d = logp - ref`` (unbiased, high variance, can be negative);
    * ``"k2"``: ``0.5 * d^2`` (biased, low variance, non-negative);
    * ``"k3"``: ``exp(d) - d - 1`` (unbiased, low variance, non-negative).

    Args:
        logprobs: (B, A) policy log-probs of the sampled tokens.
        ref_logprobs: (B, A) reference log-probs of the same tokens.
        estimator: one of ``"k1"``, ``"k2"``, ``"k3"``.

    Returns:
        (B, A) per-token estimates (padding positions are not masked here).
    """
    d = ref_logprobs - logprobs
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.expm1(d) - d
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")


def _last_token_index(response_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last set position of each row of a (B, A) mask; error on empty rows."""
    m = response_mask.bool()
    if not bool(m.any(dim=-1).all()):
        raise ValueError("every row of response_mask needs at least one response token")
    length = m.shape[-1]
    return length - 1 - m.flip(-1).int().argmax(dim=-1)


def shape_rewards_with_kl(
    scores: torch.Tensor,
    kl: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
) -> torch.Tensor:
    """Per-token PPO rewards: a KL penalty on every token plus the episode score at the end.

    ``rewards[b, t] = -kl_coef * kl[b, t]`` on response tokens, 0 on padding, and
    ``scores[b]`` is added on the *last* response token of row ``b`` (the last set position
    of the mask, so ragged lengths and any padding after the response are handled).

    Args:
        scores: (B,) scalar episode rewards (e.g. from the reward model).
        kl: (B, A) per-token KL estimates (see :func:`kl_estimate`).
        response_mask: (B, A); every row must contain at least one response token.
        kl_coef: KL coefficient beta (float, or 0-d tensor).

    Returns:
        (B, A) token rewards.
    """
    m = _float_mask(response_mask, kl)
    rewards = -kl_coef * kl * m
    last = _last_token_index(response_mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] = rewards[rows, last] + scores.to(rewards.dtype)
    return rewards


class FixedKLController:
    """Constant KL coefficient; ``update`` is a no-op."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Ignore the measurement (kept for interface parity with the adaptive controller)."""


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. (2019), "Fine-Tuning LMs from Human Prefs".

    After observing a mean KL ``current_kl`` over ``n_steps`` samples::

        err = clip(current_kl / target - 1, -0.2, 0.2)
        value *= 1 + err * n_steps / horizon
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError("target and horizon must be > 0")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move the coefficient towards keeping the KL at ``target``."""
        err = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon


# --- Token-level advantage estimators -------------------------------------------------------------


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016) over the response tokens.

    Runs the backward recursion ``delta_t = r_t + gamma V_next - V_t``,
    ``A_t = delta_t + gamma lam A_next`` where "next" is the next *response* token of the row:
    masked positions are skipped (their reward and value are ignored), so right padding and
    ragged lengths are handled, and the value after the last response token is 0 (terminal).

    Args:
        rewards: (B, A) token rewards (e.g. from :func:`shape_rewards_with_kl`).
        values: (B, A) critic values of the states before each response token.
        response_mask: (B, A).
        gamma: discount factor.
        lam: GAE lambda.

    Returns:
        ``(advantages, returns)``, both (B, A) and detached, with ``returns = advantages +
        values`` on response tokens; both are 0 at masked positions. With ``gamma = lam = 1``
        the advantage is the reward-to-go minus the value.
    """
    m = _float_mask(response_mask, rewards)
    rewards = rewards.detach()
    values = values.detach()
    batch, length = rewards.shape
    next_adv = rewards.new_zeros(batch)
    next_value = rewards.new_zeros(batch)
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(length)):
        mt = m[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        advantages[:, t] = adv_t * mt
        next_adv = torch.where(mt > 0, adv_t, next_adv)
        next_value = torch.where(mt > 0, values[:, t], next_value)
    returns = (advantages + values) * m
    return advantages, returns


def discounted_returns(
    rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float = 1.0
) -> torch.Tensor:
    """Discounted reward-to-go over the response tokens, skipping masked positions.

    Args:
        rewards: (B, A).
        response_mask: (B, A).
        gamma: discount factor.

    Returns:
        (B, A) ``G_t = r_t + gamma G_next`` on response tokens, 0 at masked positions.
    """
    m = _float_mask(response_mask, rewards)
    running = rewards.new_zeros(rewards.shape[0])
    out = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        mt = m[:, t]
        g = rewards[:, t] * mt + gamma * running
        out[:, t] = g * mt
        running = torch.where(mt > 0, g, running)
    return out


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise ``x`` to zero mean and unit variance over the masked positions.

    Statistics are computed over all set positions of ``mask`` (the whole batch), using the
    population variance (no Bessel correction), so the masked mean of the result is 0 and its
    masked mean square is ``var / (var + eps)`` ~ 1.

    Args:
        x: any shape, e.g. (B, A).
        mask: same shape as ``x``.
        shift_mean: if False, the mean is added back (only the scale is normalised).
        eps: added to the variance.

    Returns:
        Tensor shaped like ``x``; 0 at masked positions.
    """
    m = _float_mask(mask, x)
    count = m.sum().clamp_min(1.0)
    mean = (x * m).sum() / count
    var = (((x - mean) * m) ** 2).sum() / count
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def reinforce_pp_returns(
    rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025): discounted returns whitened across the whole batch.

    Args:
        rewards: (B, A) token rewards (typically KL-shaped, score on the last token).
        response_mask: (B, A).
        gamma: discount factor.

    Returns:
        ``(advantages, returns)``, both (B, A): ``returns`` is the discounted reward-to-go and
        ``advantages`` is ``masked_whiten(returns)`` over every response token of the batch;
        both are 0 at masked positions.
    """
    returns = discounted_returns(rewards.detach(), response_mask, gamma)
    return masked_whiten(returns, response_mask), returns


# --- Sequence-level (group) advantage estimators --------------------------------------------------


def _grouped(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (B,), got shape {tuple(scores.shape)}")
    if group_size < 1 or scores.shape[0] % group_size != 0:
        raise ValueError(
            f"batch size {scores.shape[0]} is not a multiple of group_size {group_size}"
        )
    return scores.view(-1, group_size)


def grpo_advantages(
    scores: torch.Tensor, group_size: int, eps: float = 1e-6, normalize_std: bool = True
) -> torch.Tensor:
    """GRPO outcome advantages (Shao et al. 2024): score normalised within its prompt group.

    Rows are grouped contiguously: rows ``[g*G, (g+1)*G)`` are samples of the same prompt.
    ``adv_i = (r_i - mean_g) / (std_g + eps)``, with the unbiased (Bessel-corrected) group
    standard deviation as in TRL and verl; ``normalize_std=False`` gives ``r_i - mean_g``
    (Dr. GRPO). A group of identical scores gets advantage 0. ``G = 1`` gives all zeros.

    Args:
        scores: (B,) episode scores, ``B % G == 0``.
        group_size: G.
        eps: added to the standard deviation.
        normalize_std: divide by the group standard deviation.

    Returns:
        (B,) advantages (detached); broadcast with :func:`expand_to_tokens`.
    """
    grouped = _grouped(scores.detach(), group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_std:
        if group_size > 1:
            std = grouped.std(dim=1, keepdim=True)
        else:
            std = torch.zeros_like(centred)
        centred = centred / (std + eps)
    return centred.reshape(-1)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024).

    ``adv_i = r_i - mean_{j != i} r_j`` within each contiguous group of ``G`` rows.

    Args:
        scores: (B,) episode scores, ``B % G == 0``.
        group_size: G, at least 2.

    Returns:
        (B,) advantages (detached).
    """
    if group_size < 2:
        raise ValueError(f"RLOO needs group_size >= 2, got {group_size}")
    grouped = _grouped(scores.detach(), group_size)
    others_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others_mean).reshape(-1)


def expand_to_tokens(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Broadcast per-sequence advantages to every response token.

    Args:
        advantages: (B,).
        response_mask: (B, A).

    Returns:
        (B, A) with ``advantages[b]`` on the response tokens of row ``b`` and 0 on padding.
    """
    return advantages.unsqueeze(-1) * _float_mask(response_mask, advantages)
