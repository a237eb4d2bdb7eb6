"""WorkerGroup: placement, rank environment, fan-out, attributed failures, scaling."""

from __future__ import annotations

import time

import pytest

from rlhf_ray.workers.group import WorkerError, WorkerGroup, WorkerResources


@pytest.fixture
def echo_cls(ray_local):
    from echo_worker import EchoWorker  # tests/helpers is on PYTHONPATH for the workers too

    return EchoWorker


def test_fan_out_and_rank_environment(echo_cls, monkeypatch):
    group = WorkerGroup(echo_cls, "echo", 3, args=("t",), distributed=True,
                        resources=WorkerResources(num_cpus=0, placement="pack"))
    try:
        results = group.call("echo", 7)
        assert [r[:2] for r in results] == [("t", 7)] * 3 and len({r[2] for r in results}) == 3
        assert group.call_each("echo", [(1,), (2,), (3,)])[2][1] == 3
        envs = group.call("env")
        assert [e["RANK"] for e in envs] == ["0", "1", "2"]
        assert {e["WORLD_SIZE"] for e in envs} == {"3"}
        assert len({(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs}) == 1
        assert sorted(e["LOCAL_RANK"] for e in envs) == ["0", "1", "2"]  # one node
        with pytest.raises(ValueError, match="3 workers"):
            group.call_each("echo", [(1,)])
    finally:
        group.shutdown()


def test_failure_names_role_rank_node_and_cause(echo_cls):
    group = WorkerGroup(echo_cls, "echo", 2, resources=WorkerResources(num_cpus=0))
    try:
        with pytest.raises(WorkerError) as info:
            group.get([group.submit(1, "fail", "broken on purpose")], [1], "fail")
        err = info.value
        assert (err.role, err.rank) == ("echo", 1)
        assert "broken on purpose" in err.cause and "ValueError" in err.cause
        assert err.node != "unknown" and "pid" in err.node
    finally:
        group.shutdown()


def test_timeout_names_the_stuck_worker(echo_cls):
    # The call limit is 1 s; starting the worker has its own (generous) limit, so a busy
    # machine that is slow to spawn the process does not trip the call timeout.
    group = WorkerGroup(echo_cls, "echo", 1, resources=WorkerResources(num_cpus=0), timeout_s=1.0,
                        start_timeout_s=300.0)
    try:
        with pytest.raises(WorkerError, match="echo worker rank 0 .* 'sleep' timed out after 1 s"):
            group.call("sleep", 5.0)
    finally:
        group.shutdown()


def test_slow_start_names_the_worker_and_frees_what_it_held(echo_cls):
    import ray

    def free_cpus() -> float:
        return ray.available_resources().get("CPU", 0.0)

    before = free_cpus()
    for placement in ("none", "pack"):  # a plain actor, then one in a placement group
        with pytest.raises(WorkerError, match="echo worker rank 0 .* 'start' timed out after 2 s"):
            WorkerGroup(echo_cls, "echo", 1, kwargs={"start_delay_s": 120.0}, timeout_s=600.0,
                        start_timeout_s=2.0, resources=WorkerResources(num_cpus=1, placement=placement))
        # The half-started worker is killed and its placement group removed: its CPU comes back.
        deadline = time.time() + 30
        while free_cpus() < before and time.time() < deadline:
            time.sleep(0.2)
        assert free_cpus() == before, placement


def test_scale_out_and_in(echo_cls):
    group = WorkerGroup(echo_cls, "echo", 1, resources=WorkerResources(num_cpus=0))
    try:
        assert group.add(2) == [1, 2] and len(group) == 3
        assert len(group.call("echo", 0)) == 3
        group.remove(2)
        assert len(group) == 1 and len(group.call("echo", 0)) == 1
        with pytest.raises(ValueError, match="at least one must stay"):
            group.remove(1)
    finally:
        group.shutdown()


def test_unplaceable_group_names_the_wait_and_gives_its_request_back(echo_cls):
    import ray

    with pytest.raises(WorkerError, match="echo worker rank 0 .* 'placement group' timed out after 2 s"):
        WorkerGroup(echo_cls, "echo", 2, start_timeout_s=2.0,
                    resources=WorkerResources(num_cpus=100, placement="pack"))  # the cluster has 4
    states = [pg["state"] for pg in ray.util.placement_group_table().values()]
    assert "PENDING" not in states, states
