#!/usr/bin/env bash
# Two Ray nodes on one machine: a head with 1 CPU and a worker with 1 CPU and a custom
# "rollout_node" resource. Stop with: ray stop --force
set -euo pipefail
export RAY_AUTH_MODE=disabled
ray start --head --node-ip-address=127.0.0.1 --port=6380 --num-cpus=1 \
    --dashboard-host=127.0.0.1 --include-dashboard=true
ray start --address=127.0.0.1:6380 --num-cpus=1 --resources='{"rollout_node": 4}'
echo "cluster up: submit with"
echo "  ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\"
echo "    $(pwd)/.venv/bin/python -m rlhf_ray.cli generate launch/configs/generate_tiny.yaml ray.address=auto"
