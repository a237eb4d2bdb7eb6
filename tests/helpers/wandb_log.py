"""Read an offline W&B run file (``run-<id>.wandb``) back into W&B's own protobuf records.

The file is a log of ``wandb.proto.wandb_internal_pb2.Record`` messages in 32 KiB blocks
(a 7-byte ``:W&B`` header, then per chunk: CRC32 4 bytes, length 2 bytes, type 1 byte;
type 1 is a whole record, 2/3/4 its first/middle/last piece). This installed wandb has no
Python reader of its own (the writer is its Go core), so the tests decode it here with
wandb's protobuf classes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

BLOCK = 32768
HEADER = 7


def records(path: str | Path) -> Iterator:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file (header {data[:7]!r})")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos: pos + HEADER])
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk = data[pos + HEADER: pos + HEADER + length]
        pos += HEADER + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def read_run(run_dir: str | Path) -> dict:
    """The offline run under ``run_dir/wandb``: its config, group, tags, the history keys
    and rows, and how many system-metric (stats) records it holds."""
    files = list(Path(run_dir, "wandb").glob("offline-run-*/run-*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one offline run file under {run_dir}/wandb, found {files}")
    out: dict = {"config": {}, "history": [], "stats": 0, "group": None, "tags": [], "file": files[0]}
    for record in records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["group"], out["tags"] = record.run.run_group, list(record.run.tags)
            for item in record.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            row: dict = {}
            for item in record.history.item:
                path = [item.key] if item.key else list(item.nested_key)
                node = row
                for part in path[:-1]:  # a logged object (a table) arrives field by field
                    node = node.setdefault(part, {})
                node[path[-1]] = json.loads(item.value_json)
            out["history"].append(row)
        elif kind == "stats":
            out["stats"] += 1
    return out
