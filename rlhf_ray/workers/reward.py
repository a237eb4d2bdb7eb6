"""RewardServer: scores whole episodes (prompt + complete response) with a reward model
and/or a reward function. Concurrent requests from many rollout workers are micro-batched.

A reward function is a built-in checker name (``rlhf_ray.data.CHECKERS``) or any
``module:function`` with the signature ``fn(prompt: str, response: str, answer) -> float``.
With both a model and a function, the episode reward is their sum.
"""

from __future__ import annotations

import asyncio
import importlib
import math
import time
from collections.abc import Callable

from rlhf_ray.batch import Episode
from rlhf_ray.config import RewardConfig
from rlhf_ray.errors import UserError
from rlhf_ray.workers.group import Worker

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
        raise RewardError(f"reward.function '{spec}': cannot import module '{module_name}': {e}") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise RewardError(f"reward.function '{spec}': module '{module_name}' has no function '{fn_name}'")
    return fn


class RewardServer(Worker):
    """Episode-level rewards. An async actor: ``score`` calls that arrive together are
    scored in shared micro-batches of at most ``reward.micro_batch_size`` episodes."""

    role = "reward"

    def __init__(self, reward: RewardConfig, dtype: str = "float32", name: str = "reward"):
        import torch

        if not reward.model and not reward.function:
            raise ValueError("reward: set reward.model, reward.function, or both")
        self.cfg, self.name = reward, name
        self.function = load_reward_function(reward.function) if reward.function else None
        self.model = self.tokenizer = None
        self.mean, self.std = 0.0, 1.0
        if reward.model:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            from rlhf_ray.assets import resolve_model

            path = resolve_model(reward.model, role="reward")
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, dtype=getattr(torch, dtype)).eval()
            self.mean = float(getattr(self.model.config, "reward_mean", 0.0))
            self.std = float(getattr(self.model.config, "reward_std", 1.0)) or 1.0
        self.queue: asyncio.Queue | None = None
        self.stats = {"requests": 0, "episodes": 0, "forward_batches": 0}

    async def score(self, episodes: list[Episode]) -> list[float]:
        """Rewards for ``episodes``, one float each, in order."""
        if self.queue is None:
            self.queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._batcher())
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((episodes, future))
        return await future

    async def _batcher(self) -> None:
        while True:
            requests = [await self.queue.get()]
            await asyncio.sleep(0.005)  # let requests that arrive together join this batch
            while not self.queue.empty():
                requests.append(self.queue.get_nowait())
            episodes = [e for eps, _ in requests for e in eps]
            try:
                scores = await asyncio.to_thread(self._score_now, episodes)
            except Exception as e:
                for _, future in requests:
                    future.set_exception(e)
                continue
            self.stats["requests"] += len(requests)
            self.stats["episodes"] += len(episodes)
            offset = 0
            for eps, future in requests:
                future.set_result(scores[offset: offset + len(eps)])
                offset += len(eps)

    def _score_now(self, episodes: list[Episode]) -> list[float]:
        scores = [0.0] * len(episodes)
        if self.model is not None:
            for start in range(0, len(episodes), self.cfg.micro_batch_size):
                chunk = episodes[start: start + self.cfg.micro_batch_size]
                for i, s in enumerate(self._model_scores(chunk)):
                    scores[start + i] += s
                self.stats["forward_batches"] += 1
        if self.function is not None:
            for i, e in enumerate(episodes):
                scores[i] += self._call_function(e)
        if self.cfg.clip is not None:
            scores = [max(-self.cfg.clip, min(self.cfg.clip, s)) for s in scores]
        return scores

    def _model_scores(self, episodes: list[Episode]) -> list[float]:
        import torch

        from rlhf_ray.models import sequence_scores

        texts = [e.prompt_text + e.response_text for e in episodes]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            logits = sequence_scores(self.model, enc["input_ids"], enc["attention_mask"]).float()
        if self.cfg.normalize:
            logits = (logits - self.mean) / self.std
        return logits.tolist()

    def _call_function(self, e: Episode) -> float:
        where = (f"episode (prompt {e.prompt_index}, sample {e.sample_index}, "
                 f"from {e.worker or 'unknown worker'})")
        try:
            value = self.function(e.prompt_text, e.response_text, e.answer)
        except Exception as exc:
            raise RewardError(f"reward function '{self.cfg.function}' raised "
                              f"{type(exc).__name__}: {exc} on {where}") from exc
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise RewardError(f"reward function '{self.cfg.function}' returned {value!r} "
                              f"(expected a float) on {where}") from None
        if not math.isfinite(value):
            raise RewardError(f"reward function '{self.cfg.function}' returned {value} on {where}")
        return value

    def get_stats(self) -> dict:
        return dict(self.stats)

    def health(self) -> dict:
        return {**super().health(), "name": self.name, "model": self.cfg.model,
                "function": self.cfg.function, "time": time.time()}
