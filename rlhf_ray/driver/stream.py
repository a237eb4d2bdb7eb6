"""EpisodeStream: keeps rollout workers busy and scores episodes as they finish.

The driver hands it each training step's prompts (:meth:`EpisodeStream.submit`), possibly
several steps ahead. They are split into chunks tagged with their step; each chunk goes to
the least loaded rollout worker, and when a worker finishes a chunk its episodes go at once
to a RewardServer and a ReferenceServer (round-robin over replicas) while other chunks are
still generating.

:meth:`EpisodeStream.collect` returns exactly one step's episodes: every prompt group of that
step and nothing of another step, sorted by ``(prompt_index, sample_index)``. Chunks finish in
any order; a finished chunk of a later step is kept until that step is collected. The chunks
of a step may be uneven (the last one smaller), so any ``prompts_per_step`` works.

Staleness. Every episode carries the policy version of the weights that generated it
(stamped by the rollout worker). Ray runs an actor's calls in submission order, so a chunk
submitted before a weight sync is generated with the old weights and one submitted after
with the new ones: the driver bounds staleness by when it submits. Should a step's episodes
still be older than ``collect(..., min_version=v)`` allows, they are not dropped: their
prompt groups are *re-queued*, i.e. generated again (at the front of the queue, so after the
weight syncs already sent: with the current weights) and scored again, and the step waits for
them. A prompt group is regenerated as a whole, its n samples from one generate call, so a
group baseline (GRPO / RLOO) always compares samples of one policy version; no group mixes
old and new samples, and no prompt, long or short, is lost to the bound. A group that comes
back stale again after ``max_requeues`` regenerations means the rollout workers' weights are
older than ``min_version`` (the driver did not sync): that is an error, not a loop.

Faults. With a :class:`~rlhf_ray.driver.supervisor.Supervisor`, a worker that dies is
replaced instead of ending the job. A dead rollout worker's chunks (generating or waiting
in its queue) go back to the front of the queue, whole prompt groups, and live workers take
them while it restarts; the replacement gets the current weights before any work. A dead
reward or reference replica's scoring calls are sent again to a live replica (or, with one
replica, to its replacement). A stream where no call finishes for ``faults.hang_timeout_s``
kills the worker holding the oldest call and replaces it the same way. Results only count
when a call succeeds, so a prompt is never generated into a step twice and never lost;
:meth:`EpisodeStream.collect` checks that each of a step's prompts comes back exactly once.

Accounting. :class:`EpisodeLedger` counts episodes generated, scored, collected (handed to
the driver), trained (reported by the driver), dropped for staleness (regenerated), and
prompts submitted, re-queued and collected; :attr:`EpisodeStream.ledger` fills in what is
still pending from the stream's queues, and :meth:`EpisodeLedger.check` verifies that
everything reconciles (nothing lost, nothing pending at the end of a run).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field, fields

import ray

from rlhf_ray.batch import Episode
from rlhf_ray.config import SamplingConfig
from rlhf_ray.workers.group import WorkerError, WorkerGroup


@dataclass
class PromptChunk:
    """Prompts of one step sent together to one rollout worker."""

    step: int
    slots: list[int]  # each prompt's position in its step's prompt list
    ids: list[list[int]]
    indices: list[int]  # global prompt indices, kept in the episodes for grouping
    answers: list
    texts: list[str]  # the prompts before the template (for an environment's reset)
    attempt: int = 0  # regenerations of these prompt groups so far (staleness)
    episodes: list[Episode] = field(default_factory=list)
    pending: int = 0  # scoring calls still outstanding (reward, reference)
    generated_at: float = 0.0  # when its generation finished (score latency)


@dataclass
class EpisodeLedger:
    """Where every prompt and episode of a run went.

    Counters (only grow): prompts submitted / re-queued (regenerated for staleness) /
    collected; episodes generated, scored, collected, trained, dropped_stale; prompts
    re-queued and scoring calls retried because a worker died. Gauges (what is
    still in the stream, set by :attr:`EpisodeStream.ledger`): prompts_pending (queued,
    generating, scoring or scored and waiting for their step), scoring (episodes whose
    scores are outstanding), waiting (episodes scored, not yet collected).
    """

    samples_per_prompt: int = 1
    prompts_submitted: int = 0
    prompts_requeued: int = 0
    prompts_collected: int = 0
    generated: int = 0
    scored: int = 0
    collected: int = 0
    trained: int = 0
    filtered: int = 0  # collected, then left out of training by the driver (dynamic sampling)
    dropped_stale: int = 0
    prompts_requeued_fault: int = 0  # held by a rollout worker that died, generated again
    calls_retried_fault: int = 0  # scoring calls held by a reward/reference server that died
    prompts_pending: int = 0
    scoring: int = 0
    waiting: int = 0

    def record_trained(self, n: int) -> None:
        """The driver trained on ``n`` collected episodes."""
        self.trained += n

    def record_filtered(self, n: int) -> None:
        """The driver left ``n`` collected episodes out of training on purpose (dynamic
        sampling's groups whose samples all scored the same)."""
        self.filtered += n

    def problems(self, final: bool = False) -> list[str]:
        """The reconciliation rules that fail (empty: all good)."""
        n = self.samples_per_prompt
        rules = [
            (self.prompts_submitted == self.prompts_collected + self.prompts_pending,
             f"prompts submitted {self.prompts_submitted} != collected {self.prompts_collected} "
             f"+ pending {self.prompts_pending}"),
            (self.generated == self.scored + self.scoring,
             f"episodes generated {self.generated} != scored {self.scored} + scoring {self.scoring}"),
            (self.scored == self.collected + self.dropped_stale + self.waiting,
             f"episodes scored {self.scored} != collected {self.collected} + dropped_stale "
             f"{self.dropped_stale} + waiting {self.waiting}"),
            (self.dropped_stale == self.prompts_requeued * n,
             f"dropped_stale {self.dropped_stale} != prompts requeued {self.prompts_requeued} x {n}"),
            (self.collected == self.prompts_collected * n,
             f"episodes collected {self.collected} != prompts collected {self.prompts_collected} x {n}"),
            (self.trained + self.filtered <= self.collected,
             f"episodes trained {self.trained} + filtered {self.filtered} > collected {self.collected}"),
        ]
        if final:
            rules += [
                (self.prompts_pending == 0 and self.scoring == 0 and self.waiting == 0,
                 f"still pending at the end: {self.prompts_pending} prompts, {self.scoring} "
                 f"episodes scoring, {self.waiting} scored episodes never collected"),
                (self.trained + self.filtered == self.collected,
                 f"episodes trained {self.trained} + filtered {self.filtered} != collected "
                 f"{self.collected}"),
            ]
        return [message for ok, message in rules if not ok]

    def check(self, final: bool = False) -> None:
        """Raise RuntimeError if the counts do not reconcile; ``final``: also nothing may be
        pending and every collected episode must have been trained on."""
        problems = self.problems(final)
        if problems:
            raise RuntimeError("episode ledger does not reconcile: " + "; ".join(problems))

    def as_metrics(self) -> dict[str, float]:
        return {f"rollout/ledger_{f.name}": float(getattr(self, f.name))
                for f in fields(self) if f.name != "samples_per_prompt"}

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class EpisodeStream:
    def __init__(self, rollouts: WorkerGroup, reward: WorkerGroup | None, reference: WorkerGroup | None,
                 sampling: SamplingConfig, max_inflight_per_worker: int = 2, max_requeues: int = 2,
                 supervisor=None):
        """``supervisor``: replaces dead workers (None: a dead worker raises WorkerError)."""
        self.supervisor = supervisor
        self.down: set[int] = set()  # rollout ranks being replaced: no new work
        self.draining: int | None = None  # scale in: ranks >= this get no new work
        self.rollouts, self.reward, self.reference = rollouts, reward, reference
        self.sampling = sampling
        self.max_inflight = max_inflight_per_worker
        self.max_requeues = max_requeues
        self.queue: deque[PromptChunk] = deque()
        self.inflight: dict = {}  # ObjectRef -> (kind, chunk, rank), oldest first
        self._sent_to: dict = {}  # ObjectRef -> the actor handle it went to (a rank may be replaced)
        self.load = [0] * len(rollouts)
        self.done: dict[int, list[PromptChunk]] = {}  # step -> its scored chunks
        self.expected: dict[int, int] = {}  # step -> prompts submitted for it, until collected
        self._replica = itertools.count()
        self.stats = {"chunks": 0, "scored_while_generating": 0, "requeued_chunks": 0}
        self._ledger = EpisodeLedger(samples_per_prompt=sampling.n)
        self._score_latency: list[float] = []

    # ------------------------------------------------------------------ input

    def submit(self, prompts: list, chunk_size: int, step: int) -> None:
        """Queue the prompts of training step ``step`` (objects with ``prompt_ids``,
        ``answer`` and a global ``index``) in chunks of at most ``chunk_size``."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size: expected at least 1, got {chunk_size}")
        first = self.expected.get(step, 0)
        for start in range(0, len(prompts), chunk_size):
            part = prompts[start: start + chunk_size]
            self.queue.append(PromptChunk(step, list(range(first + start, first + start + len(part))),
                                          [p.prompt_ids for p in part], [p.index for p in part],
                                          [p.answer for p in part], [p.plain for p in part]))
        self.expected[step] = first + len(prompts)
        self._ledger.prompts_submitted += len(prompts)
        self._dispatch()

    def grow(self) -> None:
        """The rollout group was scaled out: new workers start idle and take queued chunks."""
        self.load += [0] * (len(self.rollouts) - len(self.load))
        self._dispatch()

    def shrink(self, n: int) -> None:
        """The last ``n`` (idle) workers were removed."""
        if n <= 0:
            return
        if any(self.load[-n:]):
            raise RuntimeError("cannot drop rollout workers that still have chunks in flight")
        del self.load[-n:]
        if self.draining is not None and self.draining >= len(self.load):
            self.draining = None

    def drain(self, keep: int | None) -> None:
        """Scale in: rollout ranks ``>= keep`` get no new chunks (None: all get work again);
        their chunks in flight finish normally, then the workers can be removed."""
        self.draining = keep
        self._dispatch()

    def idle_tail(self, keep: int) -> int:
        """How many ranks ``>= keep`` at the end of the group have nothing in flight."""
        n = 0
        for rank in reversed(range(keep, len(self.load))):
            if self.load[rank]:
                break
            n += 1
        return n

    def _dispatch(self) -> None:
        while self.queue and self.load:
            usable = [r for r in range(len(self.load)) if r not in self.down and r not in self.rollouts.dead
                      and (self.draining is None or r < self.draining)]
            if not usable:
                return
            rank = min(usable, key=lambda r: self.load[r])
            if self.load[rank] >= self.max_inflight:
                return
            chunk = self.queue.popleft()
            ref = self.rollouts.submit(rank, "generate", chunk.ids, self.sampling, chunk.indices,
                                       chunk.answers, chunk.texts)
            self.inflight[ref] = ("generate", chunk, rank)
            self._sent_to[ref] = self.rollouts.workers[rank]
            self.load[rank] += 1

    # ------------------------------------------------------------------ progress

    def _role(self, kind: str) -> WorkerGroup:
        return {"generate": self.rollouts, "score": self.reward, "logprobs": self.reference}[kind]

    def _wait(self, timeout_s: float) -> None:
        """Wait for in-flight calls and move every finished one's chunk along.

        If nothing finishes within ``timeout_s``, the oldest call is gathered through its
        group (waiting up to the group's ``timeout_s`` more), which raises WorkerError naming
        the stuck worker (its role, rank and node); should that call finish meanwhile, it is
        handled like any other. With a supervisor and ``faults.hang_timeout_s``, no progress
        for that long instead counts the oldest call's worker as hung: it is replaced. A
        failed or timed-out call stays in flight: the stream is left consistent."""
        hang_s = self.supervisor.hang_timeout_s if self.supervisor is not None else None
        refs = list(self.inflight)
        ready, rest = ray.wait(refs, num_returns=1, timeout=hang_s or timeout_s)
        if not ready:
            kind, _, rank = self.inflight[refs[0]]
            group = self._role(kind)
            if hang_s:
                self._recover(kind, rank, refs[0], WorkerError(
                    group.role, rank, group._node(rank),
                    f"'{kind}' hung: no call of the stream finished in {hang_s:.0f} s "
                    "(faults.hang_timeout_s)", died=True))
                return
            ready, _ = ray.wait(refs[:1], num_returns=1, timeout=group.timeout_s)
            if not ready:
                raise WorkerError(group.role, rank, group._node(rank),
                                  f"'{kind}' timed out after {timeout_s + group.timeout_s:.0f} s",
                                  timed_out=True)
            rest = refs[1:]
        if rest:  # everything else that is done by now, in submission order
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            done = set(ready) | set(more)
            ready = [r for r in refs if r in done]
        for ref in ready:
            if ref in self.inflight:  # a recovery may have taken a dead worker's other calls
                self._handle(ref)

    def _handle(self, ref) -> None:
        kind, chunk, rank = self.inflight[ref]
        try:
            result = self._role(kind).get([ref], [rank], kind)[0]  # raises WorkerError on failure
        except WorkerError as e:
            if self.supervisor is None or not e.died:
                raise
            self._recover(kind, rank, ref, e)
            return
        del self.inflight[ref]
        self._sent_to.pop(ref, None)
        if kind == "generate":
            self.load[rank] -= 1
            if len(result) != len(chunk.slots) * self.sampling.n:
                raise RuntimeError(f"rollout worker rank {rank} returned {len(result)} episodes for "
                                   f"{len(chunk.slots)} prompts x n={self.sampling.n}")
            chunk.episodes = result
            chunk.generated_at = time.perf_counter()
            self._ledger.generated += len(result)
            self._score(chunk)
            if any(k == "generate" for k, _, _ in self.inflight.values()):
                self.stats["scored_while_generating"] += 1
            self._dispatch()
        elif kind == "score":
            for e, s in zip(chunk.episodes, result):
                e.score = s
            self._finish(chunk)
        else:
            for e, lp in zip(chunk.episodes, result):
                e.ref_logprobs = lp
            self._finish(chunk)

    def _score(self, chunk: PromptChunk) -> None:
        """Reward and reference calls for a generated chunk; episodes an environment already
        scored (multi-turn) skip the reward server."""
        turn = next(self._replica)
        scored = self.reward is None or all(e.score is not None for e in chunk.episodes)
        chunk.pending = (not scored) + (self.reference is not None)
        if not scored:
            self._submit_scoring("score", chunk, turn % len(self.reward))
        if self.reference is not None:
            self._submit_scoring("logprobs", chunk, turn % len(self.reference))
        if chunk.pending == 0:
            self._scored(chunk)

    def _submit_scoring(self, kind: str, chunk: PromptChunk, replica: int) -> None:
        args = (chunk.episodes,) if kind == "score" else (chunk.episodes, self.sampling.temperature)
        group = self._role(kind)
        ref = group.submit(replica, kind, *args)
        self.inflight[ref] = (kind, chunk, replica)
        self._sent_to[ref] = group.workers[replica]

    # ------------------------------------------------------------------ faults

    def _recover(self, kind: str, rank: int, ref, error: WorkerError) -> None:
        """The worker that call ``ref`` went to (``rank`` of ``kind``'s role) died or hung:
        hand back everything it held, let live workers take it, replace the worker, then
        give the rest to the new one. Should the rank have been replaced meanwhile (the
        death was first seen by a weight sync or an evaluation), its calls are only handed
        back: the new worker is healthy and is not replaced again."""
        group = self._role(kind)
        dead = self._sent_to.get(ref)
        replaced = dead is not None and group.workers[rank] is not dead
        lost = [(r, chunk) for r, (k, chunk, rk) in self.inflight.items()
                if k == kind and rk == rank and self._sent_to.get(r) is dead]
        for r, _ in lost:
            del self.inflight[r]
            self._sent_to.pop(r, None)
        if replaced:
            group.dead.discard(rank)  # the failed call marked the rank; its new worker is fine
        chunks = [chunk for _, chunk in lost]
        if kind == "generate":
            # whole prompt groups back to the front, in their order; nothing of them counted yet
            self.load[rank] -= len(chunks)
            for chunk in reversed(chunks):
                self.queue.appendleft(chunk)
            prompts = sum(len(c.slots) for c in chunks)
            self._ledger.prompts_requeued_fault += prompts
            self.supervisor.requeued_prompts += prompts
            if replaced:
                self._dispatch()
                return
            self.down.add(rank)
            self._dispatch()  # live workers start on them while the dead one is replaced
            try:
                self.supervisor.replace(group, rank, error)  # + the current weights
            finally:
                self.down.discard(rank)
            self._dispatch()
            return
        self._ledger.calls_retried_fault += len(chunks)
        self.supervisor.retried_calls += len(chunks)
        live = [r for r in range(len(group)) if (r != rank or replaced) and r not in group.dead]
        for i, chunk in enumerate(chunks if live else []):
            self._submit_scoring(kind, chunk, live[i % len(live)])
        if replaced:
            return
        self.supervisor.replace(group, rank, error)
        for chunk in chunks if not live else []:  # one replica: the stream waited for it
            self._submit_scoring(kind, chunk, rank)

    def _finish(self, chunk: PromptChunk) -> None:
        chunk.pending -= 1
        if chunk.pending == 0:
            self._scored(chunk)

    def _scored(self, chunk: PromptChunk) -> None:
        """Every score of the chunk is in: it waits for its step to be collected."""
        self._score_latency.append(time.perf_counter() - chunk.generated_at)
        self.done.setdefault(chunk.step, []).append(chunk)
        self.stats["chunks"] += 1
        self._ledger.scored += len(chunk.episodes)

    # ------------------------------------------------------------------ staleness

    def _requeue_stale(self, step: int, min_version: int) -> None:
        """Regenerate, whole, the prompt groups of ``step``'s scored chunks that hold an
        episode older than ``min_version``; the chunks' fresh groups stay."""
        kept = []
        for chunk in self.done.get(step, []):
            stale = [i for i in range(len(chunk.slots))
                     if any(e.policy_version < min_version for e in self._prompt_group(chunk, i))]
            if not stale:
                kept.append(chunk)
                continue
            if chunk.attempt >= self.max_requeues:
                versions = sorted({e.policy_version for i in stale for e in self._prompt_group(chunk, i)})
                raise RuntimeError(
                    f"step {step}: prompts {[chunk.indices[i] for i in stale]} were regenerated "
                    f"{chunk.attempt} times and still come from policy versions {versions} < "
                    f"min_version {min_version}: the rollout workers' weights are older than the "
                    "staleness bound allows (sync the weights before collecting)")
            fresh = [i for i in range(len(chunk.slots)) if i not in stale]
            if fresh:
                kept.append(self._subchunk(chunk, fresh, chunk.attempt,
                                           [e for i in fresh for e in self._prompt_group(chunk, i)]))
            self._ledger.dropped_stale += sum(len(self._prompt_group(chunk, i)) for i in stale)
            self._ledger.prompts_requeued += len(stale)
            self.stats["requeued_chunks"] += 1
            # to the front of the queue: generated after the weight syncs already sent, and
            # before later steps' chunks (the driver is waiting for it)
            self.queue.appendleft(self._subchunk(chunk, stale, chunk.attempt + 1, []))
        if step in self.done:
            self.done[step] = kept
        self._dispatch()

    @staticmethod
    def _subchunk(chunk: PromptChunk, positions: list[int], attempt: int,
                  episodes: list[Episode]) -> PromptChunk:
        return PromptChunk(chunk.step, [chunk.slots[i] for i in positions],
                           [chunk.ids[i] for i in positions], [chunk.indices[i] for i in positions],
                           [chunk.answers[i] for i in positions], [chunk.texts[i] for i in positions],
                           attempt, episodes)

    @staticmethod
    def _prompt_group(chunk: PromptChunk, i: int) -> list[Episode]:
        """The episodes of the chunk's i-th prompt (a rollout worker returns each prompt's n
        samples contiguously, in prompt order)."""
        n = len(chunk.episodes) // len(chunk.slots)
        return chunk.episodes[i * n: (i + 1) * n]

    def progress_while(self, refs: list, timeout_s: float) -> None:
        """Keep the stream moving while the driver waits on other calls (``refs``, e.g. a
        training step): a chunk that finishes generating goes to scoring at once, and queued
        chunks go to workers that free up. Without it, episodes generated ahead
        (``max_staleness > 0``) would only be scored at the next :meth:`collect`, after
        training, and the step would wait for their scoring then.

        Returns when every ref is ready, when the stream has nothing in flight, or after
        ``timeout_s``; the caller gathers the refs' results (and reports their failures).
        The stream's own failures raise here as in :meth:`collect`."""
        deadline = time.monotonic() + timeout_s
        while self.inflight:
            _, pending = ray.wait(list(refs), num_returns=len(refs), timeout=0)
            remaining = deadline - time.monotonic()
            if not pending or remaining <= 0:
                return
            calls = list(self.inflight)
            ray.wait(calls + pending, num_returns=1, timeout=remaining)
            finished, _ = ray.wait(calls, num_returns=len(calls), timeout=0)
            done = set(finished)
            for ref in calls:  # in submission order
                if ref in done and ref in self.inflight:
                    self._handle(ref)

    # ------------------------------------------------------------------ output

    def _ready_prompts(self, step: int) -> int:
        return sum(len(c.slots) for c in self.done.get(step, []))

    def collect(self, step: int, timeout_s: float, min_version: int | None = None) -> list[Episode]:
        """Block until every prompt group of ``step`` is scored; return their episodes sorted
        by ``(prompt_index, sample_index)``. With ``min_version``, groups generated by older
        weights are regenerated first (see the module docstring), so every returned episode
        has ``policy_version >= min_version``. Finished chunks of other steps stay for later."""
        if step not in self.expected:
            raise RuntimeError(f"episode stream: step {step} was never submitted (or already collected)")
        expected = self.expected[step]
        while True:
            if min_version is not None:
                self._requeue_stale(step, min_version)
            if self._ready_prompts(step) == expected:
                break
            self._dispatch()
            if not self.inflight:
                raise RuntimeError(f"episode stream is empty: {self._ready_prompts(step)} of {expected} "
                                   f"prompts of step {step} collected and nothing queued")
            self._wait(timeout_s)
        chunks = self.done.pop(step)
        del self.expected[step]
        slots = sorted(slot for c in chunks for slot in c.slots)
        if slots != list(range(expected)):
            twice = sorted({s for s in slots if slots.count(s) > 1})
            missing = sorted(set(range(expected)) - set(slots))
            raise RuntimeError(f"episode ledger: step {step} came back with prompt slots {twice} "
                               f"twice and {missing} missing; every prompt must be trained exactly once")
        groups = sorted(((idx, slot, self._prompt_group(c, i))
                         for c in chunks for i, (slot, idx) in enumerate(zip(c.slots, c.indices))),
                        key=lambda g: (g[0], g[1]))
        episodes = [e for _, _, group in groups for e in sorted(group, key=lambda e: e.sample_index)]
        self._ledger.prompts_collected += expected
        self._ledger.collected += len(episodes)
        return episodes

    # ------------------------------------------------------------------ accounting

    @property
    def ledger(self) -> EpisodeLedger:
        """The run's episode ledger, its gauges filled in from the stream's current state."""
        scoring = {id(c): c for kind, c, _ in self.inflight.values() if kind != "generate"}
        generating = [c for kind, c, _ in self.inflight.values() if kind == "generate"]
        waiting = [c for chunks in self.done.values() for c in chunks]
        self._ledger.scoring = sum(len(c.episodes) for c in scoring.values())
        self._ledger.waiting = sum(len(c.episodes) for c in waiting)
        self._ledger.prompts_pending = sum(len(c.slots) for c in
                                           [*self.queue, *generating, *scoring.values(), *waiting])
        return self._ledger

    def pop_score_latency(self) -> float:
        """Mean seconds from a chunk's generation end to its scores, since the last call."""
        latency, self._score_latency = self._score_latency, []
        return sum(latency) / len(latency) if latency else 0.0
