"""Every file loader (JSONL, JSON, Parquet, CSV, save_to_disk) on small files written to tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_ray.config import DataConfig
from rlhf_ray.data import DataError, InstructionRow, PreferenceRow, load_rows, read_file

ROWS = [
    {"instruction": "Give the opposite of the word.", "input": "hot", "output": "cold"},
    {"instruction": "Say hello in French.", "input": "", "output": "Bonjour."},
    {"instruction": "What is 4 * 5?", "input": "", "output": "The answer is 20."},
]
GOOD = Path(__file__).parent / "good"
EXPECTED = [InstructionRow(r["instruction"], r["output"], r["input"]) for r in ROWS]


def _load(path, fmt="instruction", **kw):
    return load_rows(DataConfig(source=str(path), format=fmt, **kw), split="all")


def test_jsonl(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS[:2]) + "\n\n" + json.dumps(ROWS[2]) + "\n")
    data = _load(path)
    assert data.rows == EXPECTED
    assert [r.row for r in data.rows] == [1, 2, 4]  # JSONL row numbers are line numbers
    assert data.info.rows == 3 and data.info.kind == "file" and "unknown" in data.info.licence


@pytest.mark.parametrize("wrap", [False, True])
def test_json_list_and_data_object(tmp_path, wrap):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"data": ROWS} if wrap else ROWS, indent=2))
    data = _load(path)
    assert data.rows == EXPECTED and [r.row for r in data.rows] == [1, 2, 3]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert _load(path).rows == EXPECTED


def test_csv(tmp_path):
    import csv

    path = tmp_path / "rows.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(ROWS)
    assert _load(path).rows == EXPECTED


def test_csv_fixture_with_quoted_commas():
    data = _load(GOOD / "prefs.csv", "preference")
    assert data.rows[1] == PreferenceRow("Say hi, politely.", "Hello, nice to meet you.", "Go away.")


@pytest.mark.parametrize("as_dict", [False, True])
def test_save_to_disk(tmp_path, as_dict):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    if as_dict:
        ds = datasets.DatasetDict({"train": ds, "test": ds.select([0])})
    path = tmp_path / "saved"
    ds.save_to_disk(str(path))
    data = _load(path)
    assert data.rows == EXPECTED and data.info.origin.startswith("save_to_disk")


def test_num_rows_keeps_first_rows(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    assert _load(path, num_rows=2).rows == EXPECTED[:2]


def test_plain_folder_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="save_to_disk"):
        read_file(str(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        read_file(str(tmp_path / "nope.jsonl"))


def test_good_fixtures_load():
    for name, fmt in [("prefs.jsonl", "preference"), ("prefs_conversational.jsonl", "preference"),
                      ("instructions.jsonl", "instruction"), ("chat.jsonl", "conversation"),
                      ("prompts.jsonl", "prompt")]:
        data = _load(GOOD / name, fmt)
        assert len(data) == data.report.total and data.report.dropped == 0, name


def test_conversational_rows_from_parquet_and_save_to_disk(tmp_path):
    import datasets

    rows = [{"prompt": [{"role": "user", "content": "Hi"}],
             "chosen": [{"role": "assistant", "content": "Hello!"}],
             "rejected": [{"role": "assistant", "content": "Go away."}]}]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "prefs.parquet"))
    ds.save_to_disk(str(tmp_path / "prefs"))
    for path in (tmp_path / "prefs.parquet", tmp_path / "prefs"):
        (row,) = _load(path, "preference").rows
        assert row.conversational and row.chosen == "Hello!" and row.rejected == "Go away."


def test_utf8_bom_and_crlf(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(json.dumps(r) for r in ROWS).encode() + b"\r\n")
    assert _load(path).rows == EXPECTED
    csv_path = tmp_path / "bom.csv"
    csv_path.write_bytes(b"\xef\xbb\xbfinstruction,output\r\nSay hi.,Hi.\r\n")
    assert _load(csv_path).rows == [InstructionRow("Say hi.", "Hi.")]
