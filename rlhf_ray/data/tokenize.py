"""Tokenisation of rows into token ids, with the truncation policy applied and counted.

SFT (:func:`tokenize_sft`): ``input_ids = prompt_ids + response_ids + [eos]`` and a
``loss_mask`` that is 1 exactly on the response tokens *and* the EOS after them (so the model
learns to stop), 0 on prompt tokens. ``labels`` are ``input_ids`` with -100 where the mask is 0.
Masks and labels are aligned with ``input_ids``; the loss shifts them (logits at ``t`` score
token ``t + 1``, as in :func:`rlhf_ray.losses.sft_loss`).

The prompt and the response are tokenised separately, exactly as at generation time (the
model sees the prompt ids and then produces response ids). Alpaca prompts get the
tokenizer's own special tokens (a BOS, if it adds one); chat-template prompts do not (the
template writes them itself).

Truncation policy, for a row longer than ``max_length``:

- ``drop``: the row is dropped (``TokenizeStats.dropped``);
- ``truncate``: the response is cut to fit (``truncated``); the EOS may be cut with it.
  A prompt that leaves no room for one response token is dropped under both policies
  (validation reports such rows as invalid: see :func:`rlhf_ray.data.validate.check_lengths`).
  Prompt-only rows under ``truncate`` keep their *last* ``max_length - 1`` tokens.

Preference rows give ``prompt_ids``, ``chosen_ids`` and ``rejected_ids`` (each response ends
with EOS); a pair whose two responses become identical after truncation is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rlhf_ray.data.formats import (
    ConversationRow,
    InstructionRow,
    PreferenceRow,
    PromptRow,
    Row,
    RowError,
)
from rlhf_ray.data.templates import prompt_text, response_text
from rlhf_ray.data.validate import DataError, Issue, ValidationReport

IGNORE_INDEX = -100
TRUNCATION = ("drop", "truncate")


@dataclass
class TokenizeStats:
    """How many rows the truncation policy kept, dropped and truncated (kept includes truncated)."""

    kept: int = 0
    dropped: int = 0
    truncated: int = 0

    def __str__(self) -> str:
        return f"kept {self.kept}, dropped {self.dropped}, truncated {self.truncated}"


@dataclass(frozen=True)
class SFTExample:
    """One tokenised SFT row; ``loss_mask`` is 1 on the response tokens and the final EOS."""

    input_ids: list[int]
    loss_mask: list[int]
    row: int = 0

    @property
    def labels(self) -> list[int]:
        return [t if m else IGNORE_INDEX for t, m in zip(self.input_ids, self.loss_mask)]

    @property
    def prompt_length(self) -> int:
        return self.loss_mask.index(1) if 1 in self.loss_mask else len(self.loss_mask)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class PreferenceExample:
    """One tokenised preference pair; ``chosen_ids``/``rejected_ids`` are responses (+ EOS)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    row: int = 0


@dataclass(frozen=True)
class PromptExample:
    """One tokenised prompt for generation, with what a reward checker needs."""

    prompt_ids: list[int]
    text: str
    answer: str | None = None
    checker: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    row: int = 0


# --------------------------------------------------------------------------- tokenizer helpers


def load_tokenizer(name_or_path: str = "tiny-llama") -> Any:
    """Load a tokenizer from an asset name (see ``rlhf_ray.assets``) or a Hugging Face folder."""
    from transformers import AutoTokenizer

    from rlhf_ray.assets import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(name_or_path, role="tokenizer"))


def eos_id(tokenizer: Any) -> int:
    """The EOS id appended after every response; a tokenizer without one is an error."""
    value = getattr(tokenizer, "eos_token_id", None)
    if value is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token")
    return int(value)


def pad_id(tokenizer: Any) -> int:
    """The pad id (the EOS id when the tokenizer has no pad token)."""
    value = getattr(tokenizer, "pad_token_id", None)
    return eos_id(tokenizer) if value is None else int(value)


def encode_texts(texts: Sequence[str], tokenizer: Any, special: bool) -> list[list[int]]:
    """Token ids of many texts at once; ``special`` adds the tokenizer's special tokens (BOS)."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=special)["input_ids"]]


def encode_responses(texts: Sequence[str], tokenizer: Any) -> list[list[int]]:
    """Response ids, each followed by EOS."""
    eos = eos_id(tokenizer)
    return [ids + [eos] for ids in encode_texts(texts, tokenizer, special=False)]


def render_prompts(rows: Sequence[Row], tokenizer: Any, template: str,
                   report: ValidationReport | None = None, skip_invalid: bool = False) -> list[str | None]:
    """Prompt texts; a row that cannot be rendered is ``None`` (recorded in ``report``) or raises."""
    texts: list[str | None] = []
    for row in rows:
        try:
            texts.append(prompt_text(row, template, tokenizer))
        except RowError as err:
            if report is None:
                raise DataError("rows", err.reason, row.row, err.field) from None
            report.add(Issue(row.row, err.field, err.reason), skip_invalid)
            texts.append(None)
    return texts


def encode_prompts(rows: Sequence[Row], tokenizer: Any, template: str,
                   report: ValidationReport | None = None, skip_invalid: bool = False) -> list[list[int] | None]:
    """Prompt ids of every row (``None`` where the row cannot be rendered; see render_prompts)."""
    texts = render_prompts(rows, tokenizer, template, report, skip_invalid)
    present = [t for t in texts if t is not None]
    encoded = iter(encode_texts(present, tokenizer, special=template == "alpaca"))
    return [None if t is None else next(encoded) for t in texts]


def _check_policy(truncation: str, max_length: int) -> None:
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation: expected one of {', '.join(TRUNCATION)}, got {truncation!r}")
    if max_length < 2:
        raise ValueError(f"max_length: expected at least 2 tokens, got {max_length}")


# --------------------------------------------------------------------------- SFT


def tokenize_sft(rows: Sequence[InstructionRow | ConversationRow], tokenizer: Any, max_length: int,
                 truncation: str = "drop", template: str = "alpaca") -> tuple[list[SFTExample], TokenizeStats]:
    """Tokenise instruction or conversation rows for SFT (see the module docstring)."""
    _check_policy(truncation, max_length)
    prompts = encode_prompts(rows, tokenizer, template)
    responses = encode_responses([response_text(r) for r in rows], tokenizer)
    stats = TokenizeStats()
    out = []
    for row, prompt, response in zip(rows, prompts, responses):
        assert prompt is not None
        room = max_length - len(prompt)
        if room < 1 or (len(response) > room and truncation == "drop"):
            stats.dropped += 1
            continue
        if len(response) > room:
            response = response[:room]
            stats.truncated += 1
        stats.kept += 1
        out.append(SFTExample(prompt + response, [0] * len(prompt) + [1] * len(response), row.row))
    return out, stats


# --------------------------------------------------------------------------- preference


def tokenize_preference(rows: Sequence[PreferenceRow], tokenizer: Any, max_length: int,
                        truncation: str = "drop", template: str = "alpaca") -> tuple[list[PreferenceExample], TokenizeStats]:
    """Tokenise preference pairs: prompt ids, chosen ids and rejected ids (responses end with EOS)."""
    _check_policy(truncation, max_length)
    prompts = encode_prompts(rows, tokenizer, template)
    chosen = encode_responses([r.chosen for r in rows], tokenizer)
    rejected = encode_responses([r.rejected for r in rows], tokenizer)
    stats = TokenizeStats()
    out = []
    for row, prompt, c, r in zip(rows, prompts, chosen, rejected):
        assert prompt is not None
        room = max_length - len(prompt)
        longest = max(len(c), len(r))
        if room < 1 or (longest > room and truncation == "drop"):
            stats.dropped += 1
            continue
        if longest > room:
            c, r = c[:room], r[:room]
            if c == r:  # nothing left to tell the two responses apart
                stats.dropped += 1
                continue
            stats.truncated += 1
        stats.kept += 1
        out.append(PreferenceExample(prompt, c, r, row.row))
    return out, stats


# --------------------------------------------------------------------------- prompts


def tokenize_prompts(rows: Sequence[Row], tokenizer: Any, max_length: int,
                     truncation: str = "drop", template: str = "alpaca") -> tuple[list[PromptExample], TokenizeStats]:
    """Tokenise the prompts of any rows for generation (prompt rows carry answer and checker).

    A prompt must leave room for at least one generated token (fewer than ``max_length``
    tokens); ``truncate`` keeps the last ``max_length - 1`` tokens of a longer one.
    """
    _check_policy(truncation, max_length)
    texts = render_prompts(rows, tokenizer, template)
    encoded = encode_texts([t for t in texts if t is not None], tokenizer, special=template == "alpaca")
    stats = TokenizeStats()
    out = []
    for row, text, ids in zip(rows, texts, encoded):
        assert text is not None
        if len(ids) >= max_length:
            if truncation == "drop":
                stats.dropped += 1
                continue
            ids = ids[len(ids) - (max_length - 1):]
            stats.truncated += 1
        stats.kept += 1
        if isinstance(row, PromptRow):
            out.append(PromptExample(ids, text, row.answer, row.checker, dict(row.meta), row.row))
        else:
            out.append(PromptExample(ids, text, row=row.row))
    return out, stats


def row_lengths(rows: Sequence[Row], tokenizer: Any, template: str) -> list[dict[str, int]]:
    """Token counts of each row (no truncation), for statistics: ``prompt`` and ``total``, plus
    ``response`` (SFT rows) or ``chosen`` and ``rejected`` (preference rows)."""
    prompts = encode_prompts(rows, tokenizer, template)
    texts: list[str] = []
    for row in rows:
        if isinstance(row, PreferenceRow):
            texts += [row.chosen, row.rejected]
        elif not isinstance(row, PromptRow):
            texts.append(response_text(row))
    responses = iter(encode_responses(texts, tokenizer))
    out = []
    for row, prompt in zip(rows, prompts):
        n = len(prompt or [])
        if isinstance(row, PromptRow):
            out.append({"prompt": n, "total": n})
        elif isinstance(row, PreferenceRow):
            c, r = len(next(responses)), len(next(responses))
            out.append({"prompt": n, "chosen": c, "rejected": r, "total": n + max(c, r)})
        else:
            m = len(next(responses))
            out.append({"prompt": n, "response": m, "total": n + m})
    return out
