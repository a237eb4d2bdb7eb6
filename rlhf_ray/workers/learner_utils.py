"""Parts of the LearnerWorker that need no process group: the DeepSpeed config, the LR
schedule, the optimizer, model loading, micro-batching and full state dicts.

deepspeed and transformers are imported inside the functions that need them.
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

from rlhf_ray.batch import PreferenceBatch, SequenceBatch
from rlhf_ray.configs import LearnerConfig, OptimConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "added_tokens.json", "vocab.json", "merges.txt",
                   "tokenizer.model")
ADAM_EPS = 1e-8

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
    eps = getattr(optim, "eps", ADAM_EPS)  # OptimConfig.eps once configs.py has the field
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=optim.lr,
                             betas=tuple(optim.betas), eps=eps)


def load_model(path: str, kind: str, dtype: str) -> torch.nn.Module:
    """A transformers model of ``kind``: ``causal_lm``, ``reward`` (sequence classifier with
    one label) or ``value`` (a backbone with a per-token scalar head, dropout off)."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    torch_dtype = getattr(torch, dtype)
    if kind == "causal_lm":
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    if kind == "reward":
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1,
                                                                  dtype=torch_dtype)
    if kind == "value":
        config = AutoConfig.from_pretrained(path, num_labels=1, classifier_dropout=0.0)
        return AutoModelForTokenClassification.from_pretrained(path, config=config,
                                                               dtype=torch_dtype)
    raise ValueError(f"unknown model kind {kind!r}; expected causal_lm, reward or value")


def scalar_head(module: torch.nn.Module) -> torch.nn.Module:
    """The per-token scalar head of a sequence/token classifier (``score`` in Llama-likes)."""
    head = getattr(module, "score", None)
    if not isinstance(head, torch.nn.Module):
        raise ValueError(f"{type(module).__name__} has no 'score' head; reward and value "
                         "models must be Llama-style classifiers")
    return head


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last position with ``attention_mask == 1`` (any padding side)."""
    length = attention_mask.shape[-1]
    return length - 1 - attention_mask.flip(-1).argmax(-1)


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
