"""Learner -> rollout weight transport, with versions.

Three transports, one interface (:class:`WeightSync`):

- ``shared_memory`` (CPU, every rollout worker on learner rank 0's node; the default
  there): rank 0 keeps one anonymous shared-memory buffer (``memfd``) laid out as the
  rollouts' state dict, in the rollouts' dtype, and casts its weights into it at each sync.
  Each vLLM worker maps the buffer once (through ``/proc/<pid>/fd/<fd>``) and loads from
  views into it. No allocation on either side after the first sync: on a machine where
  fresh pages are slow to fault in, the object store's copy varied from 0.3 to 3.5 s.
  The buffer dies with the learner process, so nothing is left in ``/dev/shm``.
- ``object_store`` (CPU, across nodes): learner rank 0 puts its full state dict into
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
import os
import time
from collections.abc import Iterator

import torch

TensorMeta = tuple[str, str, list[int]]  # (name, dtype name, shape)


# --------------------------------------------------------------------------- pure helpers


def tensor_metadata(state: dict[str, torch.Tensor]) -> list[TensorMeta]:
    return [(name, str(t.dtype).removeprefix("torch."), list(t.shape)) for name, t in state.items()]


def tied_to(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{name: earlier name}`` for each tensor that is the same memory as an earlier one (a
    tied output embedding). Both names are still sent, as one tensor: vLLM's in-place reload
    puts a layer's old weights back when it gets nothing for it, which would undo the
    shared weight's update."""
    first: dict[tuple[int, int, tuple], str] = {}
    tied = {}
    for name, t in state.items():
        key = (t.data_ptr(), t.numel(), tuple(t.shape))
        if t.numel() and key in first:
            tied[name] = first[key]
        else:
            first.setdefault(key, name)
    return tied


def cast_floating(state: dict[str, torch.Tensor], dtype: str | None) -> dict[str, torch.Tensor]:
    """Floating tensors cast to ``dtype`` (null: as they are); tied names keep sharing one
    tensor, so a serializer writes it once."""
    if dtype is None:
        return state
    target = getattr(torch, dtype)
    tied = tied_to(state)
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        out[k] = out[tied[k]] if k in tied else (v.to(target) if v.is_floating_point() else v)
    return out


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


# --------------------------------------------------------------------------- shared memory

SharedLayout = list[tuple[str, str, list[int], int]]  # (name, dtype name, shape, byte offset)


def shared_layout(state: dict[str, torch.Tensor], dtype: str | None) -> tuple[SharedLayout, int]:
    """Where each tensor of ``state`` (floating ones cast to ``dtype``) lies in one buffer,
    64-byte aligned, tied names at one place; returns ``(layout, total bytes)``."""
    target = getattr(torch, dtype) if dtype is not None else None
    tied = tied_to(state)
    layout: SharedLayout = []
    at: dict[str, int] = {}
    offset = 0
    for name, t in state.items():
        held = target if target is not None and t.is_floating_point() else t.dtype
        if name in tied:
            layout.append((name, str(held).removeprefix("torch."), list(t.shape), at[tied[name]]))
            continue
        at[name] = offset
        layout.append((name, str(held).removeprefix("torch."), list(t.shape), offset))
        offset += -(-t.numel() * held.itemsize // 64) * 64
    return layout, max(offset, 64)


def shared_views(buffer: torch.Tensor, layout: SharedLayout) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` views into a uint8 ``buffer`` laid out by :func:`shared_layout`."""
    views = {}
    for name, dtype, shape, offset in layout:
        held = getattr(torch, dtype)
        views[name] = buffer[offset: offset + _numel(shape) * held.itemsize].view(held).view(shape)
    return views


class SharedWeights:
    """The writer's side: an anonymous shared-memory file holding one copy of the weights.

    ``write(state)`` casts each tensor into its place (the layout is fixed at the first
    write and rebuilt only if names, shapes or dtypes change); ``handle()`` is what a
    reader needs to map it: a plain dict, so it passes through Ray and ``collective_rpc``."""

    def __init__(self, state: dict[str, torch.Tensor], dtype: str | None):
        import mmap
        import uuid

        self.dtype = dtype
        self.layout, self.nbytes = shared_layout(state, dtype)
        self.fd = os.memfd_create("rlhf_ray_weights", 0)
        os.ftruncate(self.fd, self.nbytes)
        self._map = mmap.mmap(self.fd, self.nbytes)
        self.views = shared_views(torch.frombuffer(self._map, dtype=torch.uint8), self.layout)
        self.tied = tied_to(state)
        self.token = uuid.uuid4().hex  # tells readers a new buffer from one they mapped

    def fits(self, state: dict[str, torch.Tensor], dtype: str | None) -> bool:
        return dtype == self.dtype and shared_layout(state, dtype)[0] == self.layout

    def write(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, t in state.items():
                if name not in self.tied:
                    self.views[name].copy_(t)

    def handle(self) -> dict:
        return {"path": f"/proc/{os.getpid()}/fd/{self.fd}", "nbytes": self.nbytes,
                "layout": self.layout, "token": self.token}

    def close(self) -> None:
        self.views = {}
        try:
            self._map.close()
        except BufferError:  # a view is still alive somewhere: the mapping goes with the process
            pass
        os.close(self.fd)


class SharedReader:
    """The reader's side: maps a writer's buffer once per ``token`` and hands out views."""

    def __init__(self):
        self.token: str | None = None
        self.views: dict[str, torch.Tensor] = {}
        self._map = None

    def views_of(self, handle: dict) -> dict[str, torch.Tensor]:
        import mmap

        if handle["token"] != self.token:
            self.views, self._map = {}, None  # the old mapping goes once nothing views it
            try:
                fd = os.open(handle["path"], os.O_RDONLY)
            except OSError as e:
                raise RuntimeError(f"weight sync: cannot open the learner's shared weights at "
                                   f"{handle['path']} ({e}); set weight_sync.transport=object_store") from e
            try:
                self._map = mmap.mmap(fd, handle["nbytes"], prot=mmap.PROT_READ)
            finally:
                os.close(fd)
            import warnings

            with warnings.catch_warnings():  # read-only memory: the views are never written
                warnings.simplefilter("ignore", UserWarning)
                buffer = torch.frombuffer(self._map, dtype=torch.uint8)
            self.views = shared_views(buffer, [(n, d, list(s), o) for n, d, s, o in handle["layout"]])
            self.token = handle["token"]
        return self.views


# --------------------------------------------------------------------------- learner side


class WeightSender:
    """Mixed into LearnerWorker. Needs ``self.get_state_dict()`` (full weights on rank 0,
    ``{}`` elsewhere; every rank must call it, as ZeRO-3 gathers collectively)."""

    def publish_weights(self, dtype: str | None = None) -> list:
        """Object-store transport: rank 0 returns ``[ObjectRef]``, other ranks ``[]``.
        ``dtype``: the rollouts' weight dtype; floating tensors are cast to it first, so a
        bf16 engine gets half the bytes (it would cast them on load anyway)."""
        import ray

        state = cast_floating(self.get_state_dict(), dtype)
        refs = [ray.put(state)] if state else []
        del state
        self.release_memory()
        return refs

    def publish_shared(self, dtype: str | None = None) -> dict | None:
        """Shared-memory transport: rank 0 casts its weights into its buffer (made at the
        first call) and returns the buffer's handle; other ranks return None."""
        state = self.get_state_dict()
        if not state:
            return None
        shared = getattr(self, "_shared_weights", None)
        if shared is None or not shared.fits(state, dtype):
            if shared is not None:
                shared.close()
            shared = self._shared_weights = SharedWeights(state, dtype)
        shared.write(state)
        del state
        self.release_memory()
        return shared.handle()

    def release_memory(self) -> None:
        """Called after memory-heavy work (a publish); the learner may trim its heap."""

    def weights_metadata(self, tied: bool = True) -> list[TensorMeta]:
        """The full state dict's ``(name, dtype, shape)`` on rank 0; ``tied=False``: less
        the tied names, whose tensor the object store sends once."""
        state = self.get_state_dict()
        tied_names = tied_to(state) if state and not tied else {}
        return tensor_metadata({k: v for k, v in state.items() if k not in tied_names}) if state else []

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
        """``method``: ``auto`` is ``broadcast`` when both groups hold GPUs; else, at each
        sync, ``shared_memory`` when every rollout worker is on learner rank 0's node and
        ``object_store`` when one is not. ``backend`` (broadcast only): ``auto`` is NCCL on
        GPUs, else gloo. ``dtype`` (object store and shared memory): the rollouts' weight
        dtype, sent in it (null: as the learners hold them)."""
        if method not in ("auto", "shared_memory", "object_store", "broadcast"):
            raise ValueError("weight sync method must be 'auto', 'shared_memory', 'object_store' or "
                             f"'broadcast', got {method!r}")
        on_gpus = learners.resources.num_gpus > 0 and rollouts.resources.num_gpus > 0
        self.learners, self.rollouts = learners, rollouts
        self.method = ("broadcast" if on_gpus else "auto") if method == "auto" else method
        self.bucket_bytes = bucket_mb << 20
        self.backend = ("nccl" if on_gpus else "gloo") if backend == "auto" else backend
        self.dtype = dtype
        self._metadata: list[TensorMeta] | None = None
        self._group_size = 0
        self._bytes: int | None = None  # of one full copy of the weights, as sent
        self.version: int | None = None  # of the last sync

    def transport(self, ranks: list[int]) -> str:
        """The transport a sync to rollout workers ``ranks`` uses now."""
        if self.method != "auto":
            return self.method
        learner_node = self.learners.infos[0]["node_id"]
        same = all(self.rollouts.infos[r]["node_id"] == learner_node for r in ranks)
        return "shared_memory" if same else "object_store"

    def _publish(self, transport: str) -> list:
        """What the rollouts' ``load_weights`` takes: ``[ref]`` or ``[handle]``."""
        name = "publish_shared" if transport == "shared_memory" else "publish_weights"
        published = self.learners.call(name, self.dtype)
        if transport == "shared_memory":
            handle = next(h for h in published if h)
            self._bytes = handle["nbytes"]
            return [handle]
        return [r for rank_refs in published for r in rank_refs][:1]

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
        transport = self.transport(ranks)
        if transport != "broadcast":
            published = self._publish(transport)
            self.rollouts.get([self.rollouts.submit(r, "load_weights", version, published) for r in ranks],
                              ranks, "load_weights")
        else:
            self._metadata = None
            self.sync(version)

    def sync(self, version: int) -> dict:
        """Push the current learner weights to all rollout workers as ``version``."""
        self.version = version  # what the learners hold now (a replacement gets it too)
        start = time.perf_counter()
        transport = self.transport(list(range(len(self.rollouts))))
        if transport != "broadcast":
            published = self._publish(transport)
            publish_s = time.perf_counter() - start
            results = self.rollouts.call("load_weights", version, published)
        else:
            if self._metadata is None or self._group_size != len(self.rollouts):
                self._open()
            learner_refs = [self.learners.submit(r, "broadcast_weights", self.bucket_bytes)
                            for r in range(len(self.learners))]
            rollout_refs = [self.rollouts.submit(i, "receive_weights", version, self._metadata,
                                                 self.bucket_bytes) for i in range(len(self.rollouts))]
            self.learners.get(learner_refs, list(range(len(self.learners))), "broadcast_weights")
            results = self.rollouts.get(rollout_refs, list(range(len(self.rollouts))), "receive_weights")
            publish_s = 0.0
        seconds = time.perf_counter() - start
        if self._bytes is None:
            metadata = self._metadata or \
                [m for m in self.learners.call("weights_metadata", transport == "broadcast") if m][0]
            sent = getattr(torch, self.dtype) if self.dtype and transport == "object_store" else None

            def itemsize(dtype: str) -> int:
                held = getattr(torch, dtype)
                return (sent if sent is not None and held.is_floating_point else held).itemsize

            self._bytes = sum(_numel(shape) * itemsize(dtype) for _, dtype, shape in metadata)
        return {"perf/sync_s": seconds, "sync/version": float(version),
                "perf/sync_gb_per_s": self._bytes * len(self.rollouts) / 1e9 / max(seconds, 1e-9),
                "perf/sync_publish_s": publish_s,  # learner side: gather, cast, hand over
                "perf/sync_load_s": max(r.get("perf/sync_s", 0.0) for r in results),  # the slowest engine's load
                "sync/tensors": float(results[0].get("sync/tensors", 0.0)),
                "sync/shared_memory": float(transport == "shared_memory")}
