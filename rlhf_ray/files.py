"""Atomic file writes: the one way the project writes a file a reader may open at any time.

A write goes to a temporary file beside the target, is flushed to disk, then renamed over
the target. A reader (or a resumed run) sees the old file or the new one, never half of
one; a write that fails (a full disk, a kill) leaves the old file as it was.
"""

from __future__ import annotations

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
