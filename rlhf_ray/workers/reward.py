"""Episode rewards: a reward model, a reward function and/or a remote endpoint, summed.

- ``RewardScorer`` scores a list of ``ScoreItem`` (prompt, response, answer) now, in the
  calling thread. The RewardServer actor and the HTTP endpoint (``rlhf-ray serve-rm``) both
  score through it, so the two give the same scores for the same episodes.
- ``MicroBatcher`` joins requests that arrive together into one scoring call.
- ``RewardServer`` is the Ray actor every recipe starts (``Roles.reward``).

A reward function is a built-in checker name (``rlhf_ray.data.CHECKERS``) or any
``module:function`` with the signature ``fn(prompt: str, response: str, answer) -> float``.
A remote endpoint (``reward.url``) is any server that speaks the API in
``rlhf_ray.workers.reward_http``.
"""

from __future__ import annotations

import asyncio
import importlib
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from rlhf_ray.batch import Episode
from rlhf_ray.config import RewardConfig
from rlhf_ray.errors import UserError
from rlhf_ray.workers.group import Worker, role_device, set_cpu_threads

RewardFn = Callable[[str, str, object], float]


class RewardError(UserError, RuntimeError):
    """A reward function failed or returned a non-finite value; names function and episode."""


def load_reward_function(spec: str) -> RewardFn:
    """A built-in checker name or ``module:function``; errors say which part is wrong."""
    from rlhf_ray.data.checkers import CHECKERS

    if ":" not in spec:
        if spec not in CHECKERS:
            raise RewardError(f"reward.function: unknown built-in '{spec}'; choices: "
                              f"{', '.join(CHECKERS)} or 'module:function'")
        check = CHECKERS[spec]
        return lambda prompt, response, answer: check(response, "" if answer is None else str(answer))
    module_name, fn_name = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardError(f"reward.function '{spec}': cannot import module '{module_name}': {e} "
                          "(expected a module importable on every reward worker: install it, or "
                          "ship it with the job's working_dir / PYTHONPATH)") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise RewardError(f"reward.function '{spec}': module '{module_name}' has no function '{fn_name}'")
    return fn


@dataclass(frozen=True)
class ScoreItem:
    """One episode to score, and how an error message names it."""

    prompt: str
    response: str
    answer: object = None
    where: str = "episode"

    @classmethod
    def of(cls, e: Episode) -> ScoreItem:
        return cls(e.prompt_text, e.response_text, e.answer,
                   f"episode (prompt {e.prompt_index}, sample {e.sample_index}, "
                   f"from {e.worker or 'unknown worker'})")


class RewardScorer:
    """The sum of the configured parts: reward model + reward function + remote endpoint.
    Synchronous; the callers (actor, HTTP server) run it off their event loop."""

    def __init__(self, reward: RewardConfig, dtype: str = "float32", device: str = "cpu"):
        import torch

        if not reward.is_set:
            raise ValueError("reward: set reward.model, reward.function, reward.url, or a combination")
        self.cfg = reward
        self.function = load_reward_function(reward.function) if reward.function else None
        self.remote = None
        if reward.url:
            from rlhf_ray.workers.reward_http import RemoteReward

            self.remote = RemoteReward.from_config(reward)
            self.remote.check()  # a wrong URL or token fails here, before any episode
        self.model = self.tokenizer = None
        self.mean, self.std = 0.0, 1.0
        self.device = device
        if reward.model:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            from rlhf_ray.assets import resolve_model

            path = resolve_model(reward.model, role="reward")
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, dtype=getattr(torch, dtype)).eval().to(self.device)
            self.mean = float(getattr(self.model.config, "reward_mean", 0.0))
            self.std = float(getattr(self.model.config, "reward_std", 1.0)) or 1.0
        self.forward_batches = 0

    def describe(self) -> dict:
        return {"model": self.cfg.model, "function": self.cfg.function, "url": self.cfg.url,
                "normalize": self.cfg.normalize, "clip": self.cfg.clip, "device": self.device}

    def score(self, items: list[ScoreItem]) -> list[float]:
        """One float per item, in order."""
        scores = [0.0] * len(items)
        if self.model is not None:
            for start in range(0, len(items), self.cfg.micro_batch_size):
                chunk = items[start: start + self.cfg.micro_batch_size]
                for i, s in enumerate(self._model_scores(chunk)):
                    scores[start + i] += s
                self.forward_batches += 1
        if self.function is not None:
            for i, item in enumerate(items):
                scores[i] += self._call_function(item)
        if self.remote is not None and items:
            for i, s in enumerate(self.remote.score(items)):
                scores[i] += s
        if self.cfg.clip is not None:
            scores = [max(-self.cfg.clip, min(self.cfg.clip, s)) for s in scores]
        return scores

    def _model_scores(self, items: list[ScoreItem]) -> list[float]:
        import torch

        from rlhf_ray.models import sequence_scores

        texts = [item.prompt + item.response for item in items]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            logits = sequence_scores(self.model, enc["input_ids"].to(self.device),
                                     enc["attention_mask"].to(self.device)).float().cpu()
        if self.cfg.normalize:
            logits = (logits - self.mean) / self.std
        return logits.tolist()

    def _call_function(self, item: ScoreItem) -> float:
        try:
            value = self.function(item.prompt, item.response, item.answer)
        except Exception as exc:
            raise RewardError(f"reward function '{self.cfg.function}' raised "
                              f"{type(exc).__name__}: {exc} on {item.where}") from exc
        if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
            raise RewardError(f"reward function '{self.cfg.function}' returned {value!r} "
                              f"(expected a float) on {item.where}")
        value = float(value)  # ints, floats, numpy and torch scalars; never strings or bools
        if not math.isfinite(value):
            raise RewardError(f"reward function '{self.cfg.function}' returned {value} "
                              f"(expected a finite float) on {item.where}")
        return value


class MicroBatcher:
    """``await submit(items)`` from many concurrent callers: the requests that arrive within
    ``wait_s`` of each other are scored together by one call of ``score_batch`` (run in a
    thread, so the event loop keeps accepting requests)."""

    def __init__(self, score_batch: Callable[[list], list[float]], wait_s: float = 0.005):
        self.score_batch, self.wait_s = score_batch, wait_s
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.stats = {"requests": 0, "episodes": 0, "batches": 0}

    def close(self) -> None:
        """Stop the batching task (call from its event loop)."""
        if self.task is not None:
            self.task.cancel()
            self.task = None

    def submit(self, items: list) -> Awaitable[list[float]]:
        loop = asyncio.get_running_loop()
        if self.queue is None:
            self.queue = asyncio.Queue()
            self.task = loop.create_task(self._run())
        future = loop.create_future()
        self.queue.put_nowait((items, future))
        return future

    async def _run(self) -> None:
        while True:
            requests = [await self.queue.get()]
            await asyncio.sleep(self.wait_s)  # let requests that arrive together join this batch
            while not self.queue.empty():
                requests.append(self.queue.get_nowait())
            items = [item for batch, _ in requests for item in batch]
            try:
                scores = await asyncio.to_thread(self.score_batch, items)
            except Exception as e:
                for _, future in requests:
                    if not future.done():
                        future.set_exception(e)
                continue
            self.stats["requests"] += len(requests)
            self.stats["episodes"] += len(items)
            self.stats["batches"] += 1
            offset = 0
            for batch, future in requests:
                if not future.done():  # a caller that gave up (e.g. a closed connection)
                    future.set_result(scores[offset: offset + len(batch)])
                offset += len(batch)


class RewardServer(Worker):
    """Episode-level rewards. An async actor: ``score`` calls that arrive together are
    scored in shared micro-batches of at most ``reward.micro_batch_size`` episodes."""

    role = "reward"

    def __init__(self, reward: RewardConfig, dtype: str = "float32", name: str = "reward"):
        self.cfg, self.name = reward, name
        # torch threads matter only for a reward model's forward
        self.threads = set_cpu_threads(reward.threads, reward.cpus_per_replica) if reward.model else 1
        self.scorer = RewardScorer(reward, dtype, role_device())
        self.batcher = MicroBatcher(self.scorer.score)

    async def score(self, episodes: list[Episode]) -> list[float]:
        """Rewards for ``episodes``, one float each, in order."""
        return await self.batcher.submit([ScoreItem.of(e) for e in episodes])

    async def shutdown(self) -> None:
        self.batcher.close()

    def get_stats(self) -> dict:
        return {"requests": self.batcher.stats["requests"], "episodes": self.batcher.stats["episodes"],
                "forward_batches": self.scorer.forward_batches}

    def health(self) -> dict:
        return {**super().health(), "name": self.name, **self.scorer.describe(), "threads": self.threads,
                "time": time.time()}
