"""`rlhf-ray doctor --json`: one worker of every role, a full round trip, clean JSON on stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_doctor_json_round_trip(tiny_llama, tiny_rm):
    out = subprocess.run([sys.executable, "-m", "rlhf_ray.cli", "doctor", "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(out.stdout)  # nothing but the JSON on stdout
    assert report["ok"] is True
    assert 0.0 <= report["logprob_max_abs_diff"] <= 1e-4
    assert report["policy_version_after_sync"] == 1
    assert set(report["timings_s"]) >= {"start", "generate", "score", "train", "sync"}
    assert set(report["workers"]) == {"rollout", "reward", "reference", "learner"}
    assert report["versions"]["vllm"] and report["versions"]["deepspeed"]
    assert report["train"]["policy/loss"] == report["train"]["policy/loss"]  # finite, not NaN
    assert "OK" in out.stderr
