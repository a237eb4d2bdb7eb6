"""The catalogue of malformed files in tests/data/bad/: each gives a clear error that names the
file, the row and the field; with skip_invalid the bad rows are dropped, counted and listed."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_ray.config import DataConfig
from rlhf_ray.data import DataError, load_rows

BAD = Path(__file__).parent / "bad"

# (file, format, max_length, substrings the error message must contain)
CATALOGUE = [
    ("missing_chosen.jsonl", "preference", None, ["row 3:", "field 'chosen'", "is missing", "expected a non-empty string"]),
    ("empty_output.jsonl", "instruction", None, ["row 2:", "field 'output'", "is empty"]),
    ("wrong_type.jsonl", "preference", None, ["row 2:", "field 'rejected'", "has type int", "expected a non-empty string"]),
    ("chosen_equals_rejected.jsonl", "preference", None, ["row 2:", "field 'rejected'", "identical to 'chosen'"]),
    ("bad_json_line.jsonl", "preference", None, ["row 3:", "is not valid JSON", "column"]),
    ("invalid_utf8.jsonl", "instruction", None, ["row 2:", "field 'output'", "invalid UTF-8"]),
    ("invalid_utf8.csv", "preference", None, ["row 2:", "field 'chosen'", "invalid UTF-8"]),
    ("prompt_too_long.jsonl", "prompt", 64, ["row 2:", "field 'prompt'", "too long", "max_length=64"]),
    ("duplicate_rows.jsonl", "instruction", None, ["row 4:", "field 'instruction'", "repeats row 2"]),
    ("bad_role.jsonl", "conversation", None, ["row 1:", "field 'messages[1].role'", "'bot'", "expected one of system, user, assistant"]),
    ("last_not_assistant.jsonl", "conversation", None, ["row 2:", "field 'messages[2].role'", "expected the last message to be 'assistant'"]),
    ("missing_column.csv", "preference", None, ["row 1:", "field 'chosen'", "is missing"]),
    ("extra_cells.csv", "preference", None, ["row 2:", "has 4 cells (expected 3"]),
    ("unknown_checker.jsonl", "prompt", None, ["row 1:", "field 'checker'", "'magic'", "unknown checker"]),
    ("answer_wrong_type.jsonl", "prompt", None, ["row 2:", "field 'answer'", "has type list"]),
    ("chosen_two_messages.jsonl", "preference", None, ["row 1:", "field 'chosen'", "has 2 messages", "one assistant message"]),
    ("mixed_forms.jsonl", "preference", None, ["row 1:", "field 'chosen'", "list of messages but 'prompt' is a string"]),
    ("row_not_object.json", "instruction", None, ["row 2:", "is a str", "expected an object"]),
    ("data_missing_field.json", "instruction", None, ["row 2:", "field 'instruction'", "is missing"]),
    # Whole-file problems: no row or field to name, but the file and what was expected.
    ("empty.jsonl", "instruction", None, ["the file is empty", "expected one JSON object per line"]),
    ("blank_lines.jsonl", "instruction", None, ["the file is empty"]),
    ("header_only.csv", "preference", None, ["has a header (prompt, chosen, rejected) but no rows"]),
    ("not_a_list.json", "preference", None, ["JSON object without a 'data' list", "found keys: rows"]),
    ("scalar.json", "preference", None, ["holds a JSON int", "expected a JSON list"]),
    ("broken.json", "instruction", None, ["line 3, column", "invalid JSON"]),
    ("jsonl_named_json.json", "preference", None, ["line 2", "rename it to .jsonl"]),
    ("notes.txt", "instruction", None, ["unsupported extension '.txt'", ".jsonl"]),
]


def _config(name: str, fmt: str, max_length: int | None, skip_invalid: bool = False) -> DataConfig:
    return DataConfig(source=str(BAD / name), format=fmt, max_length=max_length or 512,
                      skip_invalid=skip_invalid)


def test_catalogue_is_complete():
    assert len(CATALOGUE) >= 12
    assert {c[0] for c in CATALOGUE} == {p.name for p in BAD.iterdir()}


@pytest.mark.parametrize("name,fmt,max_length,expected", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_file_gives_clear_error(name, fmt, max_length, expected, tok):
    with pytest.raises(DataError) as err:
        load_rows(_config(name, fmt, max_length), split="all", tokenizer=tok)
    message = str(err.value)
    assert message.startswith(str(BAD / name) + ": "), message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


# (file, format, rows kept, rows dropped) for files where only some rows are bad.
SKIPPABLE = [
    ("missing_chosen.jsonl", "preference", 2, 1),
    ("bad_json_line.jsonl", "preference", 2, 1),
    ("invalid_utf8.jsonl", "instruction", 1, 1),
    ("invalid_utf8.csv", "preference", 1, 1),
    ("duplicate_rows.jsonl", "instruction", 3, 1),
    ("prompt_too_long.jsonl", "prompt", 1, 1),
    ("extra_cells.csv", "preference", 1, 1),
    ("row_not_object.json", "instruction", 1, 1),
]


@pytest.mark.parametrize("name,fmt,kept,dropped", SKIPPABLE, ids=[c[0] for c in SKIPPABLE])
def test_skip_invalid_drops_and_counts(name, fmt, kept, dropped, tok):
    data = load_rows(_config(name, fmt, 64 if "too_long" in name else None, skip_invalid=True),
                     split="all", tokenizer=tok)
    assert len(data.rows) == kept
    assert data.report.total == kept + dropped
    assert data.report.dropped == dropped and data.report.kept == kept
    assert all(i.row is not None and i.reason for i in data.report.issues)


def test_skip_invalid_report_lists_row_field_reason(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        '{"prompt": "a", "chosen": "x", "rejected": "y"}\n'
        '{"prompt": "b", "chosen": "x"}\n'
        '{"prompt": "c", "chosen": "same", "rejected": "same"}\n'
        '{"prompt": "a", "chosen": "x", "rejected": "y"}\n'
        '{"prompt": "d", "chosen": "x", "rejected": "y"}\n')
    data = load_rows(DataConfig(source=str(path), format="preference", skip_invalid=True), split="all")
    assert [r.prompt for r in data.rows] == ["a", "d"]
    issues = [(i.row, i.field, i.kind) for i in data.report.issues]
    assert issues == [(2, "rejected", "invalid"), (3, "rejected", "invalid"), (4, "prompt", "duplicate")]
    assert data.report.duplicates == 1
    summary = data.report.summary()
    assert "5 rows read, 2 kept, 3 dropped" in summary and "row 4: field 'prompt' repeats row 1" in summary


def test_default_error_suggests_skip_invalid():
    with pytest.raises(DataError, match="skip_invalid=true"):
        load_rows(_config("missing_chosen.jsonl", "preference", None), split="all")


def test_nothing_valid_left_is_an_error(tmp_path):
    path = tmp_path / "all_bad.jsonl"
    path.write_text('{"prompt": "a"}\n')
    with pytest.raises(DataError, match="no valid rows left"):
        load_rows(DataConfig(source=str(path), format="preference", skip_invalid=True), split="all")
