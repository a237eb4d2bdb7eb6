"""``inspect_main`` (wired to ``rlhf-ray data inspect``) and the package's import isolation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_ray.data.inspect import inspect_main, length_stats, percentile

HERE = Path(__file__).parent
BAD, GOOD = HERE / "bad", HERE / "good"


def test_missing_chosen_in_row_3_fails_and_names_it(capsys):
    """The done-criterion: row 3 lacks 'chosen' -> non-zero exit, output names row 3 and chosen."""
    code = inspect_main(str(BAD / "missing_chosen.jsonl"), "preference", None, 512, False, "alpaca")
    out, err = capsys.readouterr()
    assert code != 0
    for stream in (out, err):
        assert "row 3" in stream and "'chosen'" in stream
    assert "missing_chosen.jsonl: row 3: field 'chosen' is missing (expected a non-empty string)" in err
    assert "--skip-invalid" in err


def test_skip_invalid_reports_and_succeeds(capsys):
    code = inspect_main(str(BAD / "missing_chosen.jsonl"), "preference", None, 512, True, "alpaca")
    out, _ = capsys.readouterr()
    assert code == 0
    assert "rows: 3 read, 2 valid" in out and "invalid rows: 1" in out and "row 3: field 'chosen'" in out


def test_statistics_of_a_good_file(capsys):
    code = inspect_main(str(GOOD / "prefs.jsonl"), "preference", "tiny-llama", 512, False, "chat")
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "rows: 4 read, 4 valid" in out and "duplicates: 0" in out and "invalid rows: 0" in out
    for column in ("prompt", "chosen", "rejected", "total"):
        assert f"  {column} " in out
    assert "min" in out and "p95" in out


def test_duplicates_and_too_long_are_counted(capsys):
    code = inspect_main(str(BAD / "duplicate_rows.jsonl"), "instruction", None, 512, False, "alpaca")
    out, _ = capsys.readouterr()
    assert code == 1 and "duplicates: 1" in out and "row 4: field 'instruction' repeats row 2" in out
    code = inspect_main(str(BAD / "prompt_too_long.jsonl"), "prompt", None, 64, True, "alpaca")
    out, _ = capsys.readouterr()
    assert code == 0 and "row 2: field 'prompt' is too long" in out


def test_unreadable_file_and_bad_arguments(capsys):
    assert inspect_main(str(BAD / "not_a_list.json"), "preference", None, 512, False, "alpaca") == 1
    assert "not_a_list.json" in capsys.readouterr().err
    assert inspect_main(str(GOOD / "prefs.jsonl"), "pairs", None, 512, False, "alpaca") == 2
    assert inspect_main(str(GOOD / "prefs.jsonl"), "preference", "/no/such/tokenizer", 512, False, "alpaca") == 2
    assert "tokenizer" in capsys.readouterr().err


def test_builtin_source_can_be_inspected(capsys):
    assert inspect_main("gsm8k", "prompt", None, 1024, False, "chat") == 0
    out = capsys.readouterr().out
    assert "rows: 1319 read, 1319 valid" in out and "MIT" in out


def test_percentiles():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 95) == 5
    stats = length_stats([1, 2, 3, 4, 100])
    assert stats["min"] == 1 and stats["max"] == 100 and stats["p50"] == 3 and stats["mean"] == 22


def test_cli_data_inspect():
    script = Path(sys.executable).parent / "rlhf-ray"
    if not script.exists():
        pytest.skip("the rlhf-ray script is not installed")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if subprocess.run([str(script), "data", "inspect", "--help"], capture_output=True, env=env).returncode != 0:
        pytest.skip("rlhf-ray has no 'data inspect' command yet")
    bad = subprocess.run([str(script), "data", "inspect", str(BAD / "missing_chosen.jsonl"), "--format", "preference"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode != 0
    assert "row 3" in bad.stderr and "'chosen'" in bad.stderr
    good = subprocess.run([str(script), "data", "inspect", str(GOOD / "chat.jsonl"), "--format", "conversation",
                           "--template", "chat", "--max-length", "256"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert good.returncode == 0, good.stderr
    assert "rows: 2 read, 2 valid" in good.stdout


def test_import_loads_no_ray_vllm_deepspeed():
    code = ("import sys, rlhf_ray.data; "
            "bad = [m for m in ('ray', 'vllm', 'deepspeed') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
