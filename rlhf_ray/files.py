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
