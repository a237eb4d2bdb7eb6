"""Loading a :class:`~rlhf_ray.config.DataConfig` into validated, typed rows of one split.

Pipeline of :func:`load_rows`:

1. read the source (a built-in name, a file or a ``save_to_disk`` folder); ``num_rows``
   keeps the first N records of the source (for generators: the first N generated);
2. validate every record (fields, types, duplicates, undecodable bytes); without
   ``skip_invalid`` the first bad row raises :class:`DataError`;
3. with a tokenizer: drop (or raise on) rows whose prompt does not fit ``max_length``;
4. split into ``train`` / ``heldout``.

:func:`sft_examples`, :func:`preference_examples` and :func:`prompt_examples` go on to
tokenise with the config's truncation policy (and packing, for SFT).

The split is decided per row from a hash of ``seed`` and the row's *prompt*: it is stable
across runs and machines, does not depend on row order or on the other rows, and keeps every
response to one prompt in the same split. The held-out share is ``heldout_fraction`` in
expectation (not exactly, on small data).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from rlhf_ray.data.builtin import is_builtin, read_builtin
from rlhf_ray.data.collate import pack_sft
from rlhf_ray.data.formats import FORMATS, Row
from rlhf_ray.data.sources import RawRecord, SourceInfo, read_file
from rlhf_ray.data.templates import TEMPLATES, prompt_messages
from rlhf_ray.data.tokenize import (
    PreferenceExample,
    PromptExample,
    TokenizeStats,
    tokenize_preference,
    tokenize_prompts,
    tokenize_sft,
)
from rlhf_ray.data.validate import DataError, ValidationReport, check_lengths, validate_records

Split = Literal["train", "heldout", "all"]
SPLITS: tuple[str, ...] = ("train", "heldout", "all")


@dataclass
class LoadedData:
    """Validated rows of one split, where they came from, and what validation dropped."""

    rows: list[Row]
    info: SourceInfo
    report: ValidationReport
    split: str

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[Row]:
        return iter(self.rows)


def read_source(config: Any) -> tuple[list[RawRecord], SourceInfo]:
    """Raw records of ``config.source`` (built-in or file), honouring ``num_rows``."""
    if config.format not in FORMATS:
        raise DataError(config.source, f"data.format is {config.format!r} (expected one of {', '.join(FORMATS)})")
    if config.num_rows is not None and config.num_rows < 1:
        raise DataError(config.source, f"data.num_rows is {config.num_rows} (expected at least 1, or null)")
    if is_builtin(config.source):
        return read_builtin(config.source, config.format, config.seed, config.num_rows)
    return read_file(config.source, config.num_rows)


def prompt_key(row: Row) -> str:
    """The row's prompt as one string, the same whatever the format: a single user message
    (an instruction without input, a one-message chat, a plain prompt) is its text; anything
    else is the JSON of its messages. So "What is 2 + 3?" lands in the same split as an
    instruction, a prompt, a chat or a preference pair."""
    messages = prompt_messages(row)
    if len(messages) == 1 and messages[0].role == "user":
        return messages[0].content
    return json.dumps([m.to_dict() for m in messages], ensure_ascii=False)


def heldout_score(row: Row, seed: int) -> float:
    """A number in [0, 1) from the seed and the row's prompt; below the fraction = held out."""
    digest = hashlib.sha256(f"{seed}\x00{prompt_key(row)}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_rows(rows: Sequence[Row], heldout_fraction: float, seed: int, split: str) -> list[Row]:
    """The rows of ``split`` (``train``, ``heldout`` or ``all``), in their original order."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction: expected 0 <= x < 1, got {heldout_fraction}")
    if split == "all":
        return list(rows)
    want_heldout = split == "heldout"
    return [r for r in rows if (heldout_score(r, seed) < heldout_fraction) == want_heldout]


def load_rows(config: Any, split: str = "train", tokenizer: Any = None) -> LoadedData:
    """Read, validate and split ``config`` (a ``DataConfig``); see the module docstring.

    ``tokenizer`` enables the prompt-length check (``max_length`` under ``template``).
    """
    if config.template not in TEMPLATES:
        raise DataError(config.source, f"data.template is {config.template!r} (expected one of {', '.join(TEMPLATES)})")
    records, info = read_source(config)
    rows, report = validate_records(records, config.format, config.source, config.skip_invalid)
    if tokenizer is not None:
        rows = check_lengths(rows, report, tokenizer, config.template, config.max_length,
                             config.skip_invalid)
    if not rows:
        first = f"; the first dropped: {report.issues[0].describe()}" if report.issues else ""
        raise DataError(config.source, f"has no valid rows left ({report.total} read, "
                                       f"{report.dropped} dropped: {report.duplicates} duplicates, "
                                       f"{report.too_long} longer than data.max_length="
                                       f"{config.max_length}, {report.dropped - report.duplicates - report.too_long} "
                                       f"invalid){first}; expected at least one row")
    return LoadedData(split_rows(rows, config.heldout_fraction, config.seed, split), info, report, split)


# --------------------------------------------------------------------------- one call per stage


def sft_examples(config: Any, tokenizer: Any, split: str = "train") -> tuple[list[Any], TokenizeStats, LoadedData]:
    """Load, validate and tokenise SFT rows (``instruction`` or ``conversation``) of ``split``.

    Applies ``config.truncation``; with ``config.packing`` returns
    :class:`~rlhf_ray.data.collate.PackedExample` s instead of
    :class:`~rlhf_ray.data.tokenize.SFTExample` s (collate with ``collate_packed``).
    """
    if config.format not in ("instruction", "conversation"):
        raise DataError(config.source, f"data.format is '{config.format}' (expected 'instruction' or "
                                       "'conversation' for SFT)")
    data = load_rows(config, split, tokenizer)
    examples, stats = tokenize_sft(data.rows, tokenizer, config.max_length, config.truncation, config.template)
    if config.packing:
        return pack_sft(examples, config.max_length), stats, data
    return examples, stats, data


def preference_examples(config: Any, tokenizer: Any,
                        split: str = "train") -> tuple[list[PreferenceExample], TokenizeStats, LoadedData]:
    """Load, validate and tokenise preference pairs of ``split`` (for reward models and DPO)."""
    if config.format != "preference":
        raise DataError(config.source, f"data.format is '{config.format}' (expected 'preference')")
    data = load_rows(config, split, tokenizer)
    examples, stats = tokenize_preference(data.rows, tokenizer, config.max_length, config.truncation,
                                          config.template)
    return examples, stats, data


def prompt_examples(config: Any, tokenizer: Any,
                    split: str = "train") -> tuple[list[PromptExample], TokenizeStats, LoadedData]:
    """Load, validate and tokenise the prompts of ``split`` (any format) for generation."""
    data = load_rows(config, split, tokenizer)
    examples, stats = tokenize_prompts(data.rows, tokenizer, config.max_length, config.truncation,
                                       config.template)
    return examples, stats, data
