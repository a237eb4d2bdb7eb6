"""`rlhf-ray submit`: run a recipe as a Ray job on a running cluster.

    rlhf-ray submit --address http://HEAD:8265 ppo launch/configs/ppo_smollm2.yaml steps=50

The entrypoint is this project's CLI under the cluster's Python (``--python``, default: the
one running this command), with ``ray.address=auto`` so the recipe joins the cluster.

The job's runtime environment is the worker environment this project always sets
(``runtime.worker_env()``), merged with the user's ``--runtime-env FILE`` (YAML or JSON; the
file wins on a conflicting variable) and ``--working-dir`` (which wins over the file's).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

from rlhf_ray.errors import UserError
from rlhf_ray.runtime import worker_env

# Ray's own spellings of the options it accepts (ray.runtime_env.RuntimeEnv); any other key is
# taken by Ray for a plugin and fails only when the job's environment is set up on the cluster.
RUNTIME_ENV_KEYS = ("working_dir", "py_modules", "py_executable", "excludes", "pip", "uv", "conda",
                    "container", "image_uri", "env_vars", "config", "worker_process_setup_hook",
                    "java_jars", "nsight", "rocprof_sys")


def load_runtime_env(path: str | Path) -> dict:
    """Read and check a runtime-env file: a mapping of Ray's runtime-env keys."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"runtime env file {p} does not exist")
    text = p.read_text()
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise UserError(f"runtime env file {p} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: "
                        f"{' '.join(str(e).split())}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"runtime env file {p} must hold a mapping (working_dir:, pip:, env_vars:, ...), "
                        f"not a {type(data).__name__}")
    for key in data:
        if key not in RUNTIME_ENV_KEYS:
            raise UserError(f"runtime env file {p}: unknown key '{key}'; Ray knows "
                            f"{', '.join(RUNTIME_ENV_KEYS)}")
    env_vars = data.get("env_vars", {})
    if not isinstance(env_vars, dict):
        raise UserError(f"runtime env file {p}: env_vars must be a mapping of NAME: \"value\"")
    for name, value in env_vars.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise UserError(f"runtime env file {p}: env_vars.{name} must be a string; quote it "
                            f"({name}: \"{value}\")")
    return data


def build_runtime_env(user: dict | None = None, working_dir: str | None = None,
                      source: str = "the runtime env") -> dict:
    """The job's runtime env: ``worker_env()`` under the user's env_vars, then ``working_dir``."""
    from ray.runtime_env import RuntimeEnv

    user = dict(user or {})
    runtime_env = {**user, "env_vars": {**worker_env(), **user.get("env_vars", {})}}
    if working_dir:
        runtime_env["working_dir"] = working_dir
    try:
        RuntimeEnv(**runtime_env)  # Ray's own checks of each option (types, pip/conda exclusion)
    except (TypeError, ValueError) as e:
        raise UserError(f"{source}: {' '.join(str(e).split())}") from None
    return runtime_env


def entrypoint(recipe: str, items: list[str], python: str | None = None) -> str:
    """The job's command: this CLI under ``python`` with ``ray.address=auto``."""
    if items and "=" not in items[0]:  # the config file, wherever the job's driver starts
        items = [str(Path(items[0]).resolve()), *items[1:]]
    return " ".join([shlex.quote(python or sys.executable), "-m", "rlhf_ray.cli", recipe,
                     *map(shlex.quote, items), "ray.address=auto"])


def submit(client, address: str, command: str, runtime_env: dict) -> str:
    """Submit ``command`` and return the job id."""
    from rlhf_ray.jobs import cluster_errors

    with cluster_errors(address):
        return _submit_with_retry(client, address, command, runtime_env)


def _submit_with_retry(client, address: str, entrypoint: str, runtime_env: dict,
                       patience_s: float = 60.0) -> str:
    """Submit, waiting out the head's job agent while it is still starting.

    A freshly started head answers "No available agent to submit job" until its job agent is up;
    that is a wait, not a failure. Any other error is raised at once.
    """
    deadline = time.time() + patience_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as e:
            if "No available agent" not in str(e):
                raise
            if time.time() > deadline:
                raise UserError(f"the job agent of {address} did not come up in "
                                f"{patience_s:.0f} s. Is its port free? Another Ray on the same machine "
                                "holds the default 52365; start the head with "
                                "--dashboard-agent-listen-port.") from None
            time.sleep(2.0)
