"""Generating and scoring whole prompt sets, and the held-out score of a policy."""

from __future__ import annotations

from dataclasses import replace

from rlhf_ray.batch import Episode
from rlhf_ray.config import SamplingConfig
from rlhf_ray.driver.prompts import Prompt
from rlhf_ray.workers.group import WorkerGroup


def generate_all(rollouts: WorkerGroup, prompts: list[Prompt], sampling: SamplingConfig) -> list[Episode]:
    """Spread prompts over the rollout workers (one call each); episodes in prompt order."""
    shards = [prompts[r:: len(rollouts)] for r in range(len(rollouts))]
    refs, ranks = [], []
    for r, shard in enumerate(shards):
        if shard:
            refs.append(rollouts.submit(r, "generate", [p.prompt_ids for p in shard], sampling,
                                        [p.index for p in shard], [p.answer for p in shard],
                                        [p.plain for p in shard]))
            ranks.append(r)
    episodes = [e for eps in rollouts.get(refs, ranks, "generate") for e in eps]
    return sorted(episodes, key=lambda e: (e.prompt_index, e.sample_index))


def score_all(reward: WorkerGroup | None, episodes: list[Episode]) -> list[float]:
    """Score episodes over all reward replicas; sets ``e.score`` and returns the scores.
    Without a reward group (an environment scored the episodes) the scores are kept."""
    if reward is None:
        return [e.score for e in episodes]
    n = len(reward)
    parts = [episodes[i::n] for i in range(n)]
    refs = [reward.submit(i, "score", part) for i, part in enumerate(parts) if part]
    for part, scores in zip(parts, reward.get(refs, list(range(len(refs))), "score")):
        for e, s in zip(part, scores):
            e.score = s
    return [e.score for e in episodes]


def heldout_score(rollouts: WorkerGroup, reward: WorkerGroup | None, prompts: list[Prompt],
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
    if any(e.turn_ends is not None for e in episodes):  # multi-turn: how the policy used the env
        out["eval/turns_mean"] = sum(e.turns for e in episodes) / len(episodes)
        out["eval/tool_calls_mean"] = sum(e.tool_calls for e in episodes) / len(episodes)
    if sampling is not None:
        sampled = score_all(reward, generate_all(rollouts, prompts, sampling))
        out["eval/score_sampled"] = sum(sampled) / len(sampled)
        out["eval/sampled_answers"] = float(len(sampled))
    return out
