"""Padding, collation into tensors, and sequence packing for SFT.

Collation pads on the right with the pad id (left for generation prompts, as HF
``generate`` expects) and returns ``torch.long`` tensors:

- SFT: ``input_ids``, ``attention_mask``, ``labels`` (-100 on prompt and pad tokens),
  ``loss_mask`` (1 on response tokens and the final EOS) and ``position_ids``;
- preference: the same four per side, prefixed ``chosen_`` and ``rejected_``, plus
  ``prompt_lengths``;
- prompts: ``input_ids`` and ``attention_mask``.

Packing (:func:`pack_sft`) concatenates SFT examples, in order, into sequences of at most
``max_length`` tokens. In a pack:

- ``loss_mask`` and ``labels`` are the concatenation of each example's own, so only response
  tokens (and each example's EOS) are trained on. The first token of every example is a
  prompt token, so no loss ever asks one example to predict the next example's first token;
- ``position_ids`` restart at 0 for each example;
- ``document_ids`` number the examples 1, 2, ... (0 on padding).

Attention across examples: a plain causal mask lets a token see the earlier examples of its
pack. Run a pack with its ``position_ids`` and the 4-D mask :func:`block_causal_mask` builds
from its ``document_ids`` (eager or SDPA attention): each example is then computed exactly as
it would be alone (the learner does this for any batch that carries ``document_ids``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rlhf_ray.data.tokenize import IGNORE_INDEX, PreferenceExample, PromptExample, SFTExample

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class PackedExample:
    """Several SFT examples concatenated into one sequence (see the module docstring)."""

    input_ids: list[int]
    loss_mask: list[int]
    position_ids: list[int]
    document_ids: list[int]
    rows: tuple[int, ...] = ()

    @property
    def labels(self) -> list[int]:
        return [t if m else IGNORE_INDEX for t, m in zip(self.input_ids, self.loss_mask)]

    def __len__(self) -> int:
        return len(self.input_ids)


def pack_sft(examples: Sequence[SFTExample], max_length: int) -> list[PackedExample]:
    """Greedily pack examples, in order, into sequences of at most ``max_length`` tokens."""
    packs: list[PackedExample] = []
    ids: list[int] = []
    mask: list[int] = []
    pos: list[int] = []
    docs: list[int] = []
    rows: list[int] = []

    def flush() -> None:
        if ids:
            packs.append(PackedExample(list(ids), list(mask), list(pos), list(docs), tuple(rows)))
        for part in (ids, mask, pos, docs, rows):
            part.clear()

    for example in examples:
        n = len(example.input_ids)
        if n > max_length:
            raise ValueError(f"row {example.row}: {n} tokens do not fit max_length={max_length}; "
                             "tokenise with the same max_length before packing")
        if len(ids) + n > max_length:
            flush()
        ids += example.input_ids
        mask += example.loss_mask
        pos += range(n)
        docs += [len(rows) + 1] * n
        rows.append(example.row)
    flush()
    return packs


def _pad(seqs: Sequence[Sequence[int]], value: int, left: bool = False,
         multiple_of: int | None = None) -> torch.Tensor:
    import torch

    width = max((len(s) for s in seqs), default=0)
    if multiple_of:
        width = -(-width // multiple_of) * multiple_of
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            t = torch.as_tensor(list(s), dtype=torch.long)
            if left:
                out[i, width - len(s):] = t
            else:
                out[i, : len(s)] = t
    return out


def _sft_tensors(ids: Sequence[Sequence[int]], masks: Sequence[Sequence[int]],
                 positions: Sequence[Sequence[int]], pad_id: int,
                 multiple_of: int | None) -> dict[str, torch.Tensor]:
    input_ids = _pad(ids, pad_id, multiple_of=multiple_of)
    loss_mask = _pad(masks, 0, multiple_of=multiple_of)
    attention_mask = _pad([[1] * len(s) for s in ids], 0, multiple_of=multiple_of)
    labels = input_ids.masked_fill(loss_mask == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "loss_mask": loss_mask, "position_ids": _pad(positions, 0, multiple_of=multiple_of)}


def collate_sft(examples: Sequence[SFTExample], pad_id: int,
                pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad SFT examples into a batch (see the module docstring for the keys)."""
    ids = [e.input_ids for e in examples]
    return _sft_tensors(ids, [e.loss_mask for e in examples], [list(range(len(s))) for s in ids],
                        pad_id, pad_to_multiple_of)


def collate_packed(packs: Sequence[PackedExample], pad_id: int,
                   pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad packed sequences; adds ``document_ids`` (0 on padding)."""
    batch = _sft_tensors([p.input_ids for p in packs], [p.loss_mask for p in packs],
                         [p.position_ids for p in packs], pad_id, pad_to_multiple_of)
    batch["document_ids"] = _pad([p.document_ids for p in packs], 0, multiple_of=pad_to_multiple_of)
    return batch


def block_causal_mask(document_ids: torch.Tensor, dtype: torch.dtype | None = None,
                      shared: int | None = None) -> torch.Tensor:
    """A ``(B, 1, T, T)`` mask of which key ``j`` query ``i`` may attend to: same document,
    ``j <= i``, and not padding (``document_ids == 0``). A padding query attends to itself
    only, so no softmax row is empty (no NaN); its output is never a target. ``shared``: a
    document every query of the row may also attend to (a prompt that several responses
    continue, :class:`rlhf_ray.batch.SharedPromptRows`).

    ``dtype=None``: boolean, True where attention is allowed. A floating ``dtype`` (the
    model's): the additive form, 0 where allowed and ``torch.finfo(dtype).min`` elsewhere.
    Pass the additive form as ``attention_mask`` to a transformers model: a 4-D mask is used
    as given, and eager attention adds it to the scores (a boolean one would be added as 0/1
    and mask nothing), while SDPA takes either form.
    """
    import torch

    same = document_ids[:, :, None] == document_ids[:, None, :]
    if shared is not None:
        same |= (document_ids == shared)[:, None, :]
    length = document_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=document_ids.device).tril()
    real = (document_ids != 0)[:, None, :]
    mask = same & causal & real
    mask |= torch.eye(length, dtype=torch.bool, device=document_ids.device)
    mask = mask[:, None]
    if dtype is None:
        return mask
    if not dtype.is_floating_point:
        raise ValueError(f"block_causal_mask: dtype must be a floating dtype or None, got {dtype}")
    bias = torch.zeros(mask.shape, dtype=dtype, device=document_ids.device)
    return bias.masked_fill_(~mask, torch.finfo(dtype).min)


def collate_preference(examples: Sequence[PreferenceExample], pad_id: int,
                       pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad ``prompt + chosen`` and ``prompt + rejected`` separately.

    Keys: ``chosen_input_ids``, ``chosen_attention_mask``, ``chosen_labels``,
    ``chosen_loss_mask``, ``chosen_position_ids``, the same with ``rejected_``, and
    ``prompt_lengths``. The last real token of each side (its EOS, unless truncated) is where
    a reward model reads its score.
    """
    import torch

    batch: dict[str, torch.Tensor] = {}
    for side in ("chosen", "rejected"):
        ids, masks = [], []
        for e in examples:
            response = e.chosen_ids if side == "chosen" else e.rejected_ids
            ids.append(e.prompt_ids + response)
            masks.append([0] * len(e.prompt_ids) + [1] * len(response))
        part = _sft_tensors(ids, masks, [list(range(len(s))) for s in ids], pad_id, pad_to_multiple_of)
        batch.update({f"{side}_{k}": v for k, v in part.items()})
    batch["prompt_lengths"] = torch.tensor([len(e.prompt_ids) for e in examples], dtype=torch.long)
    return batch


def collate_prompts(examples: Sequence[PromptExample], pad_id: int,
                    padding_side: str = "left") -> dict[str, torch.Tensor]:
    """Pad prompts for batched generation (``left`` by default, as HF ``generate`` expects)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side: expected 'left' or 'right', got {padding_side!r}")
    left = padding_side == "left"
    ids = [e.prompt_ids for e in examples]
    return {"input_ids": _pad(ids, pad_id, left=left),
            "attention_mask": _pad([[1] * len(s) for s in ids], 0, left=left)}
