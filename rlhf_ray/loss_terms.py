"""Per-micro-batch loss terms of the learner's training steps (SFT, PPO, DPO, RM).

Pure torch, like :mod:`rlhf_ray.losses`: this module imports only torch, ``rlhf_ray.batch``
and ``rlhf_ray.losses`` (never ray, vllm, deepspeed or transformers), so every term can be
checked on small tensors without a worker.

Shapes: ``B`` rows of the micro-batch (sequences, or pairs for DPO/RM), ``T`` its padded
length, ``V`` the vocabulary size. Per-token quantities are next-token aligned, (B, T-1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_ray.advantages import kl_estimate
from rlhf_ray.batch import ExperienceBatch, PreferenceBatch, SequenceBatch
from rlhf_ray.experience import rollout_correction
from rlhf_ray.losses import (
    dpo_loss,
    entropy_bonus_loss,
    gspo_policy_loss,
    kl_penalty_loss,
    masked_sum,
    pairwise_reward_loss,
    ppo_policy_loss,
    sequence_logprobs,
    sft_loss,
    token_logprobs,
    value_loss,
)

# Each ``*_terms`` returns ``(losses, stats)`` for one micro-batch: one loss per engine,
# normalised by the GLOBAL count (tokens, sequences or pairs), so that summed over
# micro-batches and ranks it is the full-batch loss; each stat is weighted the same way, so
# the worker's sum over micro-batches and ranks is the global metric.

Terms = tuple[list[torch.Tensor], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class PPOLossSettings:
    """The knobs of :func:`ppo_terms`; the defaults are those of ``LearnerWorker.ppo_step``.

    clip_eps, clip_eps_high, dual_clip: see :func:`rlhf_ray.losses.ppo_policy_loss`.
    kl_coef: weight of the KL-to-reference term added to the policy loss (0: reported only).
    kl_estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (see :func:`rlhf_ray.losses.kl_penalty_loss`).
    value_clip_eps: clip range of the value loss, or None for the plain squared error.
    temperature: the sampling temperature; every log-prob (ratio, KL) and the entropy are
        those of ``softmax(logits / temperature)``, the distribution the rollouts sampled.
    aggregation: ``token_mean``, ``seq_mean_token_mean`` or ``seq_mean_token_sum_norm``
        (Dr. GRPO: each sequence's token sum over ``norm_len``); see :func:`rlhf_ray.losses.aggregate`.
    norm_len: the constant of ``seq_mean_token_sum_norm`` (the generation budget).
    policy_loss: ``ppo`` (token ratios) or ``gspo`` (one length-normalised ratio per sequence,
        :func:`rlhf_ray.losses.gspo_policy_loss`).
    entropy_coef: weight of the entropy bonus (0: the entropy is only reported).
    rollout_correction, rollout_correction_cap, kl_metric_estimator: used only when the
        micro-batch has no old log-probs and pi_old is this forward's own policy (one update
        per batch, on-policy): the corrections the driver would otherwise apply before the
        update are applied here, from the same log-probs. The advantages are weighted by
        :func:`rlhf_ray.experience.rollout_correction` of pi_old against the rollouts'
        log-probs (``"none"``: not weighted), and ``kl/mean`` (the per-episode KL to the
        reference with ``kl_metric_estimator``, None: not reported) is added to the stats.
    """

    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    dual_clip: float | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    value_clip_eps: float | None = None
    temperature: float = 1.0
    aggregation: str = "token_mean"
    norm_len: float | None = None
    policy_loss: str = "ppo"
    entropy_coef: float = 0.0
    rollout_correction: str = "none"
    rollout_correction_cap: float = 2.0
    kl_metric_estimator: str | None = None


def sft_terms(logits: torch.Tensor, mb: SequenceBatch, aggregation: str, num_tokens: float,
              num_seqs: float) -> Terms:
    """Response-only cross entropy of one micro-batch.

    logits: (B, T, V), the policy's output on ``mb`` (B, T).
    num_tokens / num_seqs: global response tokens / sequences (the normaliser of
    ``aggregation``, ``"token_mean"`` or ``"seq_mean"``).
    Returns ``[loss]`` (0-d) and the stats ``policy/loss`` and ``perf/tokens`` (real tokens of
    ``mb``, a count).
    """
    loss = sft_loss(logits, mb.input_ids, mb.loss_mask, aggregation, num_tokens, num_seqs)
    return [loss], {"policy/loss": loss, "perf/tokens": mb.attention_mask.sum()}


def ppo_terms(logits: torch.Tensor, values: torch.Tensor | None, mb: ExperienceBatch,
              settings: PPOLossSettings, num_tokens: float, num_seqs: float,
              real_tokens: float, num_rows: float | None = None) -> Terms:
    """Clipped policy loss (+ ``kl_coef`` * KL to the reference) and, with ``values``, the
    value loss of one micro-batch.

    logits: (B, T, V), the policy's output on ``mb``; values: (B, T-1) fp32 critic values or
    None. ``mb``'s old/ref log-probs, advantages, returns and old values are (B, T-1).
    Missing old log-probs / old values mean on-policy (ratio 1, no clip).
    num_tokens / num_seqs: the loss normalisers of ``settings.aggregation``; real_tokens: the real
    global response-token count, which weights the token-mean stats (clip fractions,
    entropy, value mean); num_rows: the global row count, the denominator of ``kl/mean``.
    Returns ``[policy_loss]`` or ``[policy_loss, value_loss]`` (0-d each) and the stats.
    """
    if settings.temperature != 1.0:
        logits = logits / settings.temperature
    logprobs, entropy = token_logprobs(logits, mb.input_ids, with_entropy=True)  # (B, T-1) each
    return ppo_terms_from_logprobs(logprobs, entropy, values, mb, settings, num_tokens, num_seqs,
                                   real_tokens, num_rows, logits=logits)


def ppo_terms_from_logprobs(logprobs: torch.Tensor, entropy: torch.Tensor, values: torch.Tensor | None,
                            mb: ExperienceBatch, settings: PPOLossSettings, num_tokens: float,
                            num_seqs: float, real_tokens: float, num_rows: float | None = None,
                            logits: torch.Tensor | None = None) -> Terms:
    """:func:`ppo_terms` from the policy's (B, T-1) log-probs of ``mb``'s tokens (with
    gradient) and their entropy, at the sampling temperature (as
    :meth:`rlhf_ray.batch.SharedPromptBatch.token_logprobs` gives them). ``logits`` (the
    tempered (B, T, V) ones) are needed only for an entropy bonus (``settings.entropy_coef``)."""
    if settings.entropy_coef and logits is None:
        raise ValueError("ppo_terms_from_logprobs: an entropy bonus (entropy_coef > 0) needs the logits")
    agg = {"aggregation": settings.aggregation, "num_tokens": num_tokens, "num_seqs": num_seqs,
           "norm_len": settings.norm_len}
    mask = mb.response_mask
    share = mask.sum() / real_tokens  # weight of this micro-batch's token means
    advantages, stats = mb.advantages, {}
    if mb.old_logprobs is None:  # pi_old is this very forward's policy: ratio 1
        old = logprobs.detach()
        advantages, stats = _pi_old_corrections(old, mb, settings, share, num_seqs, num_rows)
    else:
        old = mb.old_logprobs
    policy_loss = gspo_policy_loss if settings.policy_loss == "gspo" else ppo_policy_loss
    loss, m = policy_loss(logprobs, old, advantages, mask, settings.clip_eps,
                          settings.clip_eps_high, settings.dual_clip, **agg)
    stats.update({"policy/loss": loss, **{f"policy/{k}": v * share for k, v in m.items()}})
    stats["policy/entropy"] = masked_sum(entropy, mask) / real_tokens
    if settings.entropy_coef:
        loss = loss + settings.entropy_coef * entropy_bonus_loss(logits[:, :-1], mask, **agg)
    if mb.ref_logprobs is not None:
        kl = kl_penalty_loss(logprobs, mb.ref_logprobs, mask, settings.kl_estimator, **agg)
        stats["kl/ref"] = kl
        if settings.kl_coef:
            loss = loss + settings.kl_coef * kl
    losses = [loss]
    if values is not None:
        old_v = values.detach() if mb.old_values is None else mb.old_values
        v_loss, vm = value_loss(values, old_v, mb.returns, mask, settings.value_clip_eps, **agg)
        losses.append(v_loss)
        stats.update({"value/loss": v_loss, "value/clip_frac": vm["value_clip_frac"] * share,
                      "value/mean": vm["values_mean"] * share})
    stats["perf/tokens"] = mb.attention_mask.sum()
    return losses, stats


def _pi_old_corrections(old: torch.Tensor, mb: ExperienceBatch, settings: PPOLossSettings,
                        share: torch.Tensor, num_seqs: float, num_rows: float | None
                        ) -> tuple[torch.Tensor, dict]:
    """What the driver computes from pi_old before an update, computed here when pi_old is
    the update's own forward (``old``, (B, T-1), detached): the advantages weighted by the
    rollout correction, and the stats ``rollout/mismatch_kl``, ``rollout/is_weight_mean``,
    ``rollout/is_clipped_frac`` and ``kl/mean``, weighted so that they sum to the whole
    batch's values over micro-batches and ranks."""
    mask = mb.response_mask
    advantages, stats = mb.advantages, {}
    if settings.rollout_correction != "none" and mb.rollout_logprobs is not None:
        weights, m = rollout_correction(old, mb.rollout_logprobs, mask, settings.rollout_correction,
                                        settings.rollout_correction_cap)
        advantages = advantages * weights
        # token means weigh by the micro-batch's tokens; mask's dropped share by its sequences
        seqs = (mask.sum(-1) > 0).sum() / num_seqs
        stats = {k: v * (seqs if k == "rollout/is_clipped_frac" and settings.rollout_correction == "mask"
                         else share) for k, v in m.items()}
    if settings.kl_metric_estimator is not None and mb.ref_logprobs is not None:
        per_row = (kl_estimate(old, mb.ref_logprobs, settings.kl_metric_estimator) * mask).sum(-1)
        stats["kl/mean"] = per_row.sum() / (num_rows or len(mb))
    return advantages, stats


def dpo_terms(logits: torch.Tensor, both: SequenceBatch, mb: PreferenceBatch, beta: float,
              loss_type: str, label_smoothing: float, num_pairs: float) -> Terms:
    """DPO/IPO loss of one micro-batch of B pairs.

    both: ``mb.stacked(pad_id)``, (2B, T), chosen rows first; logits: (2B, T, V), the
    policy's output on ``both``. ``mb`` carries the (B,) summed reference log-probs.
    num_pairs: global pair count; the mean loss of ``mb`` is weighted by ``B / num_pairs``.
    Returns ``[loss]`` (0-d) and the ``dpo/*`` stats.
    """
    logps = sequence_logprobs(logits, both.input_ids, both.loss_mask)
    return dpo_terms_from_logps(logps, mb, beta, loss_type, label_smoothing, num_pairs,
                                both.attention_mask.sum())


def dpo_terms_from_logps(logps: torch.Tensor, mb: PreferenceBatch, beta: float, loss_type: str,
                         label_smoothing: float, num_pairs: float, tokens: torch.Tensor) -> Terms:
    """:func:`dpo_terms` from the policy's (2B,) summed log-probs, chosen then rejected
    (as :class:`rlhf_ray.batch.SharedPromptRows` gives them); tokens: the tokens the
    forward computed, for ``perf/tokens``."""
    b = len(mb)
    out = dpo_loss(logps[:b], logps[b:], mb.ref_chosen_logps, mb.ref_rejected_logps, beta,
                   loss_type, label_smoothing)
    w = b / num_pairs
    return [out.loss * w], {
        "dpo/loss": out.loss * w, "dpo/accuracy": out.accuracy * w,
        "dpo/chosen_rewards": out.chosen_rewards.sum() / num_pairs,
        "dpo/rejected_rewards": out.rejected_rewards.sum() / num_pairs,
        "dpo/margin": out.margins.sum() / num_pairs,
        "dpo/chosen_logps": logps[:b].detach().sum() / num_pairs,
        "perf/tokens": tokens}


def rm_terms(scores: torch.Tensor, mb: PreferenceBatch, margin: float, num_pairs: float,
             tokens: torch.Tensor | None = None) -> Terms:
    """Pairwise (Bradley-Terry) reward-model loss of one micro-batch of B pairs.

    scores: (2B,) chosen then rejected, from :func:`rlhf_ray.models.sequence_scores` on
    ``mb.stacked(pad_id)`` or :meth:`rlhf_ray.batch.SharedPromptRows.scores`; margin:
    required score margin (0: none). tokens: the tokens the forward computed (default: both
    sides' rows, the two-row forward's).
    num_pairs: global pair count; the mean loss of ``mb`` is weighted by ``B / num_pairs``.
    Returns ``[loss]`` (0-d) and the ``rm/*`` stats.
    """
    b = len(mb)
    out = pairwise_reward_loss(scores[:b], scores[b:], margin or None)
    w = b / num_pairs
    if tokens is None:
        tokens = mb.chosen.attention_mask.sum() + mb.rejected.attention_mask.sum()
    return [out.loss * w], {
        "rm/loss": out.loss * w, "rm/accuracy": out.accuracy * w,
        "rm/chosen_score": out.chosen_mean * w, "rm/rejected_score": out.rejected_mean * w,
        "rm/margin": out.margin_mean * w,
        "perf/tokens": tokens}
