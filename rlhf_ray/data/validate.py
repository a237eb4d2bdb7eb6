"""Validation of records: missing/empty fields, wrong types, chosen == rejected, duplicates,
undecodable bytes and prompts that do not fit ``max_length``.

By default the first bad row raises :class:`DataError`, whose message names the source,
the 1-based row (for JSONL: the line number) and the field, and says what was expected::

    prefs.jsonl: row 3: field 'chosen' is missing (expected a non-empty string)

With ``skip_invalid=True`` bad rows are dropped instead, and each one is listed in the
:class:`ValidationReport` (row, field, reason).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from rlhf_ray.data.formats import PROMPT_FIELD, Row, RowError, format_of, parse_row, row_key
from rlhf_ray.errors import UserError


class DataError(UserError, ValueError):
    """Invalid data; the message names the source, the row and the field when they are known."""

    def __init__(self, source: str, reason: str, row: int | None = None,
                 field: str | None = None) -> None:
        self.source, self.reason, self.row, self.field = source, reason, row, field
        super().__init__(f"{source}: {Issue(row, field, reason).describe()}")


@dataclass(frozen=True)
class Issue:
    """One invalid row: where it is, which field, and why."""

    row: int | None
    field: str | None
    reason: str
    kind: str = "invalid"  # "invalid", "duplicate" or "too_long"

    def describe(self) -> str:
        parts = []
        if self.row is not None:
            parts.append(f"row {self.row}: ")
        if self.field:
            parts.append(f"field '{self.field}' ")
        parts.append(self.reason)
        return "".join(parts)


@dataclass
class ValidationReport:
    """What validation kept and dropped. ``total`` counts the records read."""

    source: str
    format: str
    total: int = 0
    issues: list[Issue] = field(default_factory=list)

    @property
    def dropped(self) -> int:
        return len(self.issues)

    @property
    def kept(self) -> int:
        return self.total - self.dropped

    @property
    def duplicates(self) -> int:
        return sum(1 for i in self.issues if i.kind == "duplicate")

    @property
    def too_long(self) -> int:
        return sum(1 for i in self.issues if i.kind == "too_long")

    def add(self, issue: Issue, skip_invalid: bool) -> None:
        """Record ``issue``; without ``skip_invalid`` raise it as a :class:`DataError`."""
        if not skip_invalid:
            hint = "; set data.skip_invalid=true to drop invalid rows"
            raise DataError(self.source, issue.reason + hint, issue.row, issue.field)
        self.issues.append(issue)

    def summary(self) -> str:
        lines = [f"{self.source}: {self.total} rows read, {self.kept} kept, {self.dropped} dropped"
                 f" ({self.duplicates} duplicates, {self.too_long} too long)"]
        lines += [f"  {i.describe()}" for i in self.issues]
        return "\n".join(lines)


def validate_records(records: Iterable[Any], format: str, source: str,
                     skip_invalid: bool = False) -> tuple[list[Row], ValidationReport]:
    """Parse raw records (see :class:`rlhf_ray.data.sources.RawRecord`) into typed rows.

    Duplicate rows (same content as an earlier row) are invalid too: the report names the
    first occurrence. Returns the valid rows and the report.
    """
    report = ValidationReport(source=source, format=format)
    rows: list[Row] = []
    seen: dict[str, int] = {}
    for record in records:
        report.total += 1
        if record.error is not None:
            report.add(Issue(record.row, record.error.field, record.error.reason), skip_invalid)
            continue
        try:
            row = parse_row(record.data, format, row=record.row)
        except RowError as err:
            report.add(Issue(record.row, err.field, err.reason), skip_invalid)
            continue
        key = row_key(row)
        if key in seen:
            report.add(Issue(record.row, PROMPT_FIELD[format],
                             f"repeats row {seen[key]}: the whole row is a duplicate (expected unique rows)",
                             kind="duplicate"), skip_invalid)
            continue
        seen[key] = record.row
        rows.append(row)
    return rows, report


def check_lengths(rows: list[Row], report: ValidationReport, tokenizer: Any, template: str,
                  max_length: int, skip_invalid: bool = False) -> list[Row]:
    """Drop (or raise on) rows whose prompt alone leaves no room for a response token.

    A prompt fits when it has fewer than ``max_length`` tokens under ``template``. Rows whose
    *response* is too long are not invalid: the truncation policy handles them.
    """
    from rlhf_ray.data.tokenize import encode_prompts

    try:
        encoded = encode_prompts(rows, tokenizer, template, report, skip_invalid)
    except ValueError as err:
        if isinstance(err, DataError):
            raise
        raise DataError(report.source, str(err)) from err
    kept = []
    for row, ids in zip(rows, encoded):
        if ids is None:
            continue  # a rendering problem, already recorded in the report
        n = len(ids)
        if n >= max_length:
            field_name = PROMPT_FIELD[format_of(row)]
            report.add(Issue(row.row, field_name,
                             f"is too long: the prompt has {n} tokens with template '{template}' "
                             f"(expected fewer than max_length={max_length})", kind="too_long"),
                       skip_invalid)
            continue
        kept.append(row)
    return kept

