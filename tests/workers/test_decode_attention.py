"""The rollout engine's CPU decode attention (``rlhf_ray.workers.decode_attention``): the same
outputs as vLLM's kernel and an fp64 reference, refusals by name, and an engine that decodes
the same tokens with it as without it. vLLM runs in subprocesses, as elsewhere in the suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HELPER = Path(__file__).resolve().parents[1] / "helpers" / "decode_attention_checks.py"


def needs_kernel():
    """Skip, naming why, on a machine that cannot build or run the kernel (no C compiler, no
    AVX-512): there vLLM's kernel runs, which ``test_a_kernel_that_cannot_build...`` checks."""
    from rlhf_ray.workers.decode_attention import unavailable

    why = unavailable()
    if why:
        pytest.skip(f"the decode-attention kernel cannot run here: {why}")


def run_checks(*args: str, env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, str(HELPER), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_the_kernel_matches_vllms_and_an_fp64_reference_on_a_cache_vllm_wrote():
    needs_kernel()
    result = run_checks("kernel")
    assert len(result["cases"]) == 10 and result["calls"] == 20
    for case in result["cases"]:
        bf16 = case["dtype"] == "torch.bfloat16"
        # within an output's bf16 rounding of vLLM's (bf16), or fp32 summation order (fp32)
        assert case["vs_vllm"] <= (1.6e-2 if bf16 else 2e-6), case
        # no less accurate than vLLM's own kernel against fp64 from the K and V written
        assert case["vs_fp64"] <= max(1.5 * case["vllm_vs_fp64"], 1e-6), case
        # what lies in the slots no sequence holds is never read, even NaN
        assert case["nan_filled_vs_clean"] == 0.0, case
    refused = result["refused"]
    assert set(refused) == {"head_size_80", "fp16", "16_queries_per_kv_head", "dtype_mismatch"}
    for name, message in refused.items():
        assert message and "is not a layout this kernel takes" in message, (name, message)


def test_an_engine_decodes_the_same_tokens_with_the_kernel_as_with_vllms(tiny_llama):
    needs_kernel()
    result = run_checks("engine", tiny_llama)
    on, off = result["on"], result["off"]
    assert on["attention"] == "rlhf_ray" and off["attention"] == "vllm (off)"
    # every decode step of the tiny model's 2 layers ran the kernel (23 steps after prefill)
    assert on["kernel_calls"] >= 2 * 23 and off["kernel_calls"] == 0
    assert on["tokens"] == off["tokens"]
    for a, b in zip(on["logprobs"], off["logprobs"]):
        assert a == pytest.approx(b, abs=1e-4)


def test_a_kernel_that_cannot_build_leaves_vllms_in_place_and_says_why(tmp_path):
    code = ("from rlhf_ray.workers import decode_attention as da\n"
            "import json; why = da.use(True)\n"
            "from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl as I\n"
            "print('RESULT ' + json.dumps({'why': why, 'active': da.active,"
            " 'patched': getattr(I.forward, 'rlhf_ray_decode', False)}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CC": str(tmp_path / "no-such-cc"),
                               "RLHF_RAY_KERNEL_CACHE": str(tmp_path / "kernels")})
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert result["active"] is False and result["patched"] is False
    assert "no-such-cc" in result["why"], result
