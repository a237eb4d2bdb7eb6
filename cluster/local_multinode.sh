#!/usr/bin/env bash
# A three-node Ray cluster on one machine, for trying placement by custom resources:
#   head          1 CPU, the dashboard (jobs are submitted here)
#   rollout node  1 CPU and {"rollout_node": 4}
#   learner node  1 CPU and {"learner_node": 4}
#
#   cluster/local_multinode.sh start DIR    # prints the dashboard address; DIR holds its state
#   cluster/local_multinode.sh stop DIR     # stops exactly these nodes (not other Rays)
#
# Then place roles with e.g.
#   rlhf-ray submit --address "$(cat DIR/dashboard)" ppo launch/configs/ppo_tiny.yaml \
#     'rollout.resources={rollout_node: 1}' 'learner.resources={learner_node: 1}'
#
# Every port is picked free at start, and each node runs `ray start --block` in its own
# process group (listed in DIR/pgids), so the cluster can live beside another Ray and
# `stop` touches nothing else. DIR/nodes.json lists the nodes' ids and resources. RAY
# (default: the ray next to PYTHON) and PYTHON (default: python3) choose the install;
# RAY_AUTH_MODE defaults to disabled for this local cluster.
set -euo pipefail

cmd=${1:?usage: $0 start|stop DIR}
dir=${2:?usage: $0 start|stop DIR}
PYTHON=${PYTHON:-python3}
RAY=${RAY:-$(dirname "$(command -v "$PYTHON")")/ray}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} RAY_USAGE_STATS_ENABLED=0

free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

node_ports() {  # the per-node agent ports; their defaults would clash with another Ray
    echo "--dashboard-agent-listen-port=$(free_port) --dashboard-agent-grpc-port=$(free_port)" \
         "--runtime-env-agent-port=$(free_port) --metrics-export-port=$(free_port)"
}

start_node() {  # start_node LOG ARGS...: one `ray start --block` in its own session
    local log=$1; shift
    # TMPDIR: what the node's processes put in the temp folder (Python multiprocessing's
    # pymp-* folders, which a killed process leaves behind) goes with the cluster's folder
    TMPDIR="$(cat "$dir/ray_tmp")" setsid "$RAY" start --block "$@" >>"$dir/$log.log" 2>&1 &
    echo $! >>"$dir/pgids"
}

alive_nodes() {  # alive_nodes WANT TIMEOUT_S: wait for WANT alive nodes, write DIR/nodes.json
    "$PYTHON" - "$(cat "$dir/dashboard")" "$1" "$2" "$dir/nodes.json" <<'EOF'
import json, sys, time
from ray.util.state import list_nodes
address, want, timeout, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
deadline, nodes = time.time() + timeout, []
while time.time() < deadline:
    try:
        nodes = [n for n in list_nodes(address=address, detail=True) if n.state == "ALIVE"]
    except Exception:  # the dashboard is still starting
        nodes = []
    if len(nodes) >= want:
        break
    time.sleep(1)
with open(out, "w") as f:
    json.dump([{"node_id": n.node_id, "resources": n.resources_total} for n in nodes], f, indent=1)
sys.exit(0 if len(nodes) >= want else 1)
EOF
}

join() {  # join WANT NAME RESOURCES: start a worker node until WANT nodes are alive
    local want=$1 name=$2 resources=$3
    for attempt in 1 2 3; do
        # shellcheck disable=SC2046
        start_node "$name" --address="127.0.0.1:$gcs" --node-ip-address=127.0.0.1 --num-cpus=1 \
            --resources="$resources" --object-store-memory=200000000 $(node_ports)
        alive_nodes "$want" 120 && return 0
        # a raylet that cannot register within Ray's fixed 30 s (a busy machine) exits
        echo "$name did not join (attempt $attempt); see $dir/$name.log" >&2
        kill -TERM -- "-$(tail -n 1 "$dir/pgids")" 2>/dev/null || true
    done
    echo "$name could not join the cluster" >&2
    return 1
}

case $cmd in
start)
    mkdir -p "$dir"
    : >"$dir/pgids"
    # Ray's socket paths must stay short: its temp dir lives under /tmp
    tmp=$(mktemp -d /tmp/rrc.XXXXXX)
    echo "$tmp" >"$dir/ray_tmp"
    gcs=$(free_port) dash=$(free_port)
    echo "127.0.0.1:$gcs" >"$dir/address"
    echo "http://127.0.0.1:$dash" >"$dir/dashboard"
    # shellcheck disable=SC2046
    start_node head --head --node-ip-address=127.0.0.1 --port="$gcs" --num-cpus=1 \
        --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$dash" \
        --temp-dir="$tmp" --object-store-memory=200000000 $(node_ports)
    alive_nodes 1 180 || { echo "the head did not come up; see $dir/head.log" >&2; exit 1; }
    # worker nodes join one at a time, once the head (GCS and dashboard) answers
    join 2 rollout_node '{"rollout_node": 4}'
    join 3 learner_node '{"learner_node": 4}'
    echo "cluster up: $(cat "$dir/dashboard") (GCS $(cat "$dir/address"); nodes in $dir/nodes.json)"
    ;;
stop)
    [ -f "$dir/pgids" ] || { echo "no cluster state in $dir" >&2; exit 1; }
    # worker nodes first, the head last; SIGTERM lets each `ray start --block` stop its node
    for pgid in $(tac "$dir/pgids"); do kill -TERM -- "-$pgid" 2>/dev/null || true; done
    for _ in $(seq 60); do
        alive=0
        for pgid in $(cat "$dir/pgids"); do kill -0 -- "-$pgid" 2>/dev/null && alive=1; done
        [ $alive = 0 ] && break
        sleep 0.5
    done
    for pgid in $(cat "$dir/pgids"); do kill -KILL -- "-$pgid" 2>/dev/null || true; done
    [ -f "$dir/ray_tmp" ] && rm -rf "$(cat "$dir/ray_tmp")"
    rm -f "$dir/pgids"
    echo "cluster stopped"
    ;;
*)
    echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
