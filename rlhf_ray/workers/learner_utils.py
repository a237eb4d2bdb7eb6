"""Parts of the LearnerWorker that need no process group: the DeepSpeed config, the LR
schedule, the optimizer, micro-batching, the per-micro-batch loss terms and full state dicts.

deepspeed is imported inside the functions that need it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F

from rlhf_ray.batch import ExperienceBatch, PreferenceBatch, SequenceBatch
from rlhf_ray.config import LearnerConfig, OptimConfig
from rlhf_ray.losses import (
    dpo_loss,
    entropy_from_logits,
    kl_penalty_loss,
    masked_sum,
    pairwise_reward_loss,
    ppo_policy_loss,
    sequence_logprobs,
    sft_loss,
    token_logprobs,
    value_loss,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "added_tokens.json", "vocab.json", "merges.txt",
                   "tokenizer.model")

B = TypeVar("B", bound=SequenceBatch)


# --------------------------------------------------------------------------- DeepSpeed setup


def ds_config(learner: LearnerConfig, optim: OptimConfig, dtype: str) -> dict:
    """The DeepSpeed config of one engine.

    Gradient accumulation is explicit (``gradient_accumulation_steps`` stays 1 and the worker
    marks the accumulation boundary itself), so micro-batch counts may vary from step to step.
    """
    if learner.offload and learner.zero_stage == 0:
        raise ValueError("learner.offload needs learner.zero_stage >= 1 (ZeRO-0 has no "
                         "partitioned optimizer state to offload)")
    zero: dict = {"stage": learner.zero_stage}
    if learner.offload:
        pin = torch.cuda.is_available()
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
        if learner.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return {
        "train_micro_batch_size_per_gpu": learner.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": float(optim.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bfloat16"},
        "zero_allow_untested_optimizer": True,  # torch AdamW as the client optimizer
        "zero_force_ds_cpu_optimizer": False,  # ... also with offload (no CPUAdam JIT)
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def lr_schedule(optim: OptimConfig, total_steps: int | None) -> Callable[[int], float]:
    """LR multiplier of optimizer step ``s`` (0-based): linear warm-up, then the schedule.

    Warm-up gives ``(s + 1) / warmup_steps`` so the first step already learns; ``cosine`` and
    ``linear`` decay to 0 at ``total_steps`` and need it.
    """
    warmup, schedule = optim.warmup_steps, optim.schedule
    if schedule not in ("constant", "cosine", "linear"):
        raise ValueError(f"optim.schedule: unknown schedule {schedule!r}")
    if schedule != "constant" and not total_steps:
        raise ValueError(f"optim.schedule={schedule!r} needs total_steps (the number of "
                         "optimizer steps of the run)")
    decay_steps = max(1, (total_steps or 0) - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / decay_steps)
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_optimizer(module: torch.nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """torch AdamW (no JIT build); biases and norm weights get no weight decay."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            ndim = len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 params are flat partitions
            (decay if ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=optim.lr,
                             betas=tuple(optim.betas), eps=optim.eps)


def shm_buffer_path() -> str:
    """DeepSpeed's shm allreduce buffer of this rank (named by uid, master and rank)."""
    env = os.environ
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_"
            f"{env.get('MASTER_PORT', '')}_{env.get('RANK', '0')}")


# --------------------------------------------------------------------------- micro-batches


def select_rows(batch: B, rows: slice) -> B:
    """Rows of a Sequence/ExperienceBatch with all-padding columns on the right dropped.

    Token-aligned (B, T) tensors are cut to the last real column, next-token aligned
    (B, T-1) tensors one shorter; (B,) tensors keep their shape.
    """
    length = batch.input_ids.shape[1]
    real = batch.attention_mask[rows].bool().any(0).nonzero()
    width = int(real.max()) + 1 if len(real) else 1
    fields = {}
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, torch.Tensor):
            value = value[rows]
            if value.dim() >= 2 and value.shape[1] == length:
                value = value[:, :width]
            elif value.dim() >= 2 and value.shape[1] == length - 1:
                value = value[:, : width - 1]
        fields[f.name] = value
    return type(batch)(**fields)


def split_rows(batch: B, size: int) -> list[B]:
    return [select_rows(batch, slice(i, i + size)) for i in range(0, len(batch), size)]


def split_pairs(batch: PreferenceBatch, size: int) -> list[PreferenceBatch]:
    out = []
    for i in range(0, len(batch), size):
        rows = slice(i, i + size)
        out.append(PreferenceBatch(
            chosen=select_rows(batch.chosen, rows), rejected=select_rows(batch.rejected, rows),
            ref_chosen_logps=None if batch.ref_chosen_logps is None else batch.ref_chosen_logps[rows],
            ref_rejected_logps=(None if batch.ref_rejected_logps is None
                                else batch.ref_rejected_logps[rows])))
    return out


def stack_pairs(batch: PreferenceBatch, pad_id: int) -> SequenceBatch:
    """Chosen rows then rejected rows in one right-padded (2B, T) batch (one forward pass)."""
    a, b = batch.chosen, batch.rejected
    length = max(a.input_ids.shape[1], b.input_ids.shape[1])

    def cat(x: torch.Tensor, y: torch.Tensor, value: float) -> torch.Tensor:
        return torch.cat([F.pad(x, (0, length - x.shape[1]), value=value),
                          F.pad(y, (0, length - y.shape[1]), value=value)])

    return SequenceBatch(cat(a.input_ids, b.input_ids, pad_id),
                         cat(a.attention_mask, b.attention_mask, 0),
                         cat(a.loss_mask, b.loss_mask, 0.0))


def to_device(batch: B, device: torch.device) -> B:
    return dataclasses.replace(batch, **{
        k: v.to(device) for k, v in vars(batch).items() if isinstance(v, torch.Tensor)})


# --------------------------------------------------------------------------- loss terms
# Each ``*_terms`` returns ``(losses, stats)`` for one micro-batch: one loss per engine,
# normalised by the GLOBAL count (tokens, sequences or pairs), so that summed over
# micro-batches and ranks it is the full-batch loss; each stat is weighted the same way, so
# the worker's sum over micro-batches and ranks is the global metric.

Terms = tuple[list[torch.Tensor], dict[str, torch.Tensor]]


def sft_terms(logits: torch.Tensor, mb: SequenceBatch, aggregation: str, num_tokens: float,
              num_seqs: float) -> Terms:
    loss = sft_loss(logits, mb.input_ids, mb.loss_mask, aggregation, num_tokens, num_seqs)
    return [loss], {"policy/loss": loss, "perf/tokens": mb.attention_mask.sum()}


def zero_scalar_head(model: torch.nn.Module) -> None:
    """Zero the scalar head (also when ZeRO-3 has partitioned it)."""
    import deepspeed

    from rlhf_ray.models import scalar_head

    head = scalar_head(model)
    with deepspeed.zero.GatheredParameters(list(head.parameters()), modifier_rank=0):
        for p in head.parameters():
            torch.nn.init.zeros_(p)


def ppo_terms(logits: torch.Tensor, values: torch.Tensor | None, mb: ExperienceBatch,
              params: dict, aggregation: str, num_tokens: float, num_seqs: float,
              real_tokens: float) -> Terms:
    """Clipped policy loss (+ ``kl_coef`` * KL to the reference) and, with ``values``, the
    value loss. ``params``: clip_eps, clip_eps_high, dual_clip, kl_coef, kl_estimator,
    value_clip_eps. Missing old log-probs / old values mean on-policy (ratio 1, no clip)."""
    agg = {"aggregation": aggregation, "num_tokens": num_tokens, "num_seqs": num_seqs}
    mask = mb.response_mask
    share = mask.sum() / real_tokens  # weight of this micro-batch's token means
    logprobs = token_logprobs(logits, mb.input_ids)
    old = logprobs.detach() if mb.old_logprobs is None else mb.old_logprobs
    loss, m = ppo_policy_loss(logprobs, old, mb.advantages, mask, params["clip_eps"],
                                params["clip_eps_high"], params["dual_clip"], **agg)
    stats = {"policy/loss": loss, **{f"policy/{k}": v * share for k, v in m.items()}}
    with torch.no_grad():
        entropy = entropy_from_logits(logits[:, :-1].float())
        stats["policy/entropy"] = masked_sum(entropy, mask) / real_tokens
    if mb.ref_logprobs is not None:
        kl = kl_penalty_loss(logprobs, mb.ref_logprobs, mask, params["kl_estimator"], **agg)
        stats["kl/ref"] = kl
        if params["kl_coef"]:
            loss = loss + params["kl_coef"] * kl
    losses = [loss]
    if values is not None:
        old_v = values.detach() if mb.old_values is None else mb.old_values
        v_loss, vm = value_loss(values, old_v, mb.returns, mask, params["value_clip_eps"], **agg)
        losses.append(v_loss)
        stats.update({"value/loss": v_loss, "value/clip_frac": vm["value_clip_frac"] * share,
                      "value/mean": vm["values_mean"] * share})
    stats["perf/tokens"] = mb.attention_mask.sum()
    return losses, stats


def dpo_terms(logits: torch.Tensor, both: SequenceBatch, mb: PreferenceBatch, beta: float,
              loss_type: str, label_smoothing: float, num_pairs: float) -> Terms:
    """``both`` is :func:`stack_pairs` of ``mb`` (chosen rows first) and ``logits`` its output."""
    logps = sequence_logprobs(logits, both.input_ids, both.loss_mask)
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
        "perf/tokens": both.attention_mask.sum()}


def rm_terms(scores: torch.Tensor, mb: PreferenceBatch, margin: float, num_pairs: float) -> Terms:
    """``scores``: (2B,) chosen then rejected, from :func:`rlhf_ray.models.sequence_scores`."""
    b = len(mb)
    out = pairwise_reward_loss(scores[:b], scores[b:], margin or None)
    w = b / num_pairs
    return [out.loss * w], {
        "rm/loss": out.loss * w, "rm/accuracy": out.accuracy * w,
        "rm/chosen_score": out.chosen_mean * w, "rm/rejected_score": out.rejected_mean * w,
        "rm/margin": out.margin_mean * w,
        "perf/tokens": mb.chosen.attention_mask.sum() + mb.rejected.attention_mask.sum()}


# --------------------------------------------------------------------------- weights


def full_state_dict(module: torch.nn.Module, zero3: bool, keep: bool) -> dict[str, torch.Tensor]:
    """CPU copies of every state-dict entry, named as in ``module.state_dict()``.

    Under ZeRO-3 each parameter is gathered in turn (a collective: every rank must call);
    only a rank with ``keep`` copies the tensors, the others return ``{}``. Tied weights
    appear under each of their names and share one tensor.
    """
    keys = set(module.state_dict().keys())
    copies: dict[int, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) not in copies:
            if zero3:
                import deepspeed

                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    copies[id(p)] = p.data.detach().to("cpu", copy=True) if keep else None
            else:
                copies[id(p)] = p.detach().to("cpu", copy=True) if keep else None
        if keep and name in keys:
            out[name] = copies[id(p)]
    if keep:
        for name, buf in module.named_buffers():
            if name in keys:
                out[name] = buf.detach().to("cpu", copy=True)
    return out


def copy_tokenizer(src: str, dst: str) -> list[str]:
    """Copy the tokenizer files of a HF folder; returns the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied
