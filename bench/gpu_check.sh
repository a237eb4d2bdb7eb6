#!/usr/bin/env bash
# The GPU checks (bench/gpu_check.py) on a single-GPU machine without vLLM: DeepSpeed
# ZeRO-2/3 in bf16 on CUDA, the NCCL broadcast between two processes on one GPU, the
# reference and reward servers on the GPU, and the MFU of a learner step. Prints one JSON
# and writes it to bench/results/gpu_check.json. Needs torch with CUDA, transformers and
# DeepSpeed; about 5 minutes on an H200.
set -euo pipefail
cd "$(dirname "$0")/.."
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # FusedAdam's JIT rejects "9.0a"
export DS_ACCELERATOR=cuda HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p bench/results
PY=${PYTHON:-python3}
timeout 480 "$PY" bench/gpu_check.py | tee bench/results/gpu_check.json
