"""Driver-side start-up: the environment workers need, and a Ray session."""

from __future__ import annotations

import contextlib
import os

from rlhf_ray.configs import RayConfig

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
            ray.init(address=cfg.address, runtime_env=runtime_env, log_to_driver=cfg.log_to_driver)
        owned = True
    try:
        yield ray
    finally:
        if owned:
            ray.shutdown()
