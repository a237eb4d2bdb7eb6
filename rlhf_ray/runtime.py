"""Driver-side start-up: the environment workers need, and a Ray session."""

from __future__ import annotations

import contextlib
import os
import socket

from rlhf_ray.config import RayConfig
from rlhf_ray.errors import UserError

# Set for every worker process; each value can be overridden by the user's environment.
WORKER_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "RAY_DEDUP_LOGS": "0",
}


def worker_env() -> dict[str, str]:
    """The variables above (the user's values win); a user's ``VLLM_CPU_KVCACHE_SPACE`` is
    passed on too, where it overrides ``rollout.kv_cache_gib``."""
    env = {k: os.environ.get(k, v) for k, v in WORKER_ENV.items()}
    if "VLLM_CPU_KVCACHE_SPACE" in os.environ:
        env["VLLM_CPU_KVCACHE_SPACE"] = os.environ["VLLM_CPU_KVCACHE_SPACE"]
    try:
        import torch

        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", os.environ.get("DS_ACCELERATOR", "cpu"))
    except ImportError:
        pass
    return env


class ClusterError(UserError, RuntimeError):
    """The Ray cluster cannot be reached, or cannot hold the workers a run asks for."""


def check_address(address: str, key: str = "ray.address", timeout_s: float = 5.0) -> None:
    """Fail in seconds, naming the address, when nothing listens there (``ray.init`` would
    retry for minutes). ``local`` and ``auto`` are left to Ray."""
    if address in ("local", "auto"):
        return
    expected = ("expected 'local', 'auto', the GCS address of a running head (host:6379) "
                "or ray://host:10001")
    target = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ClusterError(f"{key}={address!r} is not an address; {expected}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        why = e.strerror or str(e) or type(e).__name__
        raise ClusterError(f"{key}={address}: no Ray head answers there ({why}, waited up to "
                           f"{timeout_s:.0f} s); {expected} (is `ray start --head` running?)") from None


def check_resources(role: str, num_workers: int, per_worker: dict[str, float],
                    held: dict[str, float], keys: dict[str, str]) -> None:
    """On a private local Ray (all of it this run's, nothing to autoscale): refuse a group
    that can never be placed, instead of waiting ``ray.start_timeout_s`` for it.

    ``per_worker``: {"CPU": ..., "GPU": ...} each worker reserves; ``held``: what this run's
    running groups already reserve; ``keys``: the config key of each resource, for the message.
    """
    import ray

    total = ray.cluster_resources()
    for kind, each in per_worker.items():
        need = each * num_workers
        if need <= 0:
            continue
        have, busy = float(total.get(kind, 0.0)), held.get(kind, 0.0)
        if need + busy > have + 1e-9:
            already = f", {busy:g} of them already held by this run's other workers" if busy else ""
            raise ClusterError(
                f"{role}: {num_workers} worker(s) x {each:g} {kind} ({keys.get(kind, kind)}) = "
                f"{need:g} {kind}, but the local Ray has {have:g} {kind} in all{already}; "
                f"expected at most {max(have - busy, 0):g} (lower {keys.get(kind, kind)}"
                + (", or raise ray.num_cpus)" if kind == "CPU" else ", or run where GPUs are)"))


@contextlib.contextmanager
def ray_session(cfg: RayConfig, env: dict[str, str] | None = None):
    """Connect to (or start) Ray for the duration of a recipe; shut a private one down after."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    owned = False
    if not ray.is_initialized():
        runtime_env = {"env_vars": env or worker_env()}
        if cfg.address == "local":
            ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False,
                     object_store_memory=cfg.object_store_mb << 20, runtime_env=runtime_env,
                     log_to_driver=cfg.log_to_driver)
        else:
            check_address(cfg.address)
            # Inside a submitted job the job's runtime env (the same variables) is merged in.
            os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
            ray.init(address=cfg.address, runtime_env=runtime_env, log_to_driver=cfg.log_to_driver)
        owned = True
    try:
        yield ray
    finally:
        if owned:
            ray.shutdown()


class MemoryMonitor:
    """Samples the resident memory of this process and all its descendants (a local Ray's
    daemons and workers included) in a background thread; ``peak_gib`` is the largest sum.

    Proportional set size (PSS) is used where the kernel reports it, so pages shared between
    workers (torch's libraries) count once; otherwise plain RSS, which overcounts them.
    ``stage(name)`` labels the samples taken until the next call: ``stage_peaks_gib`` gives
    each label's peak, and ``peak_breakdown`` the processes (by name) at the overall peak.
    """

    def __init__(self, interval_s: float = 1.0):
        import threading

        self.interval_s = interval_s
        self.peak_bytes = 0
        self.stage_peaks: dict[str, int] = {}
        self.peak_breakdown: dict[str, int] = {}
        self._stage = "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="memory-monitor")

    def stage(self, name: str) -> None:
        self._stage = name

    def sample_by_process(self) -> dict[str, int]:
        """Bytes per process name (a Ray worker's name is its actor class, ``ray::Learner``)."""
        import psutil

        root = psutil.Process()
        usage: dict[str, int] = {}
        for proc in [root, *root.children(recursive=True)]:
            try:
                info = proc.memory_full_info()
                name = proc.name()
            except psutil.Error:
                continue
            name = name.split(".")[0] if name.startswith("ray::") else name
            usage[name] = usage.get(name, 0) + (getattr(info, "pss", 0) or info.rss)
        return usage

    def _record(self) -> None:
        usage = self.sample_by_process()
        total = sum(usage.values())
        label = self._stage
        self.stage_peaks[label] = max(self.stage_peaks.get(label, 0), total)
        if total > self.peak_bytes:
            self.peak_bytes, self.peak_breakdown = total, usage

    def _run(self) -> None:
        while not self._stop.is_set():
            self._record()
            self._stop.wait(self.interval_s)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 2**30

    @property
    def stage_peaks_gib(self) -> dict[str, float]:
        return {k: round(v / 2**30, 2) for k, v in self.stage_peaks.items()}

    def peak_breakdown_gib(self, top: int = 8) -> dict[str, float]:
        ranked = sorted(self.peak_breakdown.items(), key=lambda kv: -kv[1])[:top]
        return {k: round(v / 2**30, 2) for k, v in ranked}

    def __enter__(self) -> MemoryMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
