"""doctor: a self-check of every role on the tiny model, in one round trip.

    rlhf-ray doctor [--json]

1. Start a local Ray and one worker of every role: rollout (vLLM), reward, reference, learner.
2. Generate two samples for each of a few prompts with the version-0 weights.
3. Score them (reward model + exact-answer checker) and get reference log-probs.
4. One GRPO policy-gradient step on the learner.
5. Sync the new weights to the rollout worker as version 1.
6. Generate again and compare the rollout worker's log-probs with the learner's own on the
   same tokens: ``logprob_max_abs_diff`` must be tiny in fp32.
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from rlhf_ray.assets import TINY_RM, resolve_model
from rlhf_ray.config import (
    DataConfig,
    DoctorConfig,
    LearnerConfig,
    OptimConfig,
    RewardConfig,
    RolloutConfig,
    SamplingConfig,
)
from rlhf_ray.data import load_rows, load_tokenizer, tokenize_prompts
from rlhf_ray.driver.roles import Roles
from rlhf_ray.experience import critic_free_advantages, episodes_to_batch
from rlhf_ray.loss_terms import PPOLossSettings
from rlhf_ray.runtime import worker_env
from rlhf_ray.workers.weight_sync import WeightSync

TOLERANCE = 1e-4  # fp32 rollout vs learner log-probs after a sync
SAMPLING = SamplingConfig(n=2, max_new_tokens=16, temperature=1.0)


def run(cfg: DoctorConfig) -> dict:
    if cfg.resume == "auto":
        from rlhf_ray.config_loader import ConfigError

        raise ConfigError("resume=auto: doctor is a self-check with nothing to resume")
    timings: dict[str, float] = {}
    report: dict = {"ok": False, "model": cfg.model.path, "timings_s": timings}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = fn()
        timings[name] = round(time.perf_counter() - start, 3)
        print(f"doctor: {name:10s} {timings[name]:7.2f} s", file=sys.stderr)
        return result

    model = resolve_model(cfg.model.path, role="doctor")
    tokenizer = load_tokenizer(model)
    rows = load_rows(DataConfig(source="arithmetic", format="prompt", template="chat", num_rows=4,
                                heldout_fraction=0.0), "all").rows
    prompts, _ = tokenize_prompts(rows, tokenizer, 200, template="chat")
    with Roles(cfg.ray, worker_env()) as roles:
        # 1. one worker of every role
        workers = timed("start", lambda: _start(roles, model, cfg.model.dtype))
        report["versions"] = _versions()
        report.update(_round_trip(timed, workers, prompts, tokenizer.pad_token_id))
        report["workers"] = {g.role: g.nodes for g in roles.groups}
    status = "OK" if report["ok"] else "FAILED"
    print(f"doctor: {status}: rollout vs learner log-prob max |diff| after sync = "
          f"{report.get('logprob_max_abs_diff')}", file=sys.stderr)
    return report


def _versions() -> dict[str, str]:
    import deepspeed
    import ray
    import transformers
    import vllm

    return {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "vllm": vllm.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__}


def _start(roles: Roles, model: str, dtype: str) -> tuple:
    """One worker of every role, reserving no CPUs (they take turns), started side by side."""
    with roles.together():
        rollout = roles.rollouts(model, RolloutConfig(max_model_len=256, cpus_per_worker=0.0), dtype, seed=0)
        reward = roles.reward(RewardConfig(model=TINY_RM, function="arithmetic"))
        reference = roles.reference(model, dtype)
        learner = roles.learners(model, LearnerConfig(micro_batch_size=8, cpus_per_worker=0.0),
                                 OptimConfig(lr=1e-3), dtype, optimizer_steps=None, seed=0)
    return rollout, reward, reference, learner


def _round_trip(timed: Callable, workers: tuple, prompts: list, pad_id: int) -> dict:
    """Steps 2-6: generate, score, one GRPO step, sync, and the log-prob agreement."""
    rollout, reward, reference, learner = workers
    ids = [p.prompt_ids for p in prompts]
    # 2. generate with version 0
    episodes = timed("generate", lambda: rollout.call("generate", ids, SAMPLING, None,
                                                      [p.answer for p in prompts])[0])

    # 3. score and reference log-probs, concurrently
    def score():
        s_ref = reward.submit(0, "score", episodes)
        r_ref = reference.submit(0, "logprobs", episodes)
        return reward.get([s_ref], [0], "score")[0], reference.get([r_ref], [0], "logprobs")[0]

    scores, ref_logprobs = timed("score", score)
    for e, s, r in zip(episodes, scores, ref_logprobs):
        e.score, e.ref_logprobs = s, r
    # 4. one GRPO step
    batch = episodes_to_batch(episodes, pad_id)
    batch.advantages, _ = critic_free_advantages(batch, torch.tensor(scores), "grpo", SAMPLING.n)
    train = timed("train", lambda: learner.call("ppo_step", batch, PPOLossSettings(kl_coef=0.01))[0])
    # 5. weights -> rollout worker as version 1
    sync = timed("sync", lambda: WeightSync(learner, rollout).sync(version=1))
    # 6. rollout vs learner log-probs on fresh episodes
    after = timed("generate2", lambda: rollout.call("generate", ids[:2], SAMPLING)[0])
    check = episodes_to_batch(after, pad_id)
    learner_logprobs = learner.call("forward_logprobs", check)[0]
    mask = check.response_mask.bool()
    diff = float((learner_logprobs - check.old_logprobs)[mask].abs().max())
    ref_tokens = sum(len(r) for r in ref_logprobs)
    return {"ok": diff <= TOLERANCE and all(e.policy_version == 1 for e in after),
            "logprob_max_abs_diff": diff, "tolerance": TOLERANCE,
            "episodes": len(episodes), "reward_mean": sum(scores) / len(scores),
            "ref_logprob_mean": float(sum(sum(r) for r in ref_logprobs) / max(1, ref_tokens)),
            "train": {k: v for k, v in train.items() if k.startswith(("policy/", "kl/"))},
            "sync": sync, "policy_version_after_sync": after[0].policy_version}
