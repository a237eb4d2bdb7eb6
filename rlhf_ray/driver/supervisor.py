"""Supervision: dead rollout, reward and reference workers are replaced, within a budget.

The online driver owns one :class:`Supervisor`. When a worker of a replaceable role dies
(its process killed, crashed or its node lost: Ray reports the actor dead) or hangs (no
call of the stream finished for ``faults.hang_timeout_s``), whoever noticed calls
:meth:`Supervisor.replace`:

1. the restart budget is checked: at most ``faults.max_restarts`` replacements per role
   within ``faults.window_s``; past it :class:`FaultBudgetError` stops the job, naming the
   role and the restarts it made;
2. :meth:`WorkerGroup.replace` starts a new worker in the same rank and placement;
3. the role's ``after_restart`` hook runs before the worker gets any work (for rollout
   workers: the current weights and version are pushed to it);
4. the event (role, rank, old and new pid, cause, seconds) is recorded, printed, and the
   run folder's ``workers.json`` (every worker's rank, pid and node) is rewritten.

What the dead worker held is the caller's to hand back: the episode stream re-queues a dead
rollout worker's chunks and retries a dead server's scoring calls on a live replica
(:mod:`rlhf_ray.driver.stream`); a weight sync or an evaluation is run again
(:meth:`Supervisor.retrying`). Nothing is retried blindly: Ray's own restarts and task
retries stay off (``max_restarts=0``), so every replacement is one of these, counted.

Learners are never replaced: their ranks share one process group and one optimizer state,
so a dead learner ends the job at once, and :func:`learner_failure_advice` names the last
checkpoint that the same command (with ``resume=auto``) continues from.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from rlhf_ray import checkpoint
from rlhf_ray.config import FaultsConfig
from rlhf_ray.errors import UserError
from rlhf_ray.files import write_json_atomic
from rlhf_ray.workers.group import WorkerError, WorkerGroup

REPLACEABLE = ("rollout", "reward", "reference")


class FaultBudgetError(UserError, RuntimeError):
    """A role's workers died more often than ``faults.max_restarts`` allows."""


class Supervisor:
    """Replaces dead workers of the groups it watches and counts what the faults cost."""

    def __init__(self, faults: FaultsConfig, run_dir: str | Path | None = None):
        self.faults = faults
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.groups: dict[str, WorkerGroup] = {}
        self._after_restart: dict[str, Callable[[int], None]] = {}
        self._times: dict[str, list[float]] = {}  # role -> when each restart happened (monotonic)
        self.restarts: dict[str, int] = {}  # role -> restarts over the whole run
        self.requeued_prompts = 0  # prompts a dead rollout worker held, generated again
        self.retried_calls = 0  # scoring calls a dead server held, sent again
        self.events: list[dict] = []

    def watch(self, group: WorkerGroup | None, after_restart: Callable[[int], None] | None = None) -> None:
        """Supervise ``group``; ``after_restart(rank)`` readies a new worker. A group of a role
        that is not replaceable (learners) is only listed in ``workers.json``."""
        if group is None:
            return
        self.groups[group.role] = group
        self.restarts.setdefault(group.role, 0)
        if after_restart is not None:
            self._after_restart[group.role] = after_restart
        self.write_workers()

    @property
    def hang_timeout_s(self) -> float | None:
        return self.faults.hang_timeout_s

    # ------------------------------------------------------------------ replacing

    def replace(self, group: WorkerGroup, rank: int, error: WorkerError) -> dict:
        """Replace ``group``'s worker ``rank``, which failed with ``error``; returns the event.
        Raises :class:`FaultBudgetError` when the role's budget is spent, and ``error``
        itself when the group is not supervised."""
        role = group.role
        if self.groups.get(role) is not group or role not in REPLACEABLE:
            raise error
        detected = time.time()
        old_pid = group.infos[rank]["pid"] if rank < len(group.infos) else None
        while True:  # a replacement that dies while it is readied counts, and is replaced too
            now = time.monotonic()
            recent = [t for t in self._times.get(role, []) if now - t <= self.faults.window_s]
            if len(recent) >= self.faults.max_restarts:
                raise FaultBudgetError(
                    f"{role} worker rank {rank} failed ({error.cause}) and the restart budget is spent: "
                    f"{len(recent)} {role} restart(s) within the last {self.faults.window_s:.0f} s "
                    f"({self.restarts[role]} in the whole run), faults.max_restarts={self.faults.max_restarts}; "
                    f"stopping. Fix the cause, or raise faults.max_restarts / lower faults.window_s") from error
            print(f"faults: {role} worker rank {rank} (pid {old_pid}, {error.node}) failed: {error.cause}; "
                  f"replacing it", file=sys.stderr, flush=True)
            self._times[role] = [*recent, now]
            self.restarts[role] = self.restarts.get(role, 0) + 1
            try:
                info = group.replace(rank)
                hook = self._after_restart.get(role)
                if hook is not None:
                    hook(rank)  # e.g. the current weights, before it gets any work
                break
            except WorkerError as e:
                if e.role != role or not e.died:
                    raise
                error, old_pid = e, (group.infos[rank]["pid"] if rank < len(group.infos) else None)
        event = {"role": role, "rank": rank, "old_pid": old_pid, "new_pid": info["pid"],
                 "node": info["ip"], "cause": error.cause, "detected_at": detected,
                 "recovered_at": time.time(), "recover_s": round(time.time() - detected, 3)}
        self.events.append(event)
        print(f"faults: {role} worker rank {rank} replaced by pid {info['pid']} in {event['recover_s']:.1f} s "
              f"(restart {len(self._times[role])} of {self.faults.max_restarts} allowed per "
              f"{self.faults.window_s:.0f} s)", file=sys.stderr, flush=True)
        self.write_workers()
        return event

    def retrying(self, call: Callable[[], object]) -> object:
        """Run ``call`` (a sync, an evaluation, a scaling step); if a worker of a supervised,
        replaceable role dies meanwhile, replace it and run ``call`` again."""
        while True:
            try:
                return call()
            except WorkerError as e:
                if not e.died or e.role not in REPLACEABLE or e.role not in self.groups:
                    raise
                self.replace(self.groups[e.role], e.rank, e)

    # ------------------------------------------------------------------ reporting

    def metrics(self) -> dict[str, float]:
        """``faults/*`` for the step's log (counts over the whole run)."""
        out = {f"faults/restarts/{role}": float(n) for role, n in self.restarts.items()
               if role in REPLACEABLE}
        out["faults/requeued_prompts"] = float(self.requeued_prompts)
        out["faults/retried_calls"] = float(self.retried_calls)
        if self.events:
            out["faults/recover_s"] = self.events[-1]["recover_s"]
        return out

    def summary(self) -> dict:
        return {"restarts": {r: n for r, n in self.restarts.items() if r in REPLACEABLE}, "requeued_prompts": self.requeued_prompts,
                "retried_calls": self.retried_calls, "events": list(self.events)}

    def write_workers(self) -> None:
        """``workers.json`` in the run folder: each supervised worker's rank, pid and node now."""
        if self.run_dir is None:
            return
        rows = {role: [{"rank": rank, "pid": info["pid"], "ip": info["ip"], "host": info["host"],
                        "restarts": sum(1 for e in self.events if e["role"] == role and e["rank"] == rank)}
                       for rank, info in enumerate(group.infos)]
                for role, group in self.groups.items()}
        write_json_atomic(self.run_dir / "workers.json", rows)


def learner_failure_advice(run_dir: str | Path) -> str:
    """What a user does after a learner died: the checkpoint the same command resumes from."""
    last = checkpoint.latest(run_dir)
    if last is None:
        return ("learners are not replaced (their ranks train as one); no checkpoint was written yet, "
                "so rerunning the command starts over")
    return (f"learners are not replaced (their ranks train as one); the last checkpoint is {last}: "
            f"run the same command with resume=auto to continue from it")
