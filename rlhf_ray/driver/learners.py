"""Calls to the learner group with a global batch: each rank gets its shard
(:meth:`SequenceBatch.shards`, the one sharding rule) and the results come back in rank
order."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rlhf_ray.batch import PreferenceBatch, SequenceBatch
from rlhf_ray.workers.group import WorkerGroup


def call_sharded(learners: WorkerGroup, method: str, batch: SequenceBatch | PreferenceBatch,
                 *args, while_waiting: Callable | None = None, **kwargs) -> list:
    """``method(shard_r, *args, **kwargs)`` on every rank r; one result per rank. See
    :func:`gather` for ``while_waiting``."""
    refs = [learners.submit(r, method, s, *args, **kwargs)
            for r, s in enumerate(batch.shards(len(learners)))]
    return gather(learners, refs, method, while_waiting)


def call_each(learners: WorkerGroup, method: str, args_per_rank: list,
              while_waiting: Callable | None = None) -> list:
    """``method(*args_per_rank[r])`` on every rank r; one result per rank."""
    refs = [learners.submit(r, method, *args) for r, args in enumerate(args_per_rank)]
    return gather(learners, refs, method, while_waiting)


def gather(learners: WorkerGroup, refs: list, method: str, while_waiting: Callable | None = None) -> list:
    """The ranks' results in rank order, within the group's timeout. ``while_waiting(refs,
    timeout_s)`` runs while they compute (the PPO driver keeps its episode stream moving:
    :meth:`~rlhf_ray.driver.stream.EpisodeStream.progress_while`) and may return early;
    the timeout covers both waits."""
    ranks = list(range(len(refs)))
    if while_waiting is None:
        return learners.get(refs, ranks, method)
    deadline = time.monotonic() + learners.timeout_s
    while_waiting(refs, learners.timeout_s)
    return learners.get(refs, ranks, method, max(0.0, deadline - time.monotonic()))


def train_step(learners: WorkerGroup, method: str, batch: Any, *args) -> dict[str, float]:
    """One optimizer step on the global batch; adds step time and throughput."""
    start = time.perf_counter()
    metrics = dict(call_sharded(learners, method, batch, *args)[0])  # global (all-reduced)
    metrics["perf/step_s"] = time.perf_counter() - start
    if "perf/tokens" in metrics:
        metrics["perf/tokens_per_s"] = metrics["perf/tokens"] / max(metrics["perf/step_s"], 1e-9)
    return metrics


def infer(learners: WorkerGroup, method: str, batch: SequenceBatch, *args,
          while_waiting: Callable | None = None) -> torch.Tensor:
    """A no-grad forward (``forward_logprobs`` / ``forward_scores``) over all ranks, in order."""
    return torch.cat(call_sharded(learners, method, batch, *args, while_waiting=while_waiting))


def export(learners: WorkerGroup, run_dir: str | Path) -> str:
    """The trained model as a Hugging Face folder ``run_dir/model`` (written by rank 0)."""
    path = Path(run_dir).resolve() / "model"
    learners.call("export_hf", str(path))
    return str(path)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
