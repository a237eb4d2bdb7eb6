"""`rlhf-ray submit`: run a recipe as a Ray job on a running cluster.

    rlhf-ray submit --address http://HEAD:8265 ppo launch/configs/ppo_smollm2.yaml steps=50

The entrypoint is this project's CLI under the cluster's Python (``--python``, default: the
one running this command), with ``ray.address=auto`` so the recipe joins the cluster.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from rlhf_ray.errors import UserError
from rlhf_ray.runtime import worker_env


def connect(address: str):
    """A job client for the dashboard at ``address``; a :class:`UserError` naming the URL
    when nothing answers there."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, ValueError) as e:
        raise UserError(f"submit --address {address}: no Ray dashboard answers there ({e}); "
                        "expected the HTTP address of a running cluster's dashboard, e.g. "
                        "http://HEAD:8265 (is the head up, and its dashboard included?)") from None


def submit(address: str, recipe: str, items: list[str], python: str | None = None,
           working_dir: str | None = None, wait: bool = False, timeout_s: float = 3600) -> tuple[str, str]:
    """Submit and return (job id, final status or 'SUBMITTED')."""
    from ray.job_submission import JobStatus

    client = connect(address)
    if items and "=" not in items[0]:  # the config file, wherever the job's driver starts
        items = [str(Path(items[0]).resolve()), *items[1:]]
    entrypoint = " ".join([shlex.quote(python or sys.executable), "-m", "rlhf_ray.cli", recipe,
                           *map(shlex.quote, items), "ray.address=auto"])
    runtime_env: dict = {"env_vars": worker_env()}
    if working_dir:
        runtime_env["working_dir"] = working_dir
    job_id = _submit_with_retry(client, entrypoint, runtime_env)
    if not wait:
        return job_id, "SUBMITTED"
    deadline = time.time() + timeout_s
    status = client.get_job_status(job_id)
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) and time.time() < deadline:
        time.sleep(1.0)
        status = client.get_job_status(job_id)
    return job_id, str(status.value if hasattr(status, "value") else status)


def _submit_with_retry(client, entrypoint: str, runtime_env: dict, patience_s: float = 60.0) -> str:
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
                raise RuntimeError(f"{e}\nThe head's job agent did not come up in {patience_s:.0f} s. "
                                   "Is its port free? Another Ray on the same machine holds the "
                                   "default 52365; start the head with --dashboard-agent-listen-port."
                                   ) from None
            time.sleep(2.0)


def job_logs(address: str, job_id: str) -> str:
    return connect(address).get_job_logs(job_id)
