"""WorkerGroup: N Ray actors of one role, placed, ranked, called together, failing clearly.

    group = WorkerGroup(RolloutWorker, "rollout", 2, args=(cfg.rollout, model_path),
                        resources=WorkerResources(num_cpus=0.5))
    results = group.call("generate", prompts)          # same arguments to every worker
    results = group.call_each("generate", [[a], [b]])  # one argument tuple per worker
    group.shutdown()

A failure or timeout raises :class:`WorkerError` naming the role, rank, node and cause, as
soon as the first call fails (a dead rank does not wait for the others to time out).
``WorkerError.died`` tells a dead worker process from a call that raised; the driver's
supervisor (:mod:`rlhf_ray.driver.supervisor`) replaces dead workers with
:meth:`WorkerGroup.replace`. Ray itself never restarts a worker or retries a call.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlhf_ray.errors import UserError


class WorkerError(UserError, RuntimeError):
    """A worker failed or timed out; the message names role, rank, node and cause.

    ``died``: the worker's process is gone (killed, crashed, its node lost), as opposed to a
    call that raised. ``timed_out``: the call did not finish in time. ``advice``: what the
    user can do next (e.g. the checkpoint a rerun resumes from), added by the driver."""

    def __init__(self, role: str, rank: int, node: str, cause: str, died: bool = False,
                 timed_out: bool = False):
        self.role, self.rank, self.node, self.cause = role, rank, node, cause
        self.died, self.timed_out = died, timed_out
        self.advice = ""
        super().__init__(role, rank, node, cause)

    def __str__(self) -> str:
        message = f"{self.role} worker rank {self.rank} on node {self.node} failed: {self.cause}"
        return f"{message}; {self.advice}" if self.advice else message


@dataclass
class WorkerResources:
    """Ray resources reserved for each worker of a group."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    custom: dict[str, float] = field(default_factory=dict)
    placement: str = "none"  # "none", "pack" or "spread": a placement group for the whole group


class Worker:
    """Base of every role's actor: identity, node info and the rendezvous environment."""

    role = "worker"

    def node_info(self) -> dict:
        return {"ip": ray.util.get_node_ip_address(), "host": socket.gethostname(),
                "pid": os.getpid(), "free_port": free_port(),
                "node_id": ray.get_runtime_context().get_node_id(), "gpu_ids": ray.get_gpu_ids()}

    def set_rank_env(self, rank: int, world_size: int, master_addr: str, master_port: int,
                     local_rank: int, local_world_size: int = 1) -> None:
        """torch.distributed rendezvous variables, set before any process group starts."""
        os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size),
                           "LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": str(local_world_size),
                           "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)})
        self.rank, self.world_size = rank, world_size

    def health(self) -> dict:
        return {"role": self.role, "pid": os.getpid(), "ok": True}


def role_device() -> str:
    """"cuda" in an actor that Ray gave a GPU (or a fraction of one), else "cpu"."""
    import torch

    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


def node_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_cpu_threads(threads: int | None, reserved_cpus: float) -> int:
    """Torch's intra-op CPU threads for a serving role (rollout, reference, reward model); returns
    the count. ``threads`` set: that many. Null: the CPUs the role reserved when at least
    one, else every core of the node: a role that reserves no CPU borrows the machine for
    its forwards, which run while the rollouts wait for them (Ray would give it one thread).
    On a GPU the count is left as it is."""
    import torch

    if torch.cuda.is_available() and ray.get_gpu_ids():
        return torch.get_num_threads()
    if threads is None:
        threads = int(reserved_cpus) if reserved_cpus >= 1 else node_cores()
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()


def release_free_memory() -> None:
    """Hand the heap memory this process has freed back to the OS (glibc's ``malloc_trim``).

    A training step or a weight load frees hundreds of MiB of tensors; glibc keeps most of
    it for reuse, so the worker's resident size stays at its high-water mark (measured: a
    135M-parameter learner holds 3.2 GiB between steps, 1.9 GiB after a trim). A no-op
    off glibc or on a GPU's memory, which this does not touch."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reuse_freed_memory() -> bool:
    """Keep the memory this process frees in its heap for the next allocation (glibc
    ``mallopt``): no allocation is served by its own ``mmap`` and the heap's top is never
    trimmed on its own. Returns whether it applied (glibc only).

    By default glibc maps every block above 32 MiB (logits, their gradient, an embedding's
    gradient) fresh from the OS and unmaps it on free, so each training step faults in
    hundreds of MiB of new pages, a cost a VM makes dear (measured: a DPO step of
    SmolLM2-135M, 8.4 -> 6.8 s). :func:`release_free_memory` still hands memory back on
    request (``learner.trim_memory``)."""
    import ctypes
    import ctypes.util

    m_trim_threshold, m_mmap_max = -1, -4
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _describe(info: dict) -> str:
    """A worker's node as error messages name it: ip (host, pid)."""
    return f"{info['ip']} ({info['host']}, pid {info['pid']})"


def _cause(error: BaseException) -> str:
    """The innermost readable cause of a Ray error."""
    if isinstance(error, ray.exceptions.RayTaskError):
        inner = error.cause if getattr(error, "cause", None) is not None else error
        return f"{type(inner).__name__}: {inner}".split("\n\nTraceback")[0].strip()
    if isinstance(error, ray.exceptions.RayActorError):
        # A failed __init__ carries its traceback as text: report its last "XError: ..." line.
        lines = [ln.strip() for ln in str(error).splitlines()]
        raised = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b.*:", ln)]
        return f"actor died: {raised[-1] if raised else lines[0]}"
    return f"{type(error).__name__}: {error}"


class WorkerGroup:
    """N actors of one role with per-worker resources; calls fan out and gather with a timeout."""

    def __init__(self, actor_cls: type, role: str, num_workers: int, args: Sequence = (),
                 kwargs: dict | None = None, resources: WorkerResources | None = None,
                 distributed: bool = False, timeout_s: float = 600.0, start_timeout_s: float = 600.0,
                 wait: bool = True):
        """``wait=False``: return once the workers are launched; :meth:`wait_started` waits
        for their constructors (so several groups can start side by side)."""
        self.actor_cls, self.role, self.args = actor_cls, role, tuple(args)
        self.kwargs = dict(kwargs or {})
        self.resources = resources or WorkerResources()
        # Starting a worker (placement, process, imports, model load) has its own limit:
        # it is slow on a busy machine and unrelated to how long a call may take.
        self.distributed, self.timeout_s, self.start_timeout_s = distributed, timeout_s, start_timeout_s
        self.workers: list[Any] = []
        self.nodes: list[str] = []
        self.infos: list[dict] = []  # each worker's node_info(): node id, ip, pid, GPUs
        self.dead: set[int] = set()  # ranks whose process died and were not replaced
        self._pg = None
        self._remote_cls = ray.remote(actor_cls)
        # workers launched and not yet waited for: (handles, their node_info refs)
        self._starting: tuple[list, list] | None = None
        self.add(num_workers, wait=wait)

    # ------------------------------------------------------------------ membership

    def _options(self, bundle_index: int | None) -> dict:
        r = self.resources
        opts: dict[str, Any] = {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus, "max_restarts": 0,
                                "max_task_retries": 0}
        if r.custom:
            opts["resources"] = dict(r.custom)
        if self._pg is not None and bundle_index is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=self._pg, placement_group_bundle_index=bundle_index)
        return opts

    def add(self, n: int, wait: bool = True) -> list[int]:
        """Start ``n`` more workers (scale out); returns their ranks. ``wait=False``: only
        launch them; :meth:`wait_started` waits for them."""
        if n < 0:
            raise ValueError(f"{self.role}: cannot add {n} workers")
        if self._starting is not None:
            raise RuntimeError(f"{self.role}: workers are still starting; wait_started() first")
        start = len(self.workers)
        ranks = list(range(start, start + n))
        new: list = []
        try:
            if self.resources.placement != "none" and start == 0 and n > 0:
                bundle = {"CPU": self.resources.num_cpus, "GPU": self.resources.num_gpus,
                          **self.resources.custom}
                bundle = {k: v for k, v in bundle.items() if v > 0} or {"CPU": 0.001}
                strategy = "PACK" if self.resources.placement == "pack" else "SPREAD"
                self._pg = placement_group([bundle] * n, strategy=strategy)
                self._gather([self._pg.ready()], [0], "placement group", self.start_timeout_s)
            for i in range(n):
                index = start + i if self._pg is not None and start + i < self._pg.bundle_count else None
                new.append(self._remote_cls.options(**self._options(index)).remote(*self.args, **self.kwargs))
            self._starting = (new, [w.node_info.remote() for w in new])
        except BaseException:
            self._abandon(new, start)
            raise
        if wait:
            self.wait_started()
        return ranks

    def wait_started(self) -> None:
        """Wait until the workers launched by :meth:`add` have run their constructors (and,
        for a distributed group, joined its rendezvous). A failed start leaves no
        half-started workers or placement behind."""
        if self._starting is None:
            return
        new, refs = self._starting
        self._starting = None
        start = len(self.workers)
        try:
            infos = self._gather(refs, list(range(start, start + len(new))), "start", self.start_timeout_s)
        except BaseException:
            self._abandon(new, start)
            raise
        self.workers.extend(new)
        self.infos.extend(infos)
        self.nodes.extend(_describe(info) for info in infos)
        if self.distributed:
            self._rendezvous(infos[0] if start == 0 else None)

    def _abandon(self, handles: list, start: int) -> None:
        """Kill workers that never finished starting; the placement group too if they were the first."""
        for handle in handles:
            ray.kill(handle, no_restart=True)
        if start == 0 and self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None

    def _rendezvous(self, master: dict | None) -> None:
        if master is None:
            raise ValueError(f"{self.role}: a distributed group cannot grow after start")
        by_node: dict[str, int] = {}
        local_ranks = []
        for rank in range(len(self.workers)):
            node = self.nodes[rank].split(" ")[0]
            local_ranks.append(by_node.get(node, 0))
            by_node[node] = local_ranks[-1] + 1
        refs = [worker.set_rank_env.remote(rank, len(self.workers), master["ip"], master["free_port"],
                                           local_ranks[rank], by_node[self.nodes[rank].split(" ")[0]])
                for rank, worker in enumerate(self.workers)]
        self._gather(refs, list(range(len(self.workers))), "rendezvous", self.start_timeout_s)

    def remove(self, n: int) -> None:
        """Stop the last ``n`` workers (scale in), letting each shut down cleanly."""
        if n > len(self.workers) - 1:
            raise ValueError(f"{self.role}: cannot remove {n} of {len(self.workers)} workers "
                             "(at least one must stay)")
        if n == 0:
            return
        gone = list(range(len(self.workers) - n, len(self.workers)))
        self._stop(gone)
        self.dead.difference_update(gone)
        del self.workers[-n:]
        del self.nodes[-n:]
        del self.infos[-n:]

    def replace(self, rank: int) -> dict:
        """Start a new worker in place of ``rank`` (dead, hung or alive: the old one is
        killed first), with the same arguments and placement; returns its node info. A
        distributed group cannot replace one rank: its process group would be broken."""
        if self.distributed:
            raise ValueError(f"{self.role}: a rank of a distributed group cannot be replaced")
        ray.kill(self.workers[rank], no_restart=True)
        index = rank if self._pg is not None and rank < self._pg.bundle_count else None
        handle = self._remote_cls.options(**self._options(index)).remote(*self.args, **self.kwargs)
        try:
            info = self._gather([handle.node_info.remote()], [rank], "restart", self.start_timeout_s)[0]
        except BaseException:
            ray.kill(handle, no_restart=True)
            raise
        self.workers[rank], self.infos[rank] = handle, info
        self.nodes[rank] = _describe(info)
        self.dead.discard(rank)
        return info

    @property
    def reserved(self) -> int:
        """Workers holding their resources: the started ones and those still starting."""
        return len(self.workers) + (len(self._starting[0]) if self._starting is not None else 0)

    def pid(self, rank: int) -> int:
        return self.infos[rank]["pid"]

    def __len__(self) -> int:
        return len(self.workers)

    # ------------------------------------------------------------------ calls

    def _started(self, method: str) -> list:
        if self._starting is not None:
            raise RuntimeError(f"{self.role}.{method}: its workers are still starting "
                               "(use a group started inside roles.together() after the block)")
        return self.workers

    def submit(self, rank: int, method: str, *args, **kwargs) -> ray.ObjectRef:
        return getattr(self._started(method)[rank], method).remote(*args, **kwargs)

    def call(self, method: str, *args, **kwargs) -> list:
        """Call ``method`` with the same arguments on every worker; one result per rank."""
        refs = [getattr(w, method).remote(*args, **kwargs) for w in self._started(method)]
        return self._gather(refs, list(range(len(refs))), method)

    def call_each(self, method: str, args_per_worker: Sequence[Sequence]) -> list:
        """Call ``method`` on worker i with ``args_per_worker[i]``."""
        if len(args_per_worker) != len(self._started(method)):
            raise ValueError(f"{self.role}.{method}: {len(args_per_worker)} argument sets for "
                             f"{len(self.workers)} workers")
        refs = [getattr(w, method).remote(*a) for w, a in zip(self.workers, args_per_worker)]
        return self._gather(refs, list(range(len(refs))), method)

    def get(self, refs: Sequence[ray.ObjectRef], ranks: Sequence[int], what: str = "call",
            timeout_s: float | None = None) -> list:
        """Gather refs submitted with :meth:`submit`, attributing failures to ranks; waits at
        most ``timeout_s`` (None: the group's ``timeout_s``)."""
        return self._gather(list(refs), list(ranks), what, timeout_s)

    def _gather(self, refs: list, ranks: list[int], what: str, timeout_s: float | None = None) -> list:
        """Results in order; the first failure raises at once, naming its rank."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        pending = list(refs)
        results: list = [None] * len(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                rank = ranks[refs.index(pending[0])]
                raise WorkerError(self.role, rank, self._node(rank),
                                  f"'{what}' timed out after {timeout_s:.0f} s", timed_out=True)
            i = refs.index(ready[0])
            results[i] = self._result(ready[0], ranks[i], what)  # raises if it failed
        return results

    def _result(self, ref: ray.ObjectRef, rank: int, what: str) -> Any:
        try:
            return ray.get(ref)
        except Exception as e:  # attribute the failure to its worker
            node = self._node(rank)
            if node == "unknown":  # died before reporting: Ray's message names the ip
                found = re.search(r"\bip=([\d.]+)", str(e))
                node = found.group(1) if found else node
            died = isinstance(e, ray.exceptions.RayActorError)
            if died:
                self.dead.add(rank)
            raise WorkerError(self.role, rank, node, f"'{what}': {_cause(e)}", died=died) from e

    def _node(self, rank: int) -> str:
        return self.nodes[rank] if rank < len(self.nodes) else "unknown"

    # ------------------------------------------------------------------ teardown

    def _stop(self, ranks: list[int]) -> None:
        refs = []
        for rank in ranks:
            # a group with a dead rank is killed at once: its other ranks may be stuck in a
            # collective with the dead one and would never run shutdown
            if hasattr(self.actor_cls, "shutdown") and not self.dead:
                refs.append(self.workers[rank].shutdown.remote())
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=60)
        for rank in ranks:
            ray.kill(self.workers[rank], no_restart=True)

    def shutdown(self) -> None:
        """Shut every worker down cleanly, then kill it and free the placement group."""
        if self._starting is not None:  # launched, never waited for
            self._abandon(self._starting[0], len(self.workers))
            self._starting = None
        self._stop(list(range(len(self.workers))))
        self.workers, self.nodes, self.infos = [], [], []
        self.dead.clear()
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None
