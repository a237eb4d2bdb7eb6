"""What a learner needs to set up DeepSpeed engines and read their weights back, with no
process group of its own:

- the engine config (:func:`ds_config`): ZeRO stage, CPU offload, bf16, clipping;
- the optimizer (:func:`build_optimizer`) and its LR schedule (:func:`lr_schedule`);
- DeepSpeed's per-rank shm allreduce buffer (:func:`shm_buffer_path`), removed at shutdown;
- a zero-initialised scalar head for a fresh value model (:func:`zero_scalar_head`);
- full CPU state dicts, gathered under ZeRO-3 (:func:`full_state_dict`);
- the tokenizer files of an exported HF folder (:func:`copy_tokenizer`).

deepspeed is imported inside the functions that need it (importing it is slow).
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from rlhf_ray.config import LearnerConfig, OptimConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "added_tokens.json", "vocab.json", "merges.txt",
                   "tokenizer.model")


# --------------------------------------------------------------------------- engine set-up


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
    """torch AdamW (no JIT build), its fused kernel where torch has one for the parameters'
    device (CPU, CUDA; as TRL's default ``adamw_torch_fused``): one pass per tensor instead
    of one per operation. Biases and norm weights get no weight decay."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            ndim = len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 params are flat partitions
            (decay if ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    try:
        return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)


def shm_buffer_path() -> str:
    """DeepSpeed's shm allreduce buffer of this rank (named by uid, master and rank)."""
    env = os.environ
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_"
            f"{env.get('MASTER_PORT', '')}_{env.get('RANK', '0')}")


def zero_scalar_head(model: torch.nn.Module) -> None:
    """Zero the scalar head (also when ZeRO-3 has partitioned it)."""
    import deepspeed

    from rlhf_ray.models import scalar_head

    head = scalar_head(model)
    with deepspeed.zero.GatheredParameters(list(head.parameters()), modifier_rank=0):
        for p in head.parameters():
            torch.nn.init.zeros_(p)


# --------------------------------------------------------------------------- weights


def full_state_dict(module: torch.nn.Module, zero3: bool, keep: bool) -> dict[str, torch.Tensor]:
    """CPU copies of every state-dict entry, named as in ``module.state_dict()``.

    Under ZeRO-3 each parameter is gathered in turn (a collective: every rank must call);
    only a rank with ``keep`` copies the tensors, the others return ``{}``. Tied weights
    appear under each of their names and share one tensor. Parameters already on the CPU
    (ZeRO-0/1/2) are returned as detached views, not copies: every caller serializes them
    (object store, file) before the next step changes them.
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
                copies[id(p)] = p.detach().to("cpu") if keep else None
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
