"""Loss functions for SFT, reward modelling, DPO and PPO.

Pure torch: this module must never import ray, vllm, deepspeed or transformers.

Shapes: ``B`` batch size (sequences), ``T`` full length (prompt + response), ``A`` response
length, ``V`` vocabulary size. Masks may be ``bool`` or float 0/1 tensors.

Loss aggregation and gradient-accumulation / data-parallel invariance
---------------------------------------------------------------------
A "mean over tokens" computed per micro-batch is *not* the mean over the global batch when
micro-batches hold different numbers of response tokens: averaging micro-batch means weights
every micro-batch equally instead of every token. :func:`aggregate` therefore accepts a
*global normaliser*:

* ``mode="token_mean"``: ``loss = sum(loss_per_token * mask) / num_tokens`` where
  ``num_tokens`` is the number of response tokens in the whole global batch (all micro-batches
  on all data-parallel ranks).
* ``mode="seq_mean_token_mean"`` (alias ``"seq_mean"``): each sequence's loss is the mean
  over its own response tokens, and ``loss = sum(seq_losses) / num_seqs`` where ``num_seqs``
  is the number of sequences in the global batch.
* ``mode="seq_mean_token_sum_norm"`` (Dr. GRPO, Liu et al. 2025): each sequence's loss is the
  *sum* over its response tokens divided by a constant ``norm_len`` (the generation budget,
  e.g. ``max_new_tokens``), and ``loss = sum(seq_losses) / num_seqs``. ``norm_len`` must be
  the same constant for every micro-batch (never a padded width), so it has no default.

With these normalisers the micro-batch losses simply *sum* to the full-batch loss, so calling
``backward()`` on each micro-batch loss and accumulating gradients gives exactly the full-batch
gradient. Data-parallel frameworks (DDP, DeepSpeed) *average* gradients over ``world_size``
ranks, so each rank should multiply its loss by ``world_size`` to get the same gradient (or
the caller divides the normaliser by ``world_size``). When the normaliser is omitted the local
count is used, which is correct for a single, un-split batch.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from rlhf_ray.advantages import KLEstimator, kl_estimate

LOSS_KL_ESTIMATORS: tuple[str, ...] = ("k2", "k3")  # k1 has zero expected gradient as a loss

Aggregation = Literal[
    "token_mean", "seq_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"
]
Normaliser = float | torch.Tensor | None
AGGREGATIONS: tuple[str, ...] = (
    "token_mean", "seq_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"
)
# aggregations whose normaliser is the global number of sequences
SEQ_AGGREGATIONS: tuple[str, ...] = ("seq_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
DPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo")

# Log-ratios beyond this are clamped before exp() so that a stale sample cannot overflow.
_MAX_LOG_RATIO = 20.0


# --- Masked reductions and aggregation ------------------------------------------------------------


def _float_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Return ``mask`` as a tensor of ``like``'s floating dtype."""
    dtype = like.dtype if like.is_floating_point() else torch.float32
    return mask.to(dtype)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` (e.g. (B, A)) where ``mask`` (same shape) is set.

    Reduces over ``dim`` only (e.g. ``dim=-1`` gives (B,)), or over everything (0-d) if None.
    """
    masked = x * _float_mask(mask, x)
    return masked.sum() if dim is None else masked.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` (e.g. (B, A)) over the positions where ``mask`` (same shape) is set.

    Reduces over ``dim`` only (e.g. ``dim=-1`` gives (B,)), or over everything (0-d) if None.
    The mean over an empty mask is defined as 0 (never NaN).
    """
    m = _float_mask(mask, x)
    total = masked_sum(x, m, dim)
    count = m.sum() if dim is None else m.sum(dim=dim)
    return torch.where(count > 0, total / count.clamp_min(1e-12), torch.zeros_like(total))


def aggregate(
    loss_per_token: torch.Tensor,
    response_mask: torch.Tensor,
    mode: Aggregation = "token_mean",
    num_tokens: Normaliser = None,
    num_seqs: Normaliser = None,
    norm_len: float | None = None,
) -> torch.Tensor:
    """Reduce a (B, A) per-token loss to a 0-d loss under a (B, A) ``response_mask``.

    With ``m`` the mask, ``l`` the per-token loss and ``n_b = sum_t m[b, t]``:

    * ``"token_mean"``: ``sum_{b,t} m l / num_tokens`` (every token of the global batch
      weighs the same);
    * ``"seq_mean_token_mean"`` or its alias ``"seq_mean"``:
      ``sum_b (sum_t m l / n_b) / num_seqs`` (every sequence weighs the same);
    * ``"seq_mean_token_sum_norm"`` (Dr. GRPO): ``sum_b (sum_t m l / norm_len) / num_seqs``
      (every token weighs the same, with a constant that does not depend on the batch).

    Args:
        num_tokens: global number of response tokens, used by ``"token_mean"``. Defaults to
            ``response_mask.sum()`` of this (micro-)batch.
        num_seqs: global number of sequences, used by the sequence modes. Defaults to ``B``.
            A sequence with no response token contributes 0 but is still counted.
        norm_len: the constant of ``"seq_mean_token_sum_norm"`` (e.g. ``max_new_tokens``);
            required by that mode, ignored by the others.

    Passing the global normaliser makes micro-batch losses *sum* to the full-batch loss (see
    the module docstring); the normaliser of the mode not in use is ignored.
    """
    if loss_per_token.shape != response_mask.shape:
        raise ValueError(
            f"loss_per_token {tuple(loss_per_token.shape)} and response_mask "
            f"{tuple(response_mask.shape)} must have the same shape"
        )
    m = _float_mask(response_mask, loss_per_token)
    if mode == "token_mean":
        denom = m.sum().clamp_min(1.0) if num_tokens is None else num_tokens
        return (loss_per_token * m).sum() / denom
    if mode in SEQ_AGGREGATIONS:
        if loss_per_token.dim() != 2:
            raise ValueError(f"{mode} aggregation needs a (B, A) loss")
        sums = (loss_per_token * m).sum(dim=-1)
        if mode == "seq_mean_token_sum_norm":
            if norm_len is None or norm_len <= 0:
                raise ValueError(
                    "seq_mean_token_sum_norm needs a constant norm_len > 0 (e.g. max_new_tokens), "
                    f"got {norm_len}"
                )
            per_seq = sums / norm_len
        else:
            per_seq = sums / m.sum(dim=-1).clamp_min(1.0)
        denom = loss_per_token.shape[0] if num_seqs is None else num_seqs
        return per_seq.sum() / denom
    raise ValueError(f"unknown aggregation {mode!r}; choose one of {AGGREGATIONS}")


# --- Log-probabilities, entropy, SFT --------------------------------------------------------------


class _NextTokenLogprobs(torch.autograd.Function):
    """``log softmax(logits[:, t])[input_ids[:, t+1]]`` for every t < T-1, with a hand-written
    backward: ``d logp / d z = onehot(target) - softmax(z)``, written one sequence at a time
    into one gradient buffer for the whole ``logits`` (B, T, V).

    The autograd of ``gather - logsumexp`` takes about three times the memory passes: a
    zero-filled (B, T-1, V) gradient for the gather, the softmax of logsumexp's backward,
    their sum, then a zero-filled (B, T, V) gradient for the ``[:, :-1]`` slice. On a CPU
    that was a third of a DPO step's compute outside the matmuls."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, input_ids: torch.Tensor, with_entropy: bool):
        b, t, _ = logits.shape
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32  # at least fp32
        logprobs = torch.empty(b, t - 1, dtype=acc, device=logits.device)
        lse = torch.empty_like(logprobs)
        entropy = torch.empty_like(logprobs) if with_entropy else logprobs.new_empty(0)
        targets = input_ids[:, 1:].unsqueeze(-1)
        for i in range(b):
            row = logits[i, :-1].to(acc)  # (T-1, V); a view when already in acc
            lse[i] = torch.logsumexp(row, dim=-1)
            logprobs[i] = row.gather(-1, targets[i]).squeeze(-1) - lse[i]
            if with_entropy:  # H = lse - sum(p * z)
                probs = (row - lse[i].unsqueeze(-1)).exp_()
                entropy[i] = lse[i] - probs.mul_(row).sum(dim=-1)
        ctx.save_for_backward(logits, targets, lse)
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs: torch.Tensor, _grad_entropy):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        grad[:, -1].zero_()  # the last position predicts nothing
        in_place = logits.dtype == lse.dtype  # else an upcast row per sequence, copied back
        for i in range(logits.shape[0]):
            g = grad_logprobs[i].to(lse.dtype).unsqueeze(-1)  # (T-1, 1)
            row = torch.sub(logits[i, :-1], lse[i].unsqueeze(-1), out=grad[i, :-1]) if in_place \
                else logits[i, :-1].to(lse.dtype).sub_(lse[i].unsqueeze(-1))
            row.exp_().mul_(-g).scatter_add_(-1, targets[i], g)  # (onehot - softmax) * g
            if not in_place:
                grad[i, :-1].copy_(row)
        return grad, None, None


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, with_entropy: bool = False):
    """Log-probability of each next token: logits (B, T, V), input_ids (B, T) -> (B, T-1),
    float32 (float64 for float64 logits).

    Logits at position ``t`` predict token ``t + 1``: entry ``[b, t]`` of the result is
    ``log p(input_ids[b, t+1] | input_ids[b, :t+1])``.

    Memory: computed as ``logit[target] - logsumexp(logits)`` one sequence at a time, so no
    (B, T, V) log-softmax or fp32 copy of half-precision logits is made (logsumexp runs in
    float32: in bf16 it is inaccurate); the backward writes one (B, T, V) gradient.

    ``with_entropy``: also return the (B, T-1) entropy in nats of each position's
    distribution (no gradient), from the same pass: ``(logprobs, entropy)``.
    """
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (B, T, V) and input_ids (B, T), got {tuple(logits.shape)} and "
            f"{tuple(input_ids.shape)}"
        )
    logprobs, entropy = _NextTokenLogprobs.apply(logits, input_ids, with_entropy)
    return (logprobs, entropy) if with_entropy else logprobs


class _PickedLogprobs(torch.autograd.Function):
    """``log softmax(logits[rows[k], cols[k]])[targets[k]]`` for every k, where a column may
    predict several targets (the shared prompt's last column predicts the first token of
    both responses). Forward and backward go one row of ``logits`` at a time, like
    :class:`_NextTokenLogprobs`: no gathered (N, V) copy, no log-softmax, one gradient
    buffer. The gradient of column z is ``sum_k g_k onehot(t_k) - (sum_k g_k) softmax(z)``."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, targets: torch.Tensor,
                with_entropy: bool):
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        lse = torch.empty(logits.shape[:2], dtype=acc, device=logits.device)  # (B, T)
        entropy = torch.empty_like(lse) if with_entropy else lse.new_empty(0)
        for i in range(logits.shape[0]):
            row = logits[i].to(acc)
            lse[i] = torch.logsumexp(row, dim=-1)
            if with_entropy:  # H = lse - sum(p * z)
                entropy[i] = lse[i] - (row - lse[i].unsqueeze(-1)).exp_().mul_(row).sum(dim=-1)
        logprobs = logits[rows, cols, targets].to(acc) - lse[rows, cols]
        ctx.save_for_backward(logits, rows, cols, targets, lse)
        entropy = entropy[rows, cols] if with_entropy else entropy
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs: torch.Tensor, _grad_entropy):
        logits, rows, cols, targets, lse = ctx.saved_tensors
        g = grad_logprobs.to(lse.dtype)
        per_column = torch.zeros_like(lse).index_put_((rows, cols), g, accumulate=True)  # (B, T)
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        for i in range(logits.shape[0]):
            row = logits[i].to(lse.dtype).sub_(lse[i].unsqueeze(-1)) if logits.dtype != lse.dtype \
                else torch.sub(logits[i], lse[i].unsqueeze(-1), out=grad[i])
            row.exp_().mul_(-per_column[i].unsqueeze(-1))  # -(sum g) softmax, 0 where unused
            if row.data_ptr() != grad[i].data_ptr():
                grad[i].copy_(row)
        grad.index_put_((rows, cols, targets), g.to(grad.dtype), accumulate=True)
        return grad, None, None, None, None


def picked_logprobs(logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                    targets: torch.Tensor, with_entropy: bool = False):
    """(N,) fp32 (fp64 for fp64 logits) log-probability of ``targets[k]`` under the
    distribution at column ``cols[k]`` of row ``rows[k]``; logits (B, T, V), the index
    tensors (N,). For layouts where a token's predicting column is not simply the one before
    it (:class:`rlhf_ray.batch.SharedPromptRows`). Memory as :func:`token_logprobs`: one
    row's fp32 upcast at a time forward, one (B, T, V) gradient backward.

    ``with_entropy``: also return the (N,) entropy in nats of each picked distribution (no
    gradient), from the same pass: ``(logprobs, entropy)``."""
    if logits.dim() != 3 or not rows.shape == cols.shape == targets.shape or rows.dim() != 1:
        raise ValueError(f"expected logits (B, T, V) and rows, cols, targets (N,), got "
                         f"{tuple(logits.shape)}, {tuple(rows.shape)}, {tuple(cols.shape)}, "
                         f"{tuple(targets.shape)}")
    logprobs, entropy = _PickedLogprobs.apply(logits, rows, cols, targets, with_entropy)
    return (logprobs, entropy) if with_entropy else logprobs


def sequence_logprobs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    average: bool = False,
) -> torch.Tensor:
    """(B,) summed (or, with ``average``, length-averaged) log-prob of each sequence's targets.

    Args:
        logits: (B, T, V); input_ids: (B, T).
        loss_mask: (B, T) 1 on the *target* tokens that count (usually the response tokens),
            aligned with ``input_ids``; position 0 is never a target. These are the per-sequence
            log-probs :func:`dpo_loss` takes.
    """
    logps = token_logprobs(logits, input_ids)
    mask = loss_mask[:, 1:]
    if average:
        return masked_mean(logps, mask, dim=-1)
    return masked_sum(logps, mask, dim=-1)


def sft_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    aggregation: Aggregation = "token_mean",
    num_tokens: Normaliser = None,
    num_seqs: Normaliser = None,
    norm_len: float | None = None,
) -> torch.Tensor:
    """0-d next-token cross-entropy over the target tokens in ``loss_mask``.

    Args:
        logits: (B, T, V); logits at ``t`` score token ``t + 1`` (the shift is done here).
        input_ids: (B, T).
        loss_mask: (B, T) 1 on the target tokens that count (response tokens), aligned with
            ``input_ids``.
        aggregation, num_tokens, num_seqs, norm_len: see :func:`aggregate`; the global
            ``num_tokens`` is ``loss_mask[:, 1:].sum()`` over the whole global batch.
    """
    nll = -token_logprobs(logits, input_ids)
    return aggregate(nll, loss_mask[:, 1:], aggregation, num_tokens=num_tokens, num_seqs=num_seqs,
                     norm_len=norm_len)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of the distribution at each position: (B, T, V) -> (B, T).

    Computed as ``logsumexp(z) - sum(softmax(z) * z)``.
    """
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def masked_entropy(logits: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """0-d mean entropy over the masked positions of (B, A, V) ``logits`` aligned with a
    (B, A) ``response_mask``."""
    return masked_mean(entropy_from_logits(logits), response_mask)


def entropy_bonus_loss(
    logits: torch.Tensor,
    response_mask: torch.Tensor,
    aggregation: Aggregation = "token_mean",
    num_tokens: Normaliser = None,
    num_seqs: Normaliser = None,
    norm_len: float | None = None,
) -> torch.Tensor:
    """0-d entropy-bonus loss term: the *negative* aggregated entropy, with gradient.

    ``loss = -aggregate(H, response_mask)`` with ``H[b, t] = logsumexp(z) - sum softmax(z) z``
    the entropy (nats) of ``softmax(logits[b, t])``; add ``entropy_coef * loss`` to the policy
    loss so that minimising it raises the entropy. ``d H / d z_k = -p_k (log p_k + H)``.

    Args:
        logits: (B, A, V), aligned with the mask: position ``t`` is the distribution that
            sampled response token ``t`` (for next-token aligned (B, T-1) masks pass
            ``logits[:, :-1]``, already divided by the sampling temperature). Half-precision
            logits are upcast to float32 (an extra (B, A, V) copy).
        response_mask: (B, A).
        aggregation, num_tokens, num_seqs, norm_len: see :func:`aggregate`.
    """
    if logits.dim() != 3 or logits.shape[:2] != response_mask.shape:
        raise ValueError(
            f"expected logits (B, A, V) and response_mask (B, A), got {tuple(logits.shape)} "
            f"and {tuple(response_mask.shape)}"
        )
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    entropy = entropy_from_logits(logits)
    return -aggregate(entropy, response_mask, aggregation, num_tokens, num_seqs, norm_len)


# --- Preference losses ----------------------------------------------------------------------------


class RewardLossOutput(NamedTuple):
    """Result of :func:`pairwise_reward_loss`; all fields are 0-d tensors."""

    loss: torch.Tensor
    accuracy: torch.Tensor
    chosen_mean: torch.Tensor
    rejected_mean: torch.Tensor
    margin_mean: torch.Tensor


def pairwise_reward_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None = None,
) -> RewardLossOutput:
    """Bradley-Terry loss for a reward model: ``mean(-log sigmoid(r_c - r_r - margin))``.

    ``chosen_rewards`` / ``rejected_rewards`` are (B,) scalar rewards of the preferred and the
    rejected responses; ``margin`` is an optional (B,) or scalar required margin (Llama-2).

    Returns:
        :class:`RewardLossOutput` - ``loss`` (first item) is differentiable; ``accuracy`` is the
        fraction with ``r_c > r_r``; ``chosen_mean`` / ``rejected_mean`` are the mean rewards and
        ``margin_mean`` is ``mean(r_c - r_r)`` (the logged statistics are detached). At equal
        rewards and no margin the loss is ``ln 2``.
    """
    diff = chosen_rewards - rejected_rewards
    logits = diff if margin is None else diff - margin
    loss = -F.logsigmoid(logits).mean()
    diff = diff.detach()
    return RewardLossOutput(
        loss=loss,
        accuracy=(diff > 0).float().mean(),
        chosen_mean=chosen_rewards.detach().mean(),
        rejected_mean=rejected_rewards.detach().mean(),
        margin_mean=diff.mean(),
    )


class DPOLossOutput(NamedTuple):
    """Result of :func:`dpo_loss`: 0-d differentiable mean ``loss``; detached (B,) implicit
    rewards ``chosen_rewards = beta (pi_c - ref_c)``, ``rejected_rewards = beta (pi_r - ref_r)``
    and ``margins`` (their difference); 0-d ``accuracy`` = fraction with a positive margin."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margins: torch.Tensor
    accuracy: torch.Tensor


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> DPOLossOutput:
    """Direct Preference Optimisation loss (Rafailov et al. 2023) and its IPO variant.

    With ``h = (pi_c - ref_c) - (pi_r - ref_r)``:

    * ``"sigmoid"``: ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``; ``eps =
      label_smoothing`` > 0 is conservative DPO (cDPO), ``eps = 0`` is plain DPO.
    * ``"ipo"`` (Azar et al. 2023): ``(h - 1 / (2 beta))^2``. Label smoothing does not apply.

    The log-probabilities are used as given: pass per-sequence *sums* for DPO. The IPO paper
    is written with sequence log-likelihoods, while TRL feeds IPO *length-averaged* log-probs;
    either works here (use :func:`sequence_logprobs` with ``average=True`` for the latter).

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) policy log-probs of the chosen and
            rejected responses.
        ref_chosen_logps, ref_rejected_logps: (B,) reference-model log-probs of the same.
        beta: inverse temperature / KL strength (> 0).
        loss_type: ``"sigmoid"`` or ``"ipo"``.
        label_smoothing: cDPO label-noise rate in ``[0, 0.5]``; sigmoid loss only.

    Returns:
        :class:`DPOLossOutput`; when policy == reference the sigmoid loss is ``ln 2``.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {DPO_LOSS_TYPES}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError("label_smoothing is only defined for loss_type='sigmoid'")

    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h)
        if label_smoothing:
            losses = losses - label_smoothing * F.logsigmoid(-beta * h)
    else:
        losses = (h - 1.0 / (2.0 * beta)) ** 2

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    margins = chosen_rewards - rejected_rewards
    return DPOLossOutput(
        loss=losses.mean(),
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        margins=margins,
        accuracy=(margins > 0).float().mean(),
    )


# --- PPO ------------------------------------------------------------------------------------------


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    aggregation: Aggregation = "token_mean",
    num_tokens: Normaliser = None,
    num_seqs: Normaliser = None,
    norm_len: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped-surrogate PPO policy loss (Schulman et al. 2017), with optional dual clip.

    Per token, with ``ratio = exp(logprobs - old_logprobs)`` and advantage ``A``::

        loss = max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + clip_eps_high))

    and, with ``dual_clip = c > 1`` (Ye et al. 2020), for ``A < 0`` the loss is further capped
    at ``c * |A|`` so that a huge ratio on a bad action cannot blow up the update.

    Args:
        logprobs: (B, A) log-probs of the sampled response tokens under the current policy.
        old_logprobs: (B, A) log-probs under the policy that generated the samples.
        advantages: (B, A) per-token advantages (constant along a row for GRPO/RLOO).
        response_mask: (B, A).
        clip_eps: lower clip range (and upper, unless ``clip_eps_high`` is given).
        clip_eps_high: upper clip range ("clip-higher", DAPO); defaults to ``clip_eps``.
        dual_clip: dual-clip constant ``c > 1``, or ``None`` to disable.
        aggregation, num_tokens, num_seqs, norm_len: see :func:`aggregate`.

    Returns:
        ``(loss, metrics)``: ``loss`` is a 0-d tensor; ``metrics`` maps to detached 0-d tensors
        (no host sync), each a masked mean over this batch's tokens:

        * ``clip_frac`` - fraction of tokens where the clipped surrogate was the active branch;
        * ``dual_clip_frac`` - fraction of tokens where the dual-clip cap was active;
        * ``approx_kl`` - k3 estimate of KL(old || new), ``mean(ratio - 1 - log ratio)``, which
          is unbiased for samples drawn from the old policy and never negative;
        * ``ratio_mean`` - mean importance ratio.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high

    log_ratio = (logprobs - old_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + eps_high)
    loss_per_token = torch.maximum(unclipped, clipped)

    if dual_clip is not None:
        cap = -advantages * dual_clip  # = dual_clip * |A| where A < 0
        capped = torch.minimum(loss_per_token, cap)
        dual_active = (advantages < 0) & (loss_per_token > cap)
        loss_per_token = torch.where(advantages < 0, capped, loss_per_token)
    else:
        dual_active = torch.zeros_like(response_mask, dtype=torch.bool)

    loss = aggregate(loss_per_token, response_mask, aggregation, num_tokens, num_seqs, norm_len)
    with torch.no_grad():
        log_ratio_detached = log_ratio.detach()
        metrics = {
            "clip_frac": masked_mean((clipped > unclipped).float(), response_mask),
            "dual_clip_frac": masked_mean(dual_active.float(), response_mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio_detached) - log_ratio_detached,
                                   response_mask),
            "ratio_mean": masked_mean(ratio.detach(), response_mask),
        }
    return loss, metrics


def gspo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_eps: float = 3e-4,
    clip_eps_high: float | None = 4e-4,
    dual_clip: float | None = None,
    aggregation: Aggregation = "seq_mean_token_mean",
    num_tokens: Normaliser = None,
    num_seqs: Normaliser = None,
    norm_len: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO policy loss (Zheng et al. 2025, "Group Sequence Policy Optimization"), token form.

    The importance ratio is the *sequence* likelihood ratio normalised by length::

        s_i = (pi(y_i | x) / pi_old(y_i | x)) ** (1 / |y_i|)
            = exp(mean_{t in y_i} (logprobs[i, t] - old_logprobs[i, t]))

    and, as in the paper's "GSPO-token", every response token gets

        s_{i,t} = sg[s_i] * exp(logprobs[i, t] - sg[logprobs[i, t]])   (value s_i)
        loss_{i,t} = max(-A_{i,t} s_{i,t}, -A_{i,t} clip(s_{i,t}, 1 - clip_eps, 1 + clip_eps_high))

    (``sg`` = stop-gradient), so ``d s_{i,t} / d logprobs[i, t] = s_i``. With the default
    ``aggregation="seq_mean_token_mean"`` (the paper's ``1/G sum_i 1/|y_i| sum_t``) and a
    per-sequence advantage ``A_{i,t} = A_i``, the loss and its gradient equal those of the
    sequence-level objective ``-1/N sum_i min(s_i A_i, clip(s_i) A_i)``: clipping switches a
    whole sequence off. Other aggregations reweight the tokens (``token_mean``: by length).
    The sequence log-ratio is clamped to +-20 before exp().

    Args:
        logprobs: (B, A) current-policy log-probs of the sampled response tokens.
        old_logprobs: (B, A) log-probs under the sampling policy.
        advantages: (B, A) per-token advantages (constant along a row for GRPO), or (B,).
        response_mask: (B, A).
        clip_eps, clip_eps_high: lower / upper clip range of the *sequence* ratio; the
            defaults 3e-4 / 4e-4 are the paper's (sequence ratios stay close to 1, so PPO's
            0.2 would almost never clip). ``clip_eps_high=None`` means ``clip_eps``.
        dual_clip: as in :func:`ppo_policy_loss` (cap ``c |A|`` for ``A < 0``), or None.
        aggregation, num_tokens, num_seqs, norm_len: see :func:`aggregate`.

    Returns:
        ``(loss, metrics)`` like :func:`ppo_policy_loss`, with the same keys, each a detached
        masked mean over this batch's tokens: ``clip_frac`` (tokens, i.e. length-weighted
        sequences, whose clipped branch is active), ``dual_clip_frac``, ``approx_kl`` (k3 of
        the *token* log-ratios) and ``ratio_mean`` (token-weighted mean of ``s_i``).
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    if logprobs.dim() != 2 or logprobs.shape != response_mask.shape:
        raise ValueError(
            f"expected (B, A) logprobs and response_mask, got {tuple(logprobs.shape)} and "
            f"{tuple(response_mask.shape)}"
        )
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1).expand_as(logprobs)

    keep = response_mask.bool()
    token_log_ratio = torch.where(keep, logprobs - old_logprobs, torch.zeros_like(logprobs))
    lengths = keep.sum(dim=-1).clamp_min(1).to(logprobs.dtype)
    seq_log_ratio = (token_log_ratio.sum(dim=-1) / lengths).detach()
    seq_log_ratio = seq_log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    # value s_i on every token, gradient s_i * d logprobs[i, t]
    ratio = torch.exp(seq_log_ratio.unsqueeze(-1) + (logprobs - logprobs.detach()))
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + eps_high)
    loss_per_token = torch.maximum(unclipped, clipped)

    if dual_clip is not None:
        cap = -advantages * dual_clip
        dual_active = (advantages < 0) & (loss_per_token > cap)
        loss_per_token = torch.where(advantages < 0, torch.minimum(loss_per_token, cap),
                                     loss_per_token)
    else:
        dual_active = torch.zeros_like(keep)

    loss = aggregate(loss_per_token, response_mask, aggregation, num_tokens, num_seqs, norm_len)
    with torch.no_grad():
        tok = token_log_ratio.detach().clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        metrics = {
            "clip_frac": masked_mean((clipped > unclipped).float(), response_mask),
            "dual_clip_frac": masked_mean(dual_active.float(), response_mask),
            "approx_kl": masked_mean(torch.expm1(tok) - tok, response_mask),
            "ratio_mean": masked_mean(ratio.detach(), response_mask),
        }
    return loss, metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    clip_eps: float | None = None,
    aggregation: Aggregation = "token_mean",
    num_tokens: Normaliser = None,
    num_seqs: Normaliser = None,
    norm_len: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(Optionally clipped) squared-error value loss for the PPO critic.

    Per token: ``0.5 * max((v - R)^2, (clip(v, v_old - eps, v_old + eps) - R)^2)``, or
    ``0.5 * (v - R)^2`` when ``clip_eps`` is None. ``values`` (current critic), ``old_values``
    (at rollout time), ``returns`` (targets, e.g. from :func:`rlhf_ray.advantages.gae`) and
    ``response_mask`` are all (B, A); see :func:`aggregate` for the remaining arguments.

    Returns:
        ``(loss, metrics)``; metrics (detached 0-d tensors): ``value_clip_frac`` - fraction of
        tokens where the clipped error was the larger one; ``values_mean``.
    """
    err = (values - returns) ** 2
    if clip_eps is None:
        per_token = 0.5 * err
        clip_active = torch.zeros_like(err, dtype=torch.bool)
    else:
        v_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        err_clipped = (v_clipped - returns) ** 2
        per_token = 0.5 * torch.maximum(err, err_clipped)
        clip_active = err_clipped > err
    loss = aggregate(per_token, response_mask, aggregation, num_tokens, num_seqs, norm_len)
    with torch.no_grad():
        metrics = {
            "value_clip_frac": masked_mean(clip_active.float(), response_mask),
            "values_mean": masked_mean(values.detach(), response_mask),
        }
    return loss, metrics


def kl_penalty_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    estimator: KLEstimator = "k3",
    aggregation: Aggregation = "token_mean",
    num_tokens: Normaliser = None,
    num_seqs: Normaliser = None,
    norm_len: float | None = None,
) -> torch.Tensor:
    """0-d KL penalty loss term (GRPO-style "KL in the loss"), unscaled.

    ``logprobs`` (policy, with gradient), ``ref_logprobs`` and ``response_mask`` are (B, A),
    on tokens sampled from the policy. What the gradient of the loss estimates, in
    expectation over those tokens (``tests/unit/test_kl_gradients.py`` checks it by exact
    enumeration):

    * ``"k3"``: the gradient of the forward KL(reference || policy) (GRPO's choice);
    * ``"k2"``: the gradient of the reverse KL(policy || reference);
    * ``"k1"``: zero, since E_pi[grad log pi] = 0: as a loss it does nothing, so it is refused.

    Multiply by the KL coefficient in the caller; see :func:`aggregate` for the remaining
    arguments.
    """
    if estimator not in LOSS_KL_ESTIMATORS:
        raise ValueError(f"KL loss estimator {estimator!r}: k1 has zero expected gradient as a "
                         f"loss; choose one of {LOSS_KL_ESTIMATORS}")
    kl = kl_estimate(logprobs, ref_logprobs, estimator)
    return aggregate(kl, response_mask, aggregation, num_tokens, num_seqs, norm_len)
