"""Driver-side start-up: the environment workers need, and a Ray session."""

from __future__ import annotations

import contextlib
import os

from rlhf_ray.config import RayConfig

# Set for every worker process; each value can be overridden by the user's environment.
WORKER_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "RAY_DEDUP_LOGS": "0",
}


def worker_env(kv_cache_gib: int | None = None) -> dict[str, str]:
    env = {k: os.environ.get(k, v) for k, v in WORKER_ENV.items()}
    if kv_cache_gib is not None and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
    try:
        import torch

        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", os.environ.get("DS_ACCELERATOR", "cpu"))
    except ImportError:
        pass
    return env


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
    """

    def __init__(self, interval_s: float = 1.0):
        import threading

        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="memory-monitor")

    def sample(self) -> int:
        import psutil

        root = psutil.Process()
        total = 0
        for proc in [root, *root.children(recursive=True)]:
            try:
                info = proc.memory_full_info()
                total += getattr(info, "pss", 0) or info.rss
            except psutil.Error:
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self.sample())
            self._stop.wait(self.interval_s)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 2**30

    def __enter__(self) -> MemoryMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
