"""Learner -> rollout weight transport, with versions.

Two transports, one interface (:func:`sync_weights`):

- ``object_store`` (CPU machines, default): learner rank 0 puts its full state dict into
  Ray's object store once; every rollout worker fetches it by reference and loads it in
  place through the vLLM worker extension. The weights never pass through the driver.
- ``broadcast`` (GPU clusters): a dedicated process group joins learner rank 0 and every
  vLLM worker process (one rank per tensor-parallel shard). Parameters are packed into
  buckets of ``bucket_mb`` and broadcast from rank 0: NCCL on GPUs, gloo on CPU, so the
  same code path is tested on CPU machines.

The functions in the first half are pure torch (no Ray, no vLLM) and shared by both sides.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterator

import torch

TensorMeta = tuple[str, str, list[int]]  # (name, dtype name, shape)


# --------------------------------------------------------------------------- pure helpers


def tensor_metadata(state: dict[str, torch.Tensor]) -> list[TensorMeta]:
    return [(name, str(t.dtype).removeprefix("torch."), list(t.shape)) for name, t in state.items()]


def plan_buckets(metadata: list[TensorMeta], bucket_bytes: int) -> list[list[int]]:
    """Group tensor indices into buckets of at most ``bucket_bytes`` (one tensor may exceed it)."""
    buckets: list[list[int]] = [[]]
    size = 0
    for i, (_, dtype, shape) in enumerate(metadata):
        nbytes = _numel(shape) * getattr(torch, dtype).itemsize
        if buckets[-1] and size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(i)
        size += nbytes
    return [b for b in buckets if b]


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def open_group(master_addr: str, port: int, rank: int, world_size: int, backend: str,
               timeout_s: float = 300.0):
    """A process group independent of any default group (so learners keep their own)."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_addr, port, world_size, rank == 0, timeout=timeout)
    prefixed = dist.PrefixStore("rlhf_ray_weight_sync", store)
    if backend == "nccl":
        group = dist.ProcessGroupNCCL(prefixed, rank, world_size)
    elif backend == "gloo":
        group = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    else:
        raise ValueError(f"weight sync backend must be 'nccl' or 'gloo', got {backend!r}")
    return group, store


def _broadcast(group, buffer: torch.Tensor) -> None:
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([buffer], opts).wait()


def broadcast_send(group, state: dict[str, torch.Tensor], bucket_bytes: int,
                   device: str = "cpu") -> dict:
    """Rank 0: pack each bucket into one byte buffer and broadcast it."""
    metadata = tensor_metadata(state)
    tensors = list(state.values())
    total = 0
    for bucket in plan_buckets(metadata, bucket_bytes):
        flat = torch.cat([tensors[i].detach().contiguous().reshape(-1).view(torch.uint8).to(device)
                          for i in bucket])
        _broadcast(group, flat)
        total += flat.numel()
    return {"sync/bytes": float(total)}


def broadcast_recv(group, metadata: list[TensorMeta], bucket_bytes: int,
                   device: str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Other ranks: receive the buckets and yield ``(name, tensor)`` views into them."""
    for bucket in plan_buckets(metadata, bucket_bytes):
        sizes = [_numel(metadata[i][2]) * getattr(torch, metadata[i][1]).itemsize for i in bucket]
        flat = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
        _broadcast(group, flat)
        offset = 0
        for i, nbytes in zip(bucket, sizes):
            name, dtype, shape = metadata[i]
            yield name, flat[offset: offset + nbytes].view(getattr(torch, dtype)).reshape(shape)
            offset += nbytes


# --------------------------------------------------------------------------- learner side


class WeightSender:
    """Mixed into LearnerWorker. Needs ``self.get_state_dict()`` (full weights on rank 0,
    ``{}`` elsewhere; every rank must call it, as ZeRO-3 gathers collectively)."""

    def publish_weights(self, dtype: str | None = None) -> list:
        """Object-store transport: rank 0 returns ``[ObjectRef]``, other ranks ``[]``.
        ``dtype``: the rollouts' weight dtype; floating tensors are cast to it first, so a
        bf16 engine gets half the bytes (it would cast them on load anyway)."""
        import ray

        state = self.get_state_dict()
        if dtype is not None:
            target = getattr(torch, dtype)
            state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
        refs = [ray.put(state)] if state else []
        del state
        self.release_memory()
        return refs

    def release_memory(self) -> None:
        """Called after memory-heavy work (a publish); the learner may trim its heap."""

    def weights_metadata(self) -> list[TensorMeta]:
        state = self.get_state_dict()
        return tensor_metadata(state) if state else []

    def open_sync_group(self, master_addr: str, port: int, world_size: int, backend: str) -> bool:
        if getattr(self, "rank", 0) != 0:
            return False
        self._sync_group, self._sync_store = open_group(master_addr, port, 0, world_size, backend)
        return True

    def broadcast_weights(self, bucket_bytes: int) -> dict:
        state = self.get_state_dict()
        if not state:
            return {}
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return broadcast_send(self._sync_group, state, bucket_bytes, device)


# --------------------------------------------------------------------------- driver side


class WeightSync:
    """Moves the learners' weights to every rollout worker and stamps them with a version."""

    def __init__(self, learners, rollouts, method: str = "auto", bucket_mb: int = 256,
                 backend: str = "auto", dtype: str | None = None):
        """``method``: ``auto`` is ``broadcast`` when both groups hold GPUs, else
        ``object_store``. ``backend`` (broadcast only): ``auto`` is NCCL on GPUs, else gloo.
        ``dtype`` (object store only): the rollouts' weight dtype, sent in it (null: as the
        learners hold them)."""
        if method not in ("auto", "object_store", "broadcast"):
            raise ValueError(f"weight sync method must be 'auto', 'object_store' or 'broadcast', got {method!r}")
        on_gpus = learners.resources.num_gpus > 0 and rollouts.resources.num_gpus > 0
        self.learners, self.rollouts = learners, rollouts
        self.method = ("broadcast" if on_gpus else "object_store") if method == "auto" else method
        self.bucket_bytes = bucket_mb << 20
        self.backend = ("nccl" if on_gpus else "gloo") if backend == "auto" else backend
        self.dtype = dtype
        self._metadata: list[TensorMeta] | None = None
        self._group_size = 0
        self._bytes: int | None = None  # of one full copy of the weights
        self.version: int | None = None  # of the last sync

    def _open(self) -> None:
        info = self.learners.get([self.learners.submit(0, "node_info")], [0], "node_info")[0]
        shards = self.rollouts.call("num_shards")
        world = 1 + sum(shards)
        starts = [1 + sum(shards[:i]) for i in range(len(shards))]
        learner_refs = [self.learners.submit(r, "open_sync_group", info["ip"], info["free_port"], world,
                                             self.backend) for r in range(len(self.learners))]
        rollout_refs = [self.rollouts.submit(i, "open_sync_group", info["ip"], info["free_port"],
                                             starts[i], world, self.backend) for i in range(len(shards))]
        self.learners.get(learner_refs, list(range(len(self.learners))), "open_sync_group")
        self.rollouts.get(rollout_refs, list(range(len(shards))), "open_sync_group")
        self._metadata = [m for m in self.learners.call("weights_metadata") if m][0]
        self._group_size = len(shards)

    def push(self, ranks: list[int], version: int | None = None) -> None:
        """Give rollout workers ``ranks`` (new ones: scaled out, or replacing a dead worker)
        the learners' current weights, stamped ``version`` (default: the last synced one),
        before they get any work. Nothing to do before the first sync: a new worker loads
        the same starting weights. Broadcast reopens its group (its members changed) and
        syncs every worker."""
        version = self.version if version is None else version
        if version is None:
            return
        if self.method == "object_store":
            refs = [r for rank_refs in self.learners.call("publish_weights", self.dtype) for r in rank_refs]
            self.rollouts.get([self.rollouts.submit(r, "load_weights", version, refs[:1]) for r in ranks],
                              ranks, "load_weights")
        else:
            self._metadata = None
            self.sync(version)

    def sync(self, version: int) -> dict:
        """Push the current learner weights to all rollout workers as ``version``."""
        self.version = version  # what the learners hold now (a replacement gets it too)
        start = time.perf_counter()
        if self.method == "object_store":
            refs = [r for rank_refs in self.learners.call("publish_weights", self.dtype) for r in rank_refs]
            results = self.rollouts.call("load_weights", version, refs[:1])
        else:
            if self._metadata is None or self._group_size != len(self.rollouts):
                self._open()
            learner_refs = [self.learners.submit(r, "broadcast_weights", self.bucket_bytes)
                            for r in range(len(self.learners))]
            rollout_refs = [self.rollouts.submit(i, "receive_weights", version, self._metadata,
                                                 self.bucket_bytes) for i in range(len(self.rollouts))]
            self.learners.get(learner_refs, list(range(len(self.learners))), "broadcast_weights")
            results = self.rollouts.get(rollout_refs, list(range(len(self.rollouts))), "receive_weights")
        seconds = time.perf_counter() - start
        if self._bytes is None:
            metadata = self._metadata or [m for m in self.learners.call("weights_metadata") if m][0]
            sent = getattr(torch, self.dtype) if self.dtype and self.method == "object_store" else None

            def itemsize(dtype: str) -> int:
                held = getattr(torch, dtype)
                return (sent if sent is not None and held.is_floating_point else held).itemsize

            self._bytes = sum(_numel(shape) * itemsize(dtype) for _, dtype, shape in metadata)
        return {"perf/sync_s": seconds, "sync/version": float(version),
                "perf/sync_gb_per_s": self._bytes * len(self.rollouts) / 1e9 / max(seconds, 1e-9),
                "sync/tensors": float(results[0].get("sync/tensors", 0.0))}
