"""Training data of the offline recipes (sft, rm, dpo) and the order it is read in.

Data order: step ``s`` (0-based) of a run with ``n`` training examples and global batch
``b`` reads rows ``perm_e[p*b:(p+1)*b]`` of epoch ``e = s // (n // b)``, position
``p = s % (n // b)``, where ``perm_e`` is a permutation seeded by ``(seed, e)``. The last
partial batch of an epoch is dropped. The order is a pure function of the step, so a
resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from rlhf_ray.batch import PreferenceBatch, SequenceBatch
from rlhf_ray.config_loader import ConfigError
from rlhf_ray.data import DataError, PackedExample, collate_packed, collate_sft, read_source

FORMAT_KEYS = {"preference": {"chosen", "rejected"}, "instruction": {"instruction", "output"},
               "conversation": {"messages"}}
USE_FOR = {"preference": "rlhf-ray rm or rlhf-ray dpo", "instruction": "rlhf-ray sft",
           "conversation": "rlhf-ray sft"}


def load_splits(loader: Callable, cfg: Any, tokenizer: Any, recipe: str) -> tuple[list, list, Any]:
    """``loader(cfg.data, tokenizer, split) -> (examples, stats, data)`` for train and held-out;
    a format mismatch error says which recipe the rows are for."""
    try:
        train, stats, _ = loader(cfg.data, tokenizer, "train")
        heldout = loader(cfg.data, tokenizer, "heldout")[0] if cfg.data.heldout_fraction else []
    except DataError as e:
        raise DataError(cfg.data.source, _format_hint(cfg.data, recipe, e)) from None
    if cfg.max_eval_rows is not None:
        heldout = heldout[: cfg.max_eval_rows]
    if 0 < len(heldout) < cfg.learner.num_workers:
        raise ConfigError(f"data.heldout_fraction: {len(heldout)} held-out examples cannot be "
                          f"split over learner.num_workers={cfg.learner.num_workers} ranks; "
                          "hold out more rows (or set heldout_fraction=0 to skip evaluation)")
    return train, heldout, stats


def _format_hint(data: Any, recipe: str, error: DataError) -> str:
    text = str(error).removeprefix(f"{data.source}: ")
    try:
        first = next(r.data for r in read_source(data)[0] if isinstance(r.data, dict))
    except Exception:  # unreadable source: the original error says why
        return text
    for fmt, keys in FORMAT_KEYS.items():
        if keys <= set(first) and fmt != data.format:
            return (f"{text} (the rows look like '{fmt}' data, which is for {USE_FOR[fmt]}; "
                    f"{recipe} was given data.format={data.format})")
    return text


def sequence_batch(examples: Sequence, pad_id: int) -> SequenceBatch:
    """SFT examples (or packs) as a right-padded SequenceBatch; the loss mask covers responses.
    Packs keep their ``position_ids`` and ``document_ids``, so the learner runs each packed
    example alone (unpacked examples leave both None)."""
    if examples and isinstance(examples[0], PackedExample):
        t = collate_packed(examples, pad_id)
        return SequenceBatch(t["input_ids"], t["attention_mask"], t["loss_mask"].float(),
                             position_ids=t["position_ids"], document_ids=t["document_ids"])
    t = collate_sft(examples, pad_id)
    return SequenceBatch(t["input_ids"], t["attention_mask"], t["loss_mask"].float())


def preference_batch(pairs: Sequence[tuple[list[int], list[int], list[int]]],
                     pad_id: int) -> PreferenceBatch:
    """``(prompt_ids, chosen_ids, rejected_ids)`` triples as a PreferenceBatch."""
    return PreferenceBatch(SequenceBatch.from_pairs([(p, c) for p, c, _ in pairs], pad_id),
                           SequenceBatch.from_pairs([(p, r) for p, _, r in pairs], pad_id))


def fingerprint(items: Sequence) -> str:
    """A short hash of the training examples: resume refuses changed data."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(repr(item).encode())
    return digest.hexdigest()[:16]


def total_steps(cfg: Any, n_train: int) -> int:
    """Optimizer steps of the run: ``max_steps`` if set (cycling epochs), else all epochs."""
    if n_train < cfg.batch_size:
        raise ConfigError(f"batch_size: {cfg.batch_size} is larger than the {n_train} training "
                          f"examples of {cfg.data.source}; lower batch_size or add data")
    return cfg.max_steps if cfg.max_steps else cfg.epochs * (n_train // cfg.batch_size)


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Rows of step ``step`` (see the module docstring)."""
    per_epoch = n // batch_size
    epoch, pos = divmod(step, per_epoch)
    return _permutation(n, seed, epoch)[pos * batch_size: (pos + 1) * batch_size].tolist()
