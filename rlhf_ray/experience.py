"""Scored episodes -> the tensors a policy-gradient update needs (pure torch, no Ray).

Shapes: B episodes, T padded tokens (prompt + response); per-token tensors are next-token
aligned, (B, T-1): position j holds the log-prob of token j+1.
"""

from __future__ import annotations

import torch

from rlhf_ray.advantages import (
    discounted_returns,
    expand_to_tokens,
    gae,
    grpo_advantages,
    kl_estimate,
    masked_whiten,
    reinforce_pp_baseline_advantages,
    reinforce_pp_returns,
    rloo_advantages,
    shape_rewards_with_kl,
)
from rlhf_ray.batch import Episode, ExperienceBatch, SequenceBatch

ESTIMATORS = ("gae", "grpo", "rloo", "reinforce++")


def _place(rows: list[list[float]], episodes: list[Episode], shape: tuple[int, int]) -> torch.Tensor:
    """Scatter per-response values (A_i,) into a next-token aligned (B, T-1) tensor."""
    out = torch.zeros(shape, dtype=torch.float32)
    for i, (values, e) in enumerate(zip(rows, episodes)):
        if len(values) != len(e.response_ids):
            raise ValueError(f"episode {i}: {len(values)} log-probs for {len(e.response_ids)} tokens")
        start = len(e.prompt_ids) - 1
        out[i, start: start + len(values)] = torch.tensor(values, dtype=torch.float32)
    return out


def episodes_to_batch(episodes: list[Episode], pad_id: int) -> ExperienceBatch:
    """Pack episodes into an ExperienceBatch with ``rollout_logprobs`` and ``old_logprobs``
    (both as sampled, until the learners recompute ``old_logprobs``) and ``ref_logprobs``
    (if every episode has them); advantages are filled in later."""
    base = SequenceBatch.from_pairs([(e.prompt_ids, e.response_ids) for e in episodes], pad_id)
    for i, e in enumerate(episodes):  # multi-turn: environment tokens are context, not targets
        if e.response_mask is not None:
            if len(e.response_mask) != len(e.response_ids):
                raise ValueError(f"episode {i}: response_mask has {len(e.response_mask)} entries for "
                                 f"{len(e.response_ids)} response tokens")
            start = len(e.prompt_ids)
            base.loss_mask[i, start: start + len(e.response_ids)] = torch.tensor(e.response_mask,
                                                                                   dtype=base.loss_mask.dtype)
    shape = (len(episodes), base.input_ids.shape[1] - 1)
    old = _place([e.logprobs for e in episodes], episodes, shape)
    ref = (_place([e.ref_logprobs for e in episodes], episodes, shape)
           if all(e.ref_logprobs is not None for e in episodes) else None)
    versions = torch.tensor([e.policy_version for e in episodes], dtype=torch.long)
    return ExperienceBatch(base.input_ids, base.attention_mask, base.loss_mask,
                           old_logprobs=old, rollout_logprobs=old.clone(), ref_logprobs=ref,
                           policy_versions=versions)


def turn_rewards(episodes: list[Episode], scores: torch.Tensor, shape: tuple[int, int]
                 ) -> torch.Tensor | None:
    """(B, T-1) token rewards of multi-turn episodes (next-token aligned, like the log-probs);
    None if no episode has turns. Each turn's reward sits on the turn's last policy token,
    and whatever of ``scores[i]`` (B,) the turns do not account for on the last response
    token: all of it for a single-turn episode, a penalty the driver added to the score
    (e.g. overlong) otherwise. Row i sums to ``scores[i]``."""
    if all(e.turn_ends is None for e in episodes):
        return None
    out = torch.zeros(shape, dtype=torch.float32)
    for i, e in enumerate(episodes):
        start = len(e.prompt_ids) - 1
        placed = 0.0
        for end, reward in zip(e.turn_ends or [], e.turn_rewards or []):
            out[i, start + end] += float(reward)
            placed += float(reward)
        out[i, start + len(e.response_ids) - 1] += float(scores[i]) - placed
    return out


def critic_free_advantages(batch: ExperienceBatch, scores: torch.Tensor, estimator: str,
                           group_size: int, kl_coef: float = 0.0, kl_estimator: str = "k1",
                           gamma: float = 1.0, normalize_std: bool = True
                           ) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token advantages (B, T-1) for ``grpo``, ``rloo``, ``reinforce++`` or
    ``reinforce++-baseline``. ``normalize_std=False``: GRPO without the group std (Dr. GRPO).

    ``scores`` (B,) are the task rewards; rows [g*G, (g+1)*G) share a prompt. With
    ``kl_coef`` > 0 (KL in the reward) the penalty is applied per token, as the KL still to
    come, and never normalised:

        grpo / rloo:  A_t = group_advantage(score) - kl_coef * sum_{t' >= t} kl_t'
        reinforce++:  returns of the KL-shaped token rewards, whitened over the batch
        reinforce++-baseline: (score - group mean) - kl_coef * sum_{t' >= t} kl_t',
                      whitened over the batch

    so the group baseline and its std see only the task score: a group whose samples all
    scored alike gets advantages made of its KL penalty alone, not KL noise scaled up to
    unit size. ``kl_t`` is :func:`kl_estimate` of the sampled tokens (``kl_estimator``).
    """
    mask = batch.response_mask
    if kl_coef and batch.ref_logprobs is not None:
        kl = kl_estimate(batch.old_logprobs, batch.ref_logprobs, kl_estimator) * mask
    else:
        kl = torch.zeros_like(mask)
    if estimator in ("grpo", "rloo"):
        group = grpo_advantages(scores, group_size, normalize_std=normalize_std) \
            if estimator == "grpo" else rloo_advantages(scores, group_size)
        adv = expand_to_tokens(group, mask) - kl_coef * discounted_returns(kl, mask, 1.0)
    elif estimator == "reinforce++-baseline":
        adv = reinforce_pp_baseline_advantages(scores, group_size, mask, -kl_coef * kl if kl_coef else None)
    elif estimator == "reinforce++":
        rewards = shape_rewards_with_kl(scores, kl, mask, kl_coef)
        adv, _ = reinforce_pp_returns(rewards, mask, gamma)
    else:
        raise ValueError(f"advantage estimator {estimator!r} is not critic-free; choose one of "
                         "grpo, rloo, reinforce++, reinforce++-baseline (gae needs a value model)")
    metrics = {"policy/advantage_mean": float((adv * mask).sum() / mask.sum().clamp(min=1))}
    return adv, metrics


def gae_advantages(batch: ExperienceBatch, scores: torch.Tensor, values: torch.Tensor,
                   kl_coef: float, kl_estimator: str = "k1", gamma: float = 1.0,
                   lam: float = 0.95, token_scores: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """PPO with a value model: KL-shaped token rewards, then GAE. Returns (adv, returns, metrics).

    ``token_scores`` (B, T-1), from :func:`turn_rewards`: multi-turn rewards placed on each
    turn's last policy token, used instead of ``scores`` on the last token. GAE steps over
    the environment's tokens (masked), so "next" is the policy's next token."""
    mask = batch.response_mask
    kl = (kl_estimate(batch.old_logprobs, batch.ref_logprobs, kl_estimator)
          if batch.ref_logprobs is not None else torch.zeros_like(mask))
    if token_scores is not None:
        rewards = shape_rewards_with_kl(torch.zeros_like(scores), kl, mask, kl_coef) + token_scores * mask
    else:
        rewards = shape_rewards_with_kl(scores, kl, mask, kl_coef)
    adv, returns = gae(rewards, values * mask, mask, gamma, lam)
    # Whitened advantages keep a fresh (badly calibrated) value model from pushing every
    # token one way; the returns stay unwhitened as the value targets.
    adv = masked_whiten(adv, mask)
    kl_seq = (kl * mask).sum(-1)
    return adv, returns, {"kl/mean": float(kl_seq.mean()), "kl/coef": float(kl_coef)}


CORRECTIONS = ("none", "tis", "mask")


def rollout_correction(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                       response_mask: torch.Tensor, mode: str = "tis", cap: float = 2.0
                       ) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token loss weights (B, A) for the gap between the policy the learners train from
    (``old_logprobs``, pi_old) and the engine that sampled (``rollout_logprobs``, pi_rollout).

    With ``r_t = pi_old(a_t) / pi_rollout(a_t)``:

    * ``tis``: truncated importance sampling, ``w_t = min(r_t, cap)`` per token;
    * ``mask``: per sequence, ``w = 1`` if its geometric-mean ratio
      ``exp(mean_t log r_t)`` lies in ``[1/cap, cap]``, else 0 (the whole sequence is dropped);
    * ``none``: ``w = 1``.

    The weights multiply the advantages; for ``w >= 0`` that is the same as weighting each
    token's clipped surrogate, since ``min(r w A, clip(r) w A) = w min(r A, clip(r) A)``.
    Metrics: ``rollout/mismatch_kl`` (k3 estimate of KL(pi_rollout || pi_old) per token on
    the sampled tokens), ``rollout/is_weight_mean`` (raw ``r_t``, token mean),
    ``rollout/is_clipped_frac`` (tokens capped, or sequences masked).
    """
    if mode not in CORRECTIONS:
        raise ValueError(f"rollout_correction {mode!r}: choose one of {CORRECTIONS}")
    if cap <= 1.0:
        raise ValueError(f"rollout_correction_cap: expected > 1, got {cap}")
    mask = response_mask.to(old_logprobs.dtype)
    log_ratio = (old_logprobs - rollout_logprobs) * mask
    ratio = torch.exp(log_ratio)
    tokens = mask.sum().clamp(min=1)
    metrics = {"rollout/mismatch_kl": float(((ratio - 1 - log_ratio) * mask).sum() / tokens),
               "rollout/is_weight_mean": float((ratio * mask).sum() / tokens)}
    if mode == "tis":
        weights = ratio.clamp(max=cap) * mask
        metrics["rollout/is_clipped_frac"] = float(((ratio > cap).to(mask.dtype) * mask).sum() / tokens)
    elif mode == "mask":
        seq_log_ratio = log_ratio.sum(-1) / mask.sum(-1).clamp(min=1)
        keep = (seq_log_ratio.abs() <= torch.log(torch.tensor(cap, dtype=mask.dtype))).to(mask.dtype)
        weights = keep[:, None] * mask
        metrics["rollout/is_clipped_frac"] = float(1.0 - keep.mean())
    else:
        weights = mask.clone()
        metrics["rollout/is_clipped_frac"] = 0.0
    return weights, metrics
