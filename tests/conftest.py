"""Test conventions: offline environment, tiny models, a local Ray, and no leftovers.

- Tiny models are session-scoped fixtures built offline (idempotent, cached in the
  asset folder).
- ``ray_local`` starts one private Ray per test session (``address="local"``, bounded
  object store) and shuts it down at the end.
- Every test session ends by checking that no Ray processes, no vLLM / DeepSpeed
  ``/dev/shm`` files and no vLLM / W&B temp files are left behind, and removes DeepSpeed's
  allreduce buffers.
"""

from __future__ import annotations

import glob
import os
import sys
import time

import pytest

# The environment from ENV.md, set before anything imports vllm, ray or deepspeed.
TEST_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "DS_ACCELERATOR": "cpu",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DEDUP_LOGS": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}
for _k, _v in TEST_ENV.items():
    os.environ.setdefault(_k, _v)
HELPERS = os.path.join(os.path.dirname(__file__), "helpers")  # test-only modules, also for workers
sys.path.insert(0, HELPERS)

SHM_PATTERNS = ("/dev/shm/psm_*", "/dev/shm/deepspeed_allreduce_buffer_*", "/dev/shm/plasma*",
                "/dev/shm/rlhf_ray_*")


def _shm_files() -> set[str]:
    return {f for pattern in SHM_PATTERNS for f in glob.glob(pattern)}


def loose_temp_files() -> set[str]:
    """What vLLM and W&B leave in the system temp folder when their process dies, and the
    scratch folders (``rlhf_ray.files``) of processes that no longer run: a vLLM engine's
    rendezvous files and sockets (UUID names), W&B's media and artifact folders, and Python
    multiprocessing's ``pymp-*`` folders (other than this process's own)."""
    import multiprocessing
    import re
    import tempfile

    from rlhf_ray.files import SCRATCH_PREFIX, _scratch_owner

    root = tempfile.gettempdir()
    uuid = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
    own_pymp = multiprocessing.current_process()._config.get("tempdir")
    found = set()
    for name in os.listdir(root):
        if (name.startswith("vllm_dist_") or name.endswith(("wandb-media", "wandb-artifacts"))
                or uuid.match(name)
                or (name.startswith("pymp-") and os.path.join(root, name) != own_pymp)
                or (name.startswith(SCRATCH_PREFIX) and _scratch_owner(name) != os.getpid())):
            found.add(os.path.join(root, name))
    return found


def pytest_collection_modifyitems(config, items):
    import torch

    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    if not torch.cuda.is_available():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_llama() -> str:
    """Folder of the tiny random Llama (SmolLM2 tokenizer)."""
    from rlhf_ray.assets import TINY_LLAMA, ensure

    return ensure(TINY_LLAMA)


@pytest.fixture(scope="session")
def tiny_rm() -> str:
    """Folder of the tiny scalar-head sequence classifier."""
    from rlhf_ray.assets import TINY_RM, ensure

    return ensure(TINY_RM)


@pytest.fixture(scope="session")
def smollm2() -> str:
    """Folder of the real SmolLM2-135M-Instruct (built by `rlhf-ray assets`)."""
    from rlhf_ray.assets import SMOLLM2, ensure

    return ensure(SMOLLM2)


@pytest.fixture(scope="session")
def ray_local():
    """One private local Ray for the whole session; workers use fractional CPUs."""
    import ray

    env = dict(TEST_ENV, PYTHONPATH=os.pathsep.join(filter(None, [HELPERS, os.environ.get("PYTHONPATH")])))
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False,
                 object_store_memory=512 << 20, log_to_driver=True,
                 runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()


def _own_ray_processes() -> list[str]:
    """Ray daemons started by this test session (descendants of this process)."""
    import psutil

    names = ("raylet", "gcs_server", "plasma_store")
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if any(n in " ".join(child.cmdline()) for n in names):
                found.append(f"{child.pid} {child.name()}")
        except psutil.Error:
            continue
    return found


@pytest.fixture(scope="session", autouse=True)
def no_leftovers():
    """Fail the session if it leaves Ray processes or vLLM/DeepSpeed shm files behind."""
    before, temp_before = _shm_files(), loose_temp_files()
    yield
    for f in glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"):
        if f not in before:
            os.remove(f)
    ray_procs = _own_ray_processes()
    for _ in range(30):  # Ray's daemons take a few seconds to exit after ray.shutdown()
        if not ray_procs:
            break
        time.sleep(0.5)
        ray_procs = _own_ray_processes()
    leaked = _shm_files() - before
    problems = []
    if leaked:
        problems.append(f"/dev/shm files left behind: {sorted(leaked)}")
    from rlhf_ray.files import sweep_scratch

    sweep_scratch()  # as the next run's start would: the folders of workers Ray has killed
    temp_leaked = loose_temp_files() - temp_before
    if temp_leaked:
        problems.append(f"temp files left behind: {sorted(temp_leaked)}")
    if ray_procs:
        problems.append(f"Ray processes still running: {ray_procs}")
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)
