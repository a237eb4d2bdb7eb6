"""Atomic file writes, and each process's scratch folder.

Atomic writes are the one way the project writes a file a reader may open at any time. A
write goes to a temporary file beside the target, is flushed to disk, then renamed over
the target. A reader (or a resumed run) sees the old file or the new one, never half of
one; a write that fails (a full disk, a kill) leaves the old file as it was.

The scratch folder (:func:`scratch_dir`) holds the temporary files that vLLM and W&B would
otherwise leave in the system temp folder when their process is killed.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rlhf_ray.errors import UserError


def write_atomic(path: str | Path, text: str) -> Path:
    """Replace ``path`` with ``text`` in one rename; returns the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: str | Path, data: Any, **kwargs: Any) -> Path:
    """``data`` as indented JSON (values JSON cannot hold are written as strings)."""
    kwargs = {"indent": 2, "default": str, **kwargs}
    return write_atomic(path, json.dumps(data, **kwargs) + "\n")


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict]) -> Path:
    """One JSON object per line (UTF-8 kept as is)."""
    return write_atomic(path, "".join(json.dumps(r, ensure_ascii=False, default=float) + "\n"
                                      for r in rows))


def writable_dir(path: str | Path, what: str) -> Path:
    """Create folder ``path`` (and its parents) and prove it takes a file; ``what`` names it
    in the error (``run_dir``). A parent that is a file, a read-only file system or a full disk
    is a :class:`UserError` naming the path, not a traceback."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a folder" if blocker is not None else \
            (e.strerror or type(e).__name__)
        raise UserError(f"{what} {path}: cannot write there ({why}); expected a folder this "
                        f"user can create and write") from None
    return path


# --- this process's scratch folder --------------------------------------------------------
# vLLM and W&B put files in the system temp folder that they remove only on a clean exit: a
# vLLM engine's rendezvous file (``vllm_dist_*``) and, with several engine processes, its
# ZeroMQ sockets; W&B's ``*wandb-media`` and ``*wandb-artifacts`` folders. A worker killed
# by Ray or a signal leaves them behind. Each process that starts one of these gets a
# scratch folder of its own instead, named with its pid, and removes it when it exits; the
# next process that makes one (and the driver at the end of a run) removes the folders of
# processes that no longer run.

SCRATCH_PREFIX = "rlhf_ray_tmp_"
_scratch: str | None = None


def _scratch_owner(name: str) -> int | None:
    """The pid a scratch folder's name carries (``rlhf_ray_tmp_<pid>_<random>``), or None."""
    head = name[len(SCRATCH_PREFIX):].split("_", 1)[0]
    return int(head) if name.startswith(SCRATCH_PREFIX) and head.isdigit() else None


def sweep_scratch(root: str | None = None) -> list[str]:
    """Remove the scratch folders under ``root`` (the system temp folder) whose process has
    exited; returns the paths removed. Folders of running processes and of other users are
    kept."""
    import shutil
    import tempfile

    root = root or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(root)
    except OSError:
        return removed
    for name in names:
        pid = _scratch_owner(name)
        path = os.path.join(root, name)
        if pid is None or pid == os.getpid() or _alive(pid):
            continue
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def scratch_dir() -> str:
    """This process's scratch folder, made on first use (after sweeping the folders of exited
    processes) and removed when the process exits normally."""
    global _scratch
    if _scratch is None or not os.path.isdir(_scratch):
        import atexit
        import shutil
        import tempfile

        sweep_scratch()
        _scratch = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}_")
        atexit.register(shutil.rmtree, _scratch, ignore_errors=True)
    return _scratch


@contextlib.contextmanager
def temp_files_in_scratch():
    """While the block runs, ``tempfile`` (this process) and ``TMPDIR`` (processes started
    meanwhile) point at :func:`scratch_dir`, and so does ``VLLM_RPC_BASE_PATH`` (vLLM's
    sockets, kept afterwards: vLLM reads it again later and may cache it). A user's own
    ``VLLM_RPC_BASE_PATH`` wins."""
    import tempfile

    path = scratch_dir()
    os.environ.setdefault("VLLM_RPC_BASE_PATH", path)
    saved_env, saved_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = path, path
    try:
        yield path
    finally:
        tempfile.tempdir = saved_tempdir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
