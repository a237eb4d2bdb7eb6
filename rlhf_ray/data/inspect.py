"""``rlhf-ray data inspect``: row count, token-length statistics, duplicates and invalid rows.

Inspection reads every row (it does not stop at the first bad one) and prints a report on
stdout. If any row is invalid and ``skip_invalid`` is off, it also prints the first error on
stderr and returns 1; a file that cannot be read at all returns 1 too (2 for a bad argument,
such as a tokenizer that cannot be loaded).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

from rlhf_ray.data.formats import FORMATS
from rlhf_ray.data.load import read_source
from rlhf_ray.data.templates import TEMPLATES
from rlhf_ray.data.tokenize import load_tokenizer, row_lengths
from rlhf_ray.data.validate import DataError, ValidationReport, check_lengths, validate_records

DEFAULT_TOKENIZER = "tiny-llama"


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def length_stats(values: Sequence[int]) -> dict[str, float]:
    """min, mean, p50, p95 and max of ``values`` (NaN when empty)."""
    if not values:
        return {k: math.nan for k in ("min", "mean", "p50", "p95", "max")}
    return {"min": min(values), "mean": sum(values) / len(values), "p50": percentile(values, 50),
            "p95": percentile(values, 95), "max": max(values)}


def _stats_table(lengths: list[dict[str, int]]) -> list[str]:
    columns = [c for c in ("prompt", "response", "chosen", "rejected", "total") if lengths and c in lengths[0]]
    lines = [f"  {'tokens':<10}{'min':>8}{'mean':>10}{'p50':>9}{'p95':>9}{'max':>8}"]
    for column in columns:
        s = length_stats([x[column] for x in lengths])
        lines.append(f"  {column:<10}{s['min']:>8.0f}{s['mean']:>10.1f}{s['p50']:>9.1f}"
                     f"{s['p95']:>9.1f}{s['max']:>8.0f}")
    return lines


def _report_lines(report: ValidationReport) -> list[str]:
    lines = [f"duplicates: {report.duplicates}", f"invalid rows: {report.dropped}"]
    lines += [f"  {issue.describe()}" for issue in report.issues]
    return lines


def inspect_main(path: str, format: str, tokenizer: str | None, max_length: int,
                 skip_invalid: bool, template: str) -> int:
    """Print statistics of a data file (or built-in source); non-zero if a row is invalid
    and ``skip_invalid`` is off. Wired to ``rlhf-ray data inspect``."""
    from rlhf_ray.config import DataConfig

    if format not in FORMATS:
        print(f"error: --format: expected one of {', '.join(FORMATS)}, got {format!r}", file=sys.stderr)
        return 2
    if template not in TEMPLATES:
        print(f"error: --template: expected one of {', '.join(TEMPLATES)}, got {template!r}", file=sys.stderr)
        return 2
    if max_length < 2:
        print(f"error: --max-length: expected at least 2, got {max_length}", file=sys.stderr)
        return 2
    try:
        tok: Any = load_tokenizer(tokenizer or DEFAULT_TOKENIZER)
    except Exception as err:  # AssetError, OSError from transformers ...
        print(f"error: cannot load tokenizer {tokenizer or DEFAULT_TOKENIZER!r}: {err}", file=sys.stderr)
        return 2

    config = DataConfig(source=path, format=format, template=template, max_length=max_length,
                        skip_invalid=True, heldout_fraction=0.0)
    try:
        records, info = read_source(config)
        rows, report = validate_records(records, format, path, skip_invalid=True)
        rows = check_lengths(rows, report, tok, template, max_length, skip_invalid=True)
        lengths = row_lengths(rows, tok, template)
    except (DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    print(f"source: {path} ({info.origin}; licence: {info.licence})")
    print(f"format: {format}, template: {template}, tokenizer: {tokenizer or DEFAULT_TOKENIZER}, "
          f"max_length: {max_length}")
    print(f"rows: {report.total} read, {len(rows)} valid")
    if lengths:
        over = sum(1 for x in lengths if x["total"] > max_length)
        print(f"token lengths ({len(lengths)} valid rows; responses include the EOS token):")
        for line in _stats_table(lengths):
            print(line)
        print(f"rows longer than max_length={max_length}: {over} (dropped or truncated by data.truncation)")
    for line in _report_lines(report):
        print(line)
    if report.issues and not skip_invalid:
        first = report.issues[0]
        error = DataError(path, first.reason, first.row, first.field)
        print(f"error: {error}", file=sys.stderr)
        print(f"error: {report.dropped} invalid row(s); rerun with --skip-invalid to drop them",
              file=sys.stderr)
        return 1
    return 0
