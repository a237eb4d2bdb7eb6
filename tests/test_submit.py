"""`rlhf-ray submit` and `rlhf-ray jobs` against one separately started Ray head.

The head requires token authentication (``RAY_AUTH_MODE=token``), as a Ray 2.60 head does
wherever a token exists; the CLI finds the token in ``RAY_AUTH_TOKEN``.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from rlhf_ray import jobs
from rlhf_ray.errors import UserError
from rlhf_ray.submit import load_runtime_env

ROOT = Path(__file__).resolve().parents[1]

# Stands in for the cluster's Python: reports what the job's environment holds, then fails,
# sleeps or runs the real entrypoint as the runtime env's variables ask.
PYTHON_WRAPPER = """#!/bin/sh
echo "greeting from the job: ${{RLHF_TEST_GREETING:-unset}}; RAY_DEDUP_LOGS=$RAY_DEDUP_LOGS"
if [ -n "$RLHF_TEST_EXIT" ]; then exit "$RLHF_TEST_EXIT"; fi
if [ -n "$RLHF_TEST_SLEEP_S" ]; then echo "sleeping"; sleep "$RLHF_TEST_SLEEP_S"; fi
exec {python} "$@"
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray head with a dashboard and token auth, on free ports; the client env holds its token."""
    import requests

    token = secrets.token_hex(16)
    gcs, dash = _port(), _port()
    # the agents' default ports (52365, ...) belong to the test session's own local Ray
    ports = [f"--dashboard-agent-listen-port={_port()}", f"--dashboard-agent-grpc-port={_port()}",
             f"--runtime-env-agent-port={_port()}", f"--metrics-export-port={_port()}",
             f"--ray-client-server-port={_port()}"]
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    base.update(RAY_USAGE_STATS_ENABLED="0",
                PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    ray_bin = str(Path(sys.executable).parent / "ray")
    temp_dir = tempfile.mkdtemp(prefix="rr", dir="/tmp")  # Ray's socket paths must stay short
    # TMPDIR: the temp folders of the head's processes (Python multiprocessing's pymp-*,
    # which a killed process leaves) and of the jobs they run go with the cluster's folder
    head_env = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "TMPDIR": temp_dir}
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             f"--port={gcs}", "--num-cpus=2", f"--dashboard-port={dash}",
                             "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                             f"--temp-dir={temp_dir}", "--object-store-memory=300000000", *ports],
                            cwd=ROOT, env=head_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 120
        while True:  # the dashboard takes a few seconds to come up
            assert head.poll() is None, "the Ray head exited while starting"
            try:
                headers = {"Authorization": f"Bearer {token}"}
                if requests.get(f"{address}/api/version", headers=headers, timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.time() < deadline, f"no dashboard at {address} after 120 s"
            time.sleep(1)
        wrapper = tmp_path_factory.mktemp("python") / "python.sh"
        wrapper.write_text(PYTHON_WRAPPER.format(python=sys.executable))
        wrapper.chmod(0o755)
        yield SimpleNamespace(address=address, token=token, python=str(wrapper),
                              env={**base, "RAY_AUTH_TOKEN": token})
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:  # a graceful stop takes 30-60 s on 2 busy cores
            pass
        with contextlib.suppress(ProcessLookupError):  # the whole group: gcs, raylet, dashboard, agents
            os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def cli(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf_ray.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _runtime_env(tmp_path: Path, name: str, **env_vars: str) -> str:
    path = tmp_path / name
    path.write_text("env_vars:\n" + "".join(f'  {k}: "{v}"\n' for k, v in env_vars.items()))
    return str(path)


def _show(out: subprocess.CompletedProcess) -> str:
    return out.stdout[-3000:] + out.stderr[-3000:]


def test_submit_no_wait_then_list_status_and_logs(cluster, tiny_llama, tmp_path):
    run_dir = tmp_path / "job_run"
    env_file = _runtime_env(tmp_path, "env.yaml", RLHF_TEST_GREETING="hello from the runtime env",
                            RAY_DEDUP_LOGS="1")  # the file wins over the project's RAY_DEDUP_LOGS=0
    out = cli(cluster.env, "submit", "--address", cluster.address, "--no-wait", "--python", cluster.python,
              "--runtime-env", env_file, "generate", "launch/configs/generate_tiny.yaml",
              f"run_dir={run_dir}", "rollout.num_workers=1", "logging.wandb_mode=disabled",
              "data.num_rows=20")
    assert out.returncode == 0, _show(out)
    job_id = out.stdout.strip()
    assert job_id.startswith("raysubmit_"), _show(out)

    listed = cli(cluster.env, "jobs", "--address", cluster.address, "list")
    assert listed.returncode == 0, _show(listed)
    assert listed.stdout.startswith("JOB ID") and job_id in listed.stdout
    assert f"rlhf-ray generate {ROOT}/launch/configs/generate_tiny.yaml"[:40] in listed.stdout

    followed = cli(cluster.env, "jobs", "--address", cluster.address, "logs", "--follow", job_id)
    assert followed.returncode == 0, _show(followed)
    assert "greeting from the job: hello from the runtime env; RAY_DEDUP_LOGS=1" in followed.stdout
    assert followed.stdout.rstrip().endswith(f"job {job_id}: SUCCEEDED")
    assert (run_dir / "episodes.jsonl").is_file()  # written by the job, on this machine

    status = cli(cluster.env, "jobs", "--address", cluster.address, "status", job_id)
    assert status.returncode == 0 and status.stdout.startswith(f"job {job_id}: SUCCEEDED"), _show(status)
    logs = cli(cluster.env, "jobs", "--address", cluster.address, "logs", job_id)
    assert logs.returncode == 0, _show(logs)
    assert "greeting from the job: hello from the runtime env" in logs.stdout


def test_submit_follows_a_failing_job_and_exits_nonzero(cluster, tmp_path):
    env_file = _runtime_env(tmp_path, "fail.yaml", RLHF_TEST_EXIT="3")
    out = cli(cluster.env, "submit", "--address", cluster.address, "--python", cluster.python,
              "--runtime-env", env_file, "generate", "launch/configs/generate_tiny.yaml")
    assert out.returncode == 1, _show(out)
    assert "greeting from the job: unset" in out.stdout  # the logs, followed by default
    job_id = re.search(r"job (raysubmit_\w+): FAILED", out.stdout).group(1)
    status = cli(cluster.env, "jobs", "--address", cluster.address, "status", job_id)
    assert status.returncode == 1 and "FAILED" in status.stdout and "exit code 3" in status.stdout

    bad = cli(cluster.env, "submit", "--address", cluster.address, "--wait", "generate", "optim.lr=1")
    assert bad.returncode == 2 and "unknown key 'optim'" in bad.stderr  # checked before submitting
    assert "--wait is the default now" in bad.stderr  # the old flag still parses


def test_jobs_stop_a_running_job(cluster, tmp_path, monkeypatch):
    env_file = _runtime_env(tmp_path, "sleep.yaml", RLHF_TEST_SLEEP_S="600")
    out = cli(cluster.env, "submit", "--address", cluster.address, "--no-wait", "--python", cluster.python,
              "--runtime-env", env_file, "generate")
    assert out.returncode == 0, _show(out)
    job_id = out.stdout.strip()
    follower = subprocess.Popen([sys.executable, "-m", "rlhf_ray.cli", "jobs", "--address", cluster.address,
                                 "logs", "-f", job_id], cwd=ROOT, env=cluster.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        monkeypatch.setenv("RAY_AUTH_TOKEN", cluster.token)
        client, deadline = jobs.connect(cluster.address), time.time() + 90
        while (status := str(client.get_job_status(job_id).value)) != "RUNNING":
            assert time.time() < deadline and status == "PENDING", status
            time.sleep(0.5)
        stopped = cli(cluster.env, "jobs", "--address", cluster.address, "stop", job_id)
        assert stopped.returncode == 0 and f"job {job_id}: STOPPED" in stopped.stdout, _show(stopped)
        follow_out, follow_err = follower.communicate(timeout=120)
    finally:
        follower.kill()
        follower.wait()
    assert follower.returncode == 1, follow_out + follow_err
    assert "sleeping" in follow_out and f"job {job_id}: STOPPED" in follow_out
    again = cli(cluster.env, "jobs", "--address", cluster.address, "stop", job_id)
    assert again.returncode == 0 and "had already ended: STOPPED" in again.stdout
    missing = cli(cluster.env, "jobs", "--address", cluster.address, "status", "raysubmit_none")
    assert missing.returncode == 1 and f"no job 'raysubmit_none' on {cluster.address}" in missing.stderr


def _one_error_line(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 1 and "Traceback" not in out.stderr, _show(out)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stderr
    return errors[0]


def test_auth_and_address_failures_are_one_line_errors(cluster, tmp_path):
    no_token = {**cluster.env, "RAY_AUTH_TOKEN": "", "HOME": str(tmp_path)}  # and no ~/.ray/auth_token
    line = _one_error_line(cli(no_token, "jobs", "--address", cluster.address, "list"))
    assert f"{cluster.address} requires an authentication token" in line
    wrong = {**cluster.env, "RAY_AUTH_TOKEN": "not-the-token"}
    line = _one_error_line(cli(wrong, "submit", "--address", cluster.address, "--no-wait", "generate"))
    assert f"{cluster.address} rejected the authentication token from RAY_AUTH_TOKEN" in line
    nobody = f"http://127.0.0.1:{_port()}"
    line = _one_error_line(cli({**cluster.env, "RAY_ADDRESS": nobody}, "jobs", "status", "raysubmit_x"))
    assert f"cannot reach the Ray dashboard at {nobody}" in line  # RAY_ADDRESS is the default address


def test_runtime_env_file_errors_name_the_file_and_key(tmp_path):
    cases = {"missing.yaml": None, "list.yaml": "- pip\n", "key.yaml": "envvars: {}\n",
             "number.yaml": "env_vars:\n  WORKERS: 4\n", "broken.json": '{"env_vars": {'}
    expected = {"missing.yaml": "does not exist", "list.yaml": "must hold a mapping",
                "key.yaml": "unknown key 'envvars'", "number.yaml": "env_vars.WORKERS must be a string",
                "broken.json": "is not valid JSON"}
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match=re.escape(expected[name])) as e:
            load_runtime_env(tmp_path / name)
        assert str(tmp_path / name) in str(e.value)
    (tmp_path / "pip.yaml").write_text("pip: 3\n")  # a shape only Ray's own checks know
    line = _one_error_line(cli(dict(os.environ), "submit", "--runtime-env", str(tmp_path / "pip.yaml"),
                               "generate"))
    assert f"runtime env file {tmp_path / 'pip.yaml'}" in line and "pip" in line
