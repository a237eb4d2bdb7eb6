"""Rewards, KL control and advantage estimators for RLHF (PPO, GRPO, RLOO, REINFORCE++).

Pure torch: this module must never import ray, vllm, deepspeed or transformers.

Shape conventions: ``B`` - batch size (sequences), ``A`` - response length (right-padded),
``G`` - group size (number of samples per prompt). Per-token tensors are (B, A) and aligned
with the response tokens; ``response_mask`` is 1 on real response tokens and 0 on padding.
Masks may be ``bool`` or float 0/1.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def reinforce_pp_baseline_advantages(
    scores: torch.Tensor,
    group_size: int,
    response_mask: torch.Tensor,
    token_rewards: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """REINFORCE++-baseline (Hu et al. 2025): group-mean baseline, then batch whitening.

    With ``c_i = r_i - mean_{j in group(i)} r_j`` (rows grouped contiguously by ``G``)::

        x[b, t] = c_b + sum_{t' >= t, t' in response} token_rewards[b, t']   (response tokens)
        adv     = masked_whiten(x, response_mask)

    i.e. the centred score broadcast to every response token (plus, optionally, the
    reward-to-go of extra per-token rewards such as ``-kl_coef * kl``, gamma = 1), whitened
    with the mean and population std over *all response tokens of the batch* (so a long
    response weighs more in the statistics, as in :func:`masked_whiten`). Unlike GRPO there
    is no per-group std, so a group of identical scores has ``c = 0`` and does not blow up.

    Args:
        scores: (B,) episode scores, ``B % G == 0``.
        group_size: G.
        response_mask: (B, A).
        token_rewards: optional (B, A) extra per-token rewards (not centred).
        eps: added to the variance in :func:`masked_whiten`.

    Returns:
        (B, A) advantages (detached), 0 on padding.
    """
    grouped = _grouped(scores.detach(), group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    m = _float_mask(response_mask, centred)
    x = centred.unsqueeze(-1) * m
    if token_rewards is not None:
        x = x + discounted_returns(token_rewards.detach().to(x.dtype), response_mask, 1.0)
    return masked_whiten(x, response_mask, eps=eps)


# --- DAPO: dynamic sampling and overlong responses ------------------------------------------------


def zero_variance_groups(
    scores: torch.Tensor, group_size: int, atol: float = 1e-6
) -> torch.Tensor:
    """(B / G,) bool: True for the groups whose G scores are all equal (within ``atol``).

    Such a group has zero GRPO/RLOO advantage on every sample, so it contributes no policy
    gradient; DAPO's *dynamic sampling* drops these groups and samples more prompts until
    the batch is full of informative groups. A group is constant when
    ``max_j r_j - min_j r_j <= atol``. ``G = 1`` makes every group constant.

    Args:
        scores: (B,) episode scores, rows ``[g*G, (g+1)*G)`` belong to group ``g``.
        group_size: G.
        atol: absolute tolerance on the score range of a group.
    """
    grouped = _grouped(scores.detach(), group_size)
    spread = grouped.max(dim=1).values - grouped.min(dim=1).values
    return spread <= atol


def kept_group_rows(keep_groups: torch.Tensor, group_size: int) -> torch.Tensor:
    """(K * G,) long row indices of the kept groups, in order, each group's rows contiguous.

    ``keep_groups`` is a (B / G,) bool mask over groups (``K`` of them set), e.g.
    ``~zero_variance_groups(scores, G)``; index any (B, ...) tensor with the result (or a
    list of episodes with ``[episodes[i] for i in idx.tolist()]``) to keep whole groups.
    """
    if keep_groups.dim() != 1:
        raise ValueError(f"keep_groups must be 1-D, got shape {tuple(keep_groups.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    groups = torch.nonzero(keep_groups.bool(), as_tuple=False).reshape(-1)
    offsets = torch.arange(group_size, device=groups.device)
    return (groups.unsqueeze(-1) * group_size + offsets).reshape(-1)


def overlong_penalty(
    response_lengths: torch.Tensor,
    max_new_tokens: int,
    buffer_len: int,
    penalty_factor: float = 1.0,
) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025), a (B,) reward to add to the scores.

    With ``L = max_new_tokens``, ``C = buffer_len`` and ``n`` a response length::

        0                              if n <= L - C
        -penalty_factor * (n - (L - C)) / C    if L - C < n <= L
        -penalty_factor                if n > L

    so the penalty falls linearly from 0 at ``n = L - C`` to ``-penalty_factor`` at ``n = L``.
    ``C = 0`` gives 0 up to ``L`` and ``-penalty_factor`` beyond it.

    The hard alternative, *overlong filtering*, gives truncated responses zero loss weight
    instead: see :func:`overlong_keep_mask`.

    Args:
        response_lengths: (B,) number of generated tokens of each response (int or float).
        max_new_tokens: the generation budget L.
        buffer_len: the punishment interval C, ``0 <= C <= L``.
        penalty_factor: the penalty at ``n = L`` (positive number; the result is <= 0).

    Returns:
        (B,) floating tensor (float32 for integer lengths).
    """
    if not 0 <= buffer_len <= max_new_tokens:
        raise ValueError(f"need 0 <= buffer_len <= max_new_tokens, got {buffer_len}, "
                         f"{max_new_tokens}")
    n = response_lengths if response_lengths.is_floating_point() else response_lengths.float()
    start = max_new_tokens - buffer_len
    if buffer_len > 0:
        frac = ((n - start) / buffer_len).clamp(0.0, 1.0)
    else:
        frac = (n > max_new_tokens).to(n.dtype)
    return -penalty_factor * frac


def overlong_keep_mask(truncated: torch.Tensor | Sequence[str]) -> torch.Tensor:
    """(B,) bool keep-mask for DAPO's *overlong filtering*: False for truncated responses.

    ``truncated`` is either a (B,) bool tensor (True where the response hit the length limit)
    or a sequence of B vLLM finish reasons (``"length"`` means truncated; ``"stop"`` and
    anything else are kept). A truncated response has no meaningful outcome, so instead of
    being punished it gets zero loss weight: multiply it into the response mask,
    ``response_mask * keep[:, None]``, *after* the group advantages were computed from all
    scores, and compute the global ``num_tokens`` from the masked mask.
    """
    if isinstance(truncated, torch.Tensor):
        if truncated.dim() != 1:
            raise ValueError(f"truncated must be (B,), got shape {tuple(truncated.shape)}")
        return ~truncated.bool()
    return torch.tensor([reason != "length" for reason in truncated], dtype=torch.bool)
