"""Reading local files into raw records: JSONL, JSON, Parquet, CSV and ``save_to_disk`` folders.

Row numbers are 1-based and mean, per format:

- JSONL: the line number in the file (blank lines are skipped but still counted);
- JSON: the position in the list of rows;
- CSV: the data row (row 1 is the first row after the header);
- Parquet and ``save_to_disk``: the position in the table.

Text files are decoded as UTF-8 with ``surrogateescape``: a row with undecodable bytes is
still read, and validation reports the field that holds them. A problem that concerns the
whole file (missing, empty, not a list, unreadable) raises :class:`DataError` at once; a
problem of one row (e.g. a bad JSON line) becomes a :class:`RawRecord` with an ``error``, so
``skip_invalid`` can drop it like any other invalid row.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_ray.data.formats import RowError, type_name
from rlhf_ray.data.validate import DataError

FILE_KINDS: dict[str, str] = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
    ".parquet": "parquet", ".pq": "parquet", ".csv": "csv",
}
LOCAL_LICENCE = "unknown (local data: check its licence yourself)"


@dataclass(frozen=True)
class RawRecord:
    """One row as read: ``data`` (usually a dict), or an ``error`` found while reading it."""

    row: int
    data: Any = None
    error: RowError | None = None


@dataclass(frozen=True)
class SourceInfo:
    """Where data came from: its name, licence, origin and row count (records read)."""

    name: str
    licence: str
    origin: str
    rows: int
    kind: str = "file"  # "file" or "builtin"
    checker: str | None = None  # the checker name for prompt rows of a checkable built-in


def file_kind(path: Path) -> str:
    """``jsonl``, ``json``, ``csv``, ``parquet`` or ``save_to_disk``; raises DataError otherwise."""
    if path.is_dir():
        if any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
            return "save_to_disk"
        raise DataError(str(path), "is a folder but not one written by datasets' save_to_disk "
                                   "(expected dataset_info.json or dataset_dict.json in it)")
    kind = FILE_KINDS.get(path.suffix.lower())
    if kind is None:
        raise DataError(str(path), f"has an unsupported extension '{path.suffix}' "
                                   f"(expected one of {', '.join(sorted(FILE_KINDS))} or a save_to_disk folder)")
    return kind


def _decode(raw: bytes) -> str:
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    return raw.decode("utf-8", errors="surrogateescape")


def _read_bytes(path: Path, source: str, what: str) -> bytes:
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(source, f"the file is empty (expected {what})")
    return raw


def read_jsonl(path: Path, source: str, limit: int | None = None) -> list[RawRecord]:
    """One JSON object per line; a line that is not valid JSON becomes an error record."""
    text = _decode(_read_bytes(path, source, "one JSON object per line"))
    records: list[RawRecord] = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if limit is not None and len(records) >= limit:
            break
        line = line.strip()
        if not line:
            continue
        try:
            records.append(RawRecord(lineno, json.loads(line)))
        except json.JSONDecodeError as err:
            records.append(RawRecord(lineno, error=RowError(
                None, f"is not valid JSON: {err.msg} at column {err.colno} (expected one JSON object per line)")))
    return records


def read_json(path: Path, source: str) -> list[RawRecord]:
    """A JSON list of rows, or an object whose ``data`` key holds that list."""
    text = _decode(_read_bytes(path, source, "a JSON list of rows"))
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        hint = ""
        if err.msg == "Extra data":
            hint = "; it looks like JSON Lines: rename it to .jsonl"
        raise DataError(source, f"line {err.lineno}, column {err.colno}: invalid JSON: {err.msg}{hint}") from None
    if isinstance(value, dict):
        if isinstance(value.get("data"), list):
            value = value["data"]
        else:
            keys = ", ".join(map(str, list(value)[:8])) or "none"
            raise DataError(source, "is a JSON object without a 'data' list (expected a JSON list of "
                                    f"rows or {{\"data\": [...]}}; found keys: {keys})")
    if not isinstance(value, list):
        raise DataError(source, f"holds a JSON {type_name(value)} (expected a JSON list of rows "
                                "or {\"data\": [...]})")
    if not value:
        raise DataError(source, "holds an empty list (expected at least one row)")
    return [RawRecord(i, item) for i, item in enumerate(value, start=1)]


def read_csv(path: Path, source: str) -> list[RawRecord]:
    """A CSV file with a header row; every cell is a string (empty cells are empty strings)."""
    text = _decode(_read_bytes(path, source, "a header row and at least one data row"))
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        rows = list(reader)
    except csv.Error as err:
        raise DataError(source, f"line {reader.line_num}: unreadable CSV ({err})") from None
    header = reader.fieldnames or []
    if not rows:
        raise DataError(source, f"has a header ({', '.join(header)}) but no rows (expected at least one)")
    records = []
    for i, row in enumerate(rows, start=1):
        if None in row:
            records.append(RawRecord(i, error=RowError(
                None, f"has {len(header) + len(row[None])} cells (expected {len(header)}, one per header column)")))
        else:
            records.append(RawRecord(i, {k: v for k, v in row.items()}))
    return records


def read_parquet(path: Path, source: str) -> list[RawRecord]:
    """A Parquet table (read with pyarrow)."""
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several unrelated types
        raise DataError(source, f"is not a readable Parquet file ({type(err).__name__}: {err})") from None
    if not rows:
        raise DataError(source, "has no rows (expected at least one)")
    return [RawRecord(i, row) for i, row in enumerate(rows, start=1)]


def read_saved(path: Path, source: str) -> list[RawRecord]:
    """A folder written by ``datasets.Dataset.save_to_disk`` (or a DatasetDict: its ``train`` split)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises FileNotFoundError, ValueError, ArrowInvalid...
        raise DataError(source, f"cannot be loaded with datasets.load_from_disk ({type(err).__name__}: {err})") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if "train" in loaded:
            loaded = loaded["train"]
        elif len(splits) == 1:
            loaded = loaded[splits[0]]
        else:
            raise DataError(source, f"is a DatasetDict with splits {', '.join(splits)} "
                                    "(expected a 'train' split or a single split)")
    rows = loaded.to_list()
    if not rows:
        raise DataError(source, "has no rows (expected at least one)")
    return [RawRecord(i, row) for i, row in enumerate(rows, start=1)]


def read_file(source: str, limit: int | None = None) -> tuple[list[RawRecord], SourceInfo]:
    """Read a local file or ``save_to_disk`` folder; ``limit`` keeps the first N records."""
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(source, "does not exist (expected a .jsonl/.json/.csv/.parquet file, "
                                "a save_to_disk folder or a built-in source name)")
    kind = file_kind(path)
    if kind == "jsonl":
        records = read_jsonl(path, source, limit)
    else:
        reader = {"json": read_json, "csv": read_csv, "parquet": read_parquet,
                  "save_to_disk": read_saved}[kind]
        records = reader(path, source)
    if limit is not None:
        records = records[:limit]
    info = SourceInfo(name=path.name, licence=LOCAL_LICENCE, origin=f"{kind}: {path}",
                      rows=len(records), kind="file")
    return records, info
