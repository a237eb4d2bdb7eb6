"""EpisodeStream: keeps rollout workers busy and scores episodes as they finish.

The driver hands it prompts in chunks (:meth:`submit`). Each chunk goes to the least
loaded rollout worker; when a worker finishes a chunk, its episodes go at once to a
RewardServer and a ReferenceServer (round-robin over replicas) while other chunks are
still generating. :meth:`collect` returns scored episodes, whole prompt groups only.

Every episode carries the policy version of the weights that generated it (stamped by the
rollout worker). Ray runs an actor's calls in submission order, so a chunk submitted
before a weight sync is generated with the old weights and one submitted after with the
new ones: the driver controls staleness by when it submits.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

import ray

from rlhf_ray.batch import Episode
from rlhf_ray.config import SamplingConfig
from rlhf_ray.workers.group import WorkerGroup


@dataclass
class PromptChunk:
    """Prompts sent together to one rollout worker."""

    ids: list[list[int]]
    indices: list[int]  # global prompt indices, kept in the episodes for grouping
    answers: list
    episodes: list[Episode] = field(default_factory=list)
    pending: int = 0  # scoring calls still outstanding (reward, reference)


class EpisodeStream:
    def __init__(self, rollouts: WorkerGroup, reward: WorkerGroup, reference: WorkerGroup | None,
                 sampling: SamplingConfig, max_inflight_per_worker: int = 2):
        self.rollouts, self.reward, self.reference = rollouts, reward, reference
        self.sampling = sampling
        self.max_inflight = max_inflight_per_worker
        self.queue: deque[PromptChunk] = deque()
        self.inflight: dict = {}  # ObjectRef -> (kind, chunk, rank)
        self.load = [0] * len(rollouts)
        self.done: deque[PromptChunk] = deque()
        self._replica = itertools.count()
        self.stats = {"chunks": 0, "scored_while_generating": 0}
        self._generated_at: dict[int, float] = {}  # id(chunk) -> when its generation finished
        self._score_latency: list[float] = []

    # ------------------------------------------------------------------ input

    def submit(self, prompts: list, chunk_size: int) -> None:
        """Queue ``prompts`` (objects with ``prompt_ids``, ``answer`` and a global ``index``)."""
        for start in range(0, len(prompts), chunk_size):
            part = prompts[start: start + chunk_size]
            self.queue.append(PromptChunk([p.prompt_ids for p in part], [p.index for p in part],
                                          [p.answer for p in part]))
        self._dispatch()

    def grow(self) -> None:
        """The rollout group was scaled out: new workers start idle and take queued chunks."""
        self.load += [0] * (len(self.rollouts) - len(self.load))
        self._dispatch()

    def shrink(self, n: int) -> None:
        """The last ``n`` (idle) workers were removed."""
        if any(self.load[-n:]):
            raise RuntimeError("cannot drop rollout workers that still have chunks in flight")
        del self.load[-n:]

    def _dispatch(self) -> None:
        while self.queue:
            rank = min(range(len(self.rollouts)), key=lambda r: self.load[r])
            if self.load[rank] >= self.max_inflight:
                return
            chunk = self.queue.popleft()
            ref = self.rollouts.submit(rank, "generate", chunk.ids, self.sampling, chunk.indices,
                                       chunk.answers)
            self.inflight[ref] = ("generate", chunk, rank)
            self.load[rank] += 1

    # ------------------------------------------------------------------ progress

    def _step(self, timeout_s: float) -> None:
        """Wait for one in-flight call and move its chunk along."""
        refs = list(self.inflight)
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout_s)
        if not ready:
            kind, _, rank = self.inflight[refs[0]]
            group = {"generate": self.rollouts, "score": self.reward, "logprobs": self.reference}[kind]
            group.get([refs[0]], [rank], kind)  # raises WorkerError naming the stuck worker
        ref = ready[0]
        kind, chunk, rank = self.inflight.pop(ref)
        if kind == "generate":
            self.load[rank] -= 1
            chunk.episodes = self.rollouts.get([ref], [rank], "generate")[0]
            self._generated_at[id(chunk)] = time.perf_counter()
            self._score(chunk)
            if any(k == "generate" for k, _, _ in self.inflight.values()):
                self.stats["scored_while_generating"] += 1
            self._dispatch()
        elif kind == "score":
            for e, s in zip(chunk.episodes, self.reward.get([ref], [rank], "score")[0]):
                e.score = s
            self._finish(chunk)
        else:
            for e, lp in zip(chunk.episodes, self.reference.get([ref], [rank], "logprobs")[0]):
                e.ref_logprobs = lp
            self._finish(chunk)

    def _score(self, chunk: PromptChunk) -> None:
        turn = next(self._replica)
        r = turn % len(self.reward)
        self.inflight[self.reward.submit(r, "score", chunk.episodes)] = ("score", chunk, r)
        chunk.pending = 1
        if self.reference is not None:
            k = turn % len(self.reference)
            self.inflight[self.reference.submit(k, "logprobs", chunk.episodes,
                                                self.sampling.temperature)] = ("logprobs", chunk, k)
            chunk.pending = 2

    def _finish(self, chunk: PromptChunk) -> None:
        chunk.pending -= 1
        if chunk.pending == 0:
            self._score_latency.append(time.perf_counter() - self._generated_at.pop(id(chunk)))
            self.done.append(chunk)
            self.stats["chunks"] += 1

    # ------------------------------------------------------------------ output

    def collect(self, num_prompts: int, timeout_s: float) -> list[Episode]:
        """Block until ``num_prompts`` prompts' groups are scored; return their episodes,
        oldest chunks first (whole chunks, so possibly a few more prompts)."""
        episodes: list[Episode] = []
        prompts = 0
        while prompts < num_prompts:
            if self.done:
                chunk = self.done.popleft()
                episodes += chunk.episodes
                prompts += len(chunk.ids)
            elif self.inflight:
                self._step(timeout_s)
            else:
                raise RuntimeError(f"episode stream is empty: {prompts} of {num_prompts} prompts "
                                   "collected and nothing queued")
        return episodes

    def pop_score_latency(self) -> float:
        """Mean seconds from a chunk's generation end to its scores, since the last call."""
        latency, self._score_latency = self._score_latency, []
        return sum(latency) / len(latency) if latency else 0.0
