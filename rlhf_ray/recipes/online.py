"""Parts shared by the online recipes (ppo, rs, prefs): prompts, roles, held-out scoring."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from rlhf_ray.batch import Episode
from rlhf_ray.configs import (
    DataConfig,
    LearnerConfig,
    OptimConfig,
    RayConfig,
    RewardConfig,
    RolloutConfig,
    SamplingConfig,
)
from rlhf_ray.data import load_rows, tokenize_prompts
from rlhf_ray.workers.group import WorkerGroup, WorkerResources
from rlhf_ray.workers.learner import LearnerWorker
from rlhf_ray.workers.reference import ReferenceServer
from rlhf_ray.workers.reward import RewardServer
from rlhf_ray.workers.rollout import RolloutWorker


@dataclass
class Prompt:
    """A tokenised prompt with its global index (for grouping) and ground truth."""

    prompt_ids: list[int]
    answer: str | None
    index: int
    text: str = ""  # the rendered prompt (template applied)
    raw: object = ""  # the row's prompt before the template (a string or messages)


def load_prompts(data: DataConfig, tokenizer, max_model_len: int, split: str) -> list[Prompt]:
    rows = load_rows(data, split, tokenizer).rows
    if not rows:
        raise ValueError(f"data.source {data.source!r}: the {split} split is empty (data.num_rows="
                         f"{data.num_rows}, data.heldout_fraction={data.heldout_fraction})")
    by_row = {r.row: r for r in rows}
    examples, _ = tokenize_prompts(rows, tokenizer, max_model_len - 1, data.truncation, data.template)
    if not examples:
        raise ValueError(f"data.source {data.source!r}: no {split} prompts fit rollout.max_model_len={max_model_len}")
    return [Prompt(e.prompt_ids, e.answer, i, e.text, raw_prompt(by_row[e.row]))
            for i, e in enumerate(examples)]


def raw_prompt(row) -> object:
    """The user-facing prompt of a row (what ``rm`` / ``dpo`` re-render with their template)."""
    from rlhf_ray.data.templates import prompt_messages

    if hasattr(row, "prompt"):
        prompt = row.prompt
        return prompt if isinstance(prompt, str) else [m.to_dict() for m in prompt]
    messages = prompt_messages(row)
    if len(messages) == 1 and messages[0].role == "user":
        return messages[0].content
    return [m.to_dict() for m in messages]


def prompts_for_step(prompts: list[Prompt], step: int, per_step: int) -> list[Prompt]:
    """The prompts of step ``step``: a deterministic walk through the set (resumable)."""
    start = step * per_step
    return [prompts[(start + i) % len(prompts)] for i in range(per_step)]


def start_rollouts(model: str, rollout: RolloutConfig, dtype: str, seed: int, ray_cfg: RayConfig) -> WorkerGroup:
    return WorkerGroup(RolloutWorker, "rollout", rollout.num_workers,
                       args=(model, rollout, dtype, seed),
                       resources=WorkerResources(rollout.cpus_per_worker, rollout.gpus_per_worker,
                                                 placement=rollout.placement),
                       timeout_s=ray_cfg.call_timeout_s, start_timeout_s=ray_cfg.start_timeout_s)


def start_reward(reward: RewardConfig, ray_cfg: RayConfig) -> WorkerGroup:
    return WorkerGroup(RewardServer, "reward", reward.num_replicas, args=(reward,),
                       resources=WorkerResources(num_cpus=0), timeout_s=ray_cfg.call_timeout_s,
                       start_timeout_s=ray_cfg.start_timeout_s)


def start_reference(model: str, dtype: str, ray_cfg: RayConfig) -> WorkerGroup:
    return WorkerGroup(ReferenceServer, "reference", 1, args=(model, dtype),
                       resources=WorkerResources(num_cpus=0), timeout_s=ray_cfg.call_timeout_s,
                       start_timeout_s=ray_cfg.start_timeout_s)


def start_learners(model: str, learner: LearnerConfig, optim: OptimConfig, dtype: str,
                   total_steps: int, seed: int, ray_cfg: RayConfig, with_value: bool = False,
                   value_model: str | None = None, value_optim: OptimConfig | None = None) -> WorkerGroup:
    group = WorkerGroup(LearnerWorker, "learner", learner.num_workers, distributed=True,
                        args=(model, learner, optim, dtype),
                        kwargs=dict(with_value=with_value, total_steps=total_steps, seed=seed,
                                    value_model_path=value_model, value_optim=value_optim),
                        resources=WorkerResources(learner.cpus_per_worker, learner.gpus_per_worker,
                                                  placement=learner.placement),
                        timeout_s=ray_cfg.call_timeout_s, start_timeout_s=ray_cfg.start_timeout_s)
    group.call("init")
    return group


def generate_all(rollouts: WorkerGroup, prompts: list[Prompt], sampling: SamplingConfig) -> list[Episode]:
    """Spread prompts over the rollout workers (one call each); episodes in prompt order."""
    shards = [prompts[r:: len(rollouts)] for r in range(len(rollouts))]
    refs, ranks = [], []
    for r, shard in enumerate(shards):
        if shard:
            refs.append(rollouts.submit(r, "generate", [p.prompt_ids for p in shard], sampling,
                                        [p.index for p in shard], [p.answer for p in shard]))
            ranks.append(r)
    episodes = [e for eps in rollouts.get(refs, ranks, "generate") for e in eps]
    return sorted(episodes, key=lambda e: (e.prompt_index, e.sample_index))


def score_all(reward: WorkerGroup, episodes: list[Episode]) -> list[float]:
    """Score episodes over all reward replicas; sets ``e.score`` and returns the scores."""
    n = len(reward)
    parts = [episodes[i::n] for i in range(n)]
    refs = [reward.submit(i, "score", part) for i, part in enumerate(parts) if part]
    for part, scores in zip(parts, reward.get(refs, list(range(len(refs))), "score")):
        for e, s in zip(part, scores):
            e.score = s
    return [e.score for e in episodes]


def heldout_score(rollouts: WorkerGroup, reward: WorkerGroup, prompts: list[Prompt],
                  max_new_tokens: int, sampling: SamplingConfig | None = None,
                  samples: int = 0) -> dict[str, float]:
    """Score the policy on held-out prompts.

    ``eval/score``: mean score of greedy responses (the number the reports compare).
    ``eval/score_sampled``: with ``sampling``, the mean score of ``samples`` (0: ``sampling.n``)
    samples per prompt at the training temperature, i.e. the expected reward of one sample
    from the policy. More samples per prompt make this estimate tighter than the greedy one.
    """
    if sampling is not None and samples:
        sampling = replace(sampling, n=samples)
    greedy = SamplingConfig(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
    episodes = generate_all(rollouts, prompts, greedy)
    scores = score_all(reward, episodes)
    out = {"eval/score": sum(scores) / len(scores),
           "eval/response_len": sum(len(e.response_ids) for e in episodes) / len(episodes)}
    if sampling is not None:
        sampled = score_all(reward, generate_all(rollouts, prompts, sampling))
        out["eval/score_sampled"] = sum(sampled) / len(sampled)
        out["eval/sampled_answers"] = float(len(sampled))
    return out


def check_groups(episodes: list[Episode], n: int) -> None:
    """Group baselines need the n samples of each prompt as contiguous rows [g*n, (g+1)*n)."""
    for start in range(0, len(episodes), n):
        group = episodes[start: start + n]
        if len(group) != n or len({e.prompt_index for e in group}) != 1 or \
                sorted(e.sample_index for e in group) != list(range(n)):
            raise RuntimeError(f"episodes {start}..{start + n - 1} are not one prompt's {n} samples: "
                               f"{[(e.prompt_index, e.sample_index) for e in group]}")


def rollout_metrics(episodes: list[Episode], version: int) -> dict[str, float]:
    scores = torch.tensor([e.score for e in episodes], dtype=torch.float32)
    lengths = torch.tensor([len(e.response_ids) for e in episodes], dtype=torch.float32)
    staleness = torch.tensor([version - e.policy_version for e in episodes], dtype=torch.float32)
    return {"reward/mean": float(scores.mean()), "reward/std": float(scores.std()) if len(scores) > 1 else 0.0,
            "reward/max": float(scores.max()), "rollout/episodes": float(len(episodes)),
            "rollout/response_len_mean": float(lengths.mean()),
            "rollout/truncated_frac": sum(e.finish_reason == "length" for e in episodes) / len(episodes),
            "rollout/staleness_mean": float(staleness.mean()), "rollout/staleness_max": float(staleness.max())}
