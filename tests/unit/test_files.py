"""The one atomic writer: a reader sees the old file or the new one, never a half-written one."""

from __future__ import annotations

import errno
import json
import os

import pytest

from rlhf_ray import files


def test_writes_replace_the_file_and_leave_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    files.write_json_atomic(path, {"a": 1})
    files.write_json_atomic(path, {"a": 2, "path": tmp_path})  # non-JSON values as strings
    assert json.loads(path.read_text()) == {"a": 2, "path": str(tmp_path)}
    files.write_jsonl_atomic(tmp_path / "rows.jsonl", [{"x": "é"}, {"x": 1.5}])
    assert (tmp_path / "rows.jsonl").read_text(encoding="utf-8") == '{"x": "é"}\n{"x": 1.5}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl", "summary.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    """A full disk while the new content is flushed: the old file stays whole, no temporary."""
    path = tmp_path / "config.yaml"
    files.write_atomic(path, "old: 1\n")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        files.write_atomic(path, "new: 2\n" * 1000)
    assert path.read_text() == "old: 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_scratch_folders_of_exited_processes_are_swept_and_live_ones_kept(tmp_path):
    import subprocess
    import sys

    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                            capture_output=True, text=True, check=True)
    dead = tmp_path / f"{files.SCRATCH_PREFIX}{exited.stdout.strip()}_abc"
    live = tmp_path / f"{files.SCRATCH_PREFIX}{os.getppid()}_def"
    mine = tmp_path / f"{files.SCRATCH_PREFIX}{os.getpid()}_ghi"
    other = tmp_path / "vllm_dist_0123"
    for d in (dead, live, mine):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "f").write_text("x")
    other.write_text("not a scratch folder")

    assert files.sweep_scratch(str(tmp_path)) == [str(dead)]
    assert not dead.exists() and live.exists() and mine.exists() and other.exists()


def test_temp_files_made_in_the_block_land_in_this_process_scratch(monkeypatch):
    import tempfile

    monkeypatch.setenv("VLLM_RPC_BASE_PATH", "")  # put back as it was after the test
    monkeypatch.delenv("VLLM_RPC_BASE_PATH")
    outside = tempfile.gettempdir()
    with files.temp_files_in_scratch() as scratch:
        assert os.path.basename(scratch).startswith(f"{files.SCRATCH_PREFIX}{os.getpid()}_")
        with tempfile.NamedTemporaryFile() as f:
            assert os.path.dirname(f.name) == scratch
        assert os.environ["TMPDIR"] == scratch and os.environ["VLLM_RPC_BASE_PATH"] == scratch
    assert tempfile.gettempdir() == outside and os.environ.get("TMPDIR") != scratch
    assert files.scratch_dir() == scratch  # one per process
