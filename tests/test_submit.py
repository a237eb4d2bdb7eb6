"""`rlhf-ray submit`: a recipe as a Ray job on a separately started cluster."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_submit_generate_job_to_a_cluster(tiny_llama, tmp_path):
    gcs, dash = _port(), _port()
    # the agents' default ports (52365, ...) belong to the test session's own local Ray
    agent_ports = [f"--dashboard-agent-listen-port={_port()}", f"--dashboard-agent-grpc-port={_port()}",
                   f"--runtime-env-agent-port={_port()}", f"--metrics-export-port={_port()}"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    ray_bin = str(Path(sys.executable).parent / "ray")
    temp_dir = tempfile.mkdtemp(prefix="rr", dir="/tmp")  # Ray's socket paths must stay short
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             f"--port={gcs}", "--num-cpus=2", f"--dashboard-port={dash}",
                             "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                             f"--temp-dir={temp_dir}", "--object-store-memory=300000000", *agent_ports],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dash}"
        run_dir = tmp_path / "job_run"
        cmd = [sys.executable, "-m", "rlhf_ray.cli", "submit", "--address", address, "--wait",
               "generate", "launch/configs/generate_tiny.yaml", f"run_dir={run_dir}",
               "rollout.num_workers=1", "logging.wandb_mode=disabled", "data.num_rows=60"]
        for _ in range(60):  # the dashboard takes a few seconds to come up
            out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
            if "Connection refused" not in out.stderr and "Failed to connect" not in out.stderr:
                break
            time.sleep(2)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "SUCCEEDED" in out.stdout
        assert (run_dir / "episodes.jsonl").is_file()  # written by the job, on this machine
        bad = subprocess.run([sys.executable, "-m", "rlhf_ray.cli", "submit", "--address", address,
                              "generate", "optim.lr=1"], cwd=ROOT, env=env, capture_output=True, text=True)
        assert bad.returncode == 2 and "unknown key 'optim'" in bad.stderr  # checked before submitting
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=90)
        shutil.rmtree(temp_dir, ignore_errors=True)
