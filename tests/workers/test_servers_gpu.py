"""The reference and reward servers' model code on a GPU (GPU machines only; skipped on
CPU, where the same code runs in test_roles.py): CUDA results equal CPU results."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_reference_logprobs_on_cuda_equal_cpu(tiny_llama):
    from transformers import AutoModelForCausalLM

    from rlhf_ray.batch import Episode
    from rlhf_ray.workers.reference import response_logprobs

    episodes = [Episode(prompt_ids=[1, 5, 9], response_ids=list(range(10, 12 + i)), prompt_text="p",
                        response_text="r", logprobs=[0.0] * (2 + i), finish_reason="stop", policy_version=0)
                for i in range(3)]
    got = {d: response_logprobs(AutoModelForCausalLM.from_pretrained(tiny_llama).eval().to(d),
                                episodes, 0, micro_batch_size=2) for d in ("cpu", "cuda")}
    for a, b in zip(got["cpu"], got["cuda"]):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4)


def test_reward_scores_on_cuda_equal_cpu(tiny_rm):
    from rlhf_ray.config import RewardConfig
    from rlhf_ray.workers.reward import RewardScorer, ScoreItem

    items = [ScoreItem("What is 2 + 3?", f" It is {i}.") for i in range(5)]
    cpu, cuda = (RewardScorer(RewardConfig(model=tiny_rm), "float32", d).score(items) for d in ("cpu", "cuda"))
    assert cuda == pytest.approx(cpu, abs=1e-4)
