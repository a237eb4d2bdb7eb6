"""What the driver does with scored episodes: check their prompt groups, pick each group's
best and worst sample (rejection sampling keeps the best, preference data pairs the two),
write them as rows the offline recipes read, and summarise them as metrics."""

from __future__ import annotations

import torch

from rlhf_ray.batch import Episode
from rlhf_ray.driver.prompts import Prompt


def check_groups(episodes: list[Episode], n: int) -> None:
    """Group baselines need the n samples of each prompt as contiguous rows [g*n, (g+1)*n)."""
    for start in range(0, len(episodes), n):
        group = episodes[start: start + n]
        if len(group) != n or len({e.prompt_index for e in group}) != 1 or \
                sorted(e.sample_index for e in group) != list(range(n)):
            raise RuntimeError(f"episodes {start}..{start + n - 1} are not one prompt's {n} samples: "
                               f"{[(e.prompt_index, e.sample_index) for e in group]}")


def best_and_worst(episodes: list[Episode], n: int) -> list[tuple[Episode, Episode]]:
    """``(best, worst)`` by score of each prompt's ``n`` consecutive samples (ties: the
    earlier sample ranks higher)."""
    check_groups(episodes, n)
    out = []
    for start in range(0, len(episodes), n):
        group = sorted(episodes[start: start + n], key=lambda e: e.score, reverse=True)
        out.append((group[0], group[-1]))
    return out


def best_of_n(episodes: list[Episode], n: int, threshold: float | None = None
              ) -> tuple[list[Episode], list[tuple[Episode, Episode]]]:
    """Rejection sampling's selection: each prompt's best sample (kept if it reaches
    ``threshold``), and its best-versus-worst pair (see :func:`preference_pairs`)."""
    groups = best_and_worst(episodes, n)
    kept = [best for best, _ in groups if threshold is None or best.score >= threshold]
    return kept, preference_pairs(groups)


def preference_pairs(groups: list[tuple[Episode, Episode]], min_margin: float = 0.0
                     ) -> list[tuple[Episode, Episode]]:
    """The ``(best, worst)`` groups that make a preference pair: the best outscores the worst
    by more than ``min_margin`` and their texts differ (ties never make a pair)."""
    return [(best, worst) for best, worst in groups
            if best.score - worst.score > min_margin and best.response_text != worst.response_text]


def instruction_row(e: Episode, prompt: Prompt) -> dict:
    """A kept episode as an SFT row (instruction, or conversation for a chat prompt)."""
    if isinstance(prompt.raw, str):
        return {"instruction": prompt.raw, "output": e.response_text, "score": e.score}
    return {"messages": [*prompt.raw, {"role": "assistant", "content": e.response_text}],
            "score": e.score}


def preference_row(best: Episode, worst: Episode, prompt: Prompt) -> dict:
    """A best-versus-worst pair as a preference row, with both scores."""
    return {"prompt": prompt.raw, "chosen": best.response_text, "rejected": worst.response_text,
            "chosen_score": best.score, "rejected_score": worst.score}


def sample_rows(episodes: list[Episode], k: int) -> list[dict]:
    """The first ``k`` episodes as table rows: prompt, response, reward, the sampled
    sequence's KL to the reference (sum over its tokens of log pi_sample - log pi_ref) and
    the policy version that wrote it."""
    rows = []
    for e in episodes[:k]:
        kl = sum(a - b for a, b in zip(e.logprobs, e.ref_logprobs)) if e.ref_logprobs else float("nan")
        rows.append({"prompt": e.prompt_text, "response": e.response_text, "reward": float(e.score),
                     "kl": float(kl), "version": e.policy_version})
    return rows


def rollout_metrics(episodes: list[Episode], version: int) -> dict[str, float]:
    """Reward, length, truncation and staleness of a batch of episodes trained at ``version``."""
    scores = torch.tensor([e.score for e in episodes], dtype=torch.float32)
    lengths = torch.tensor([len(e.response_ids) for e in episodes], dtype=torch.float32)
    staleness = torch.tensor([version - e.policy_version for e in episodes], dtype=torch.float32)
    return {"reward/mean": float(scores.mean()),
            "reward/std": float(scores.std()) if len(scores) > 1 else 0.0,
            "reward/max": float(scores.max()), "rollout/episodes": float(len(episodes)),
            "rollout/response_len_mean": float(lengths.mean()),
            "rollout/truncated_frac": sum(e.finish_reason == "length" for e in episodes) / len(episodes),
            "rollout/staleness_mean": float(staleness.mean()),
            "rollout/staleness_max": float(staleness.max()),
            **env_metrics(episodes)}


def env_metrics(episodes: list[Episode]) -> dict[str, float]:
    """Multi-turn episodes (empty for single-turn ones): turns per episode, tool calls and
    environment failures in the batch, and the episode length in policy and environment
    tokens."""
    if all(e.turn_ends is None for e in episodes):
        return {}
    policy = [e.policy_tokens for e in episodes]
    return {"env/turns_mean": sum(e.turns for e in episodes) / len(episodes),
            "env/tool_calls": float(sum(e.tool_calls for e in episodes)),
            "env/errors": float(sum(e.env_error is not None for e in episodes)),
            "env/policy_tokens_mean": sum(policy) / len(episodes),
            "env/env_tokens_mean": sum(len(e.response_ids) - p for e, p in zip(episodes, policy)) / len(episodes)}
