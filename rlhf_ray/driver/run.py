"""One run of a recipe, from its run folder to its ``summary.json``.

    with Run(cfg, "sft") as run:
        learners = run.roles.learners(...)
        start = run.restore(learners)            # 0, or the step of the checkpoint resumed
        for step in run.steps(start, total):
            ...
            run.log(metrics, step + 1)
            if run.checkpoint_due(step + 1, total):
                run.save_checkpoint(learners, step + 1)
        summary = run.finish({"model": ...})

On enter, before anything is written, the run folder is checked against ``resume``
(:func:`rlhf_ray.checkpoint.check_run_dir`): ``resume=never`` refuses a folder that holds
checkpoints, ``resume=auto`` refuses a config that differs in a key that may not change.
A recipe that keeps no checkpoints refuses ``resume=auto`` outright. Then the resolved
config goes to ``config.yaml`` and the logger (W&B, ``metrics.jsonl``) opens; a resumed run
gets its logged history back.

"Step" means one pass of a recipe's loop, counted by ``run.steps``: an optimizer step in
sft, rm and dpo, a policy version in ppo (its ``steps`` key), a round in rs. The learners'
updates are "optimizer steps" (``Roles.learners(optimizer_steps=...)`` sizes the LR
schedule); a checkpoint ``step_<N>`` is named by the recipe's step.

On exit, also on an error or SIGTERM, every worker group started through ``run.roles`` is
shut down in reverse order and a private Ray is stopped.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from rlhf_ray import checkpoint
from rlhf_ray.config_loader import ConfigError, save_config, to_dict
from rlhf_ray.driver.roles import Roles
from rlhf_ray.driver.supervisor import learner_failure_advice
from rlhf_ray.metrics import RunLogger
from rlhf_ray.runtime import worker_env
from rlhf_ray.workers.group import WorkerError


class Run:
    """The lifecycle every recipe shares: run folder, config, logger, workers, summary."""

    def __init__(self, cfg: Any, recipe: str, *,
                 resumable: tuple[str, ...] | None = checkpoint.RESUMABLE_KEYS,
                 data_fingerprint: str = ""):
        """``resumable``: config keys that may change between the halves of a resumed run;
        None: this recipe keeps no checkpoints and cannot resume. ``data_fingerprint``: a
        hash of the training data; a resume with other data is refused."""
        self.cfg, self.recipe = cfg, recipe
        self.run_dir = Path(cfg.run_dir)
        self.resumable, self.data_fingerprint = resumable, data_fingerprint
        self.roles = Roles(cfg.ray, worker_env(), on_connect=self._catch_sigterm)
        self.resume_from: Path | None = None
        self.resume_state: checkpoint.JobState | None = None
        self.logger: RunLogger | None = None
        self._previous_sigterm: Any = None

    @property
    def resuming(self) -> bool:
        return self.resume_from is not None

    # ------------------------------------------------------------------ enter / exit

    def __enter__(self) -> Run:
        self._check_resume()
        save_config(self.cfg, self.run_dir)
        self.logger = RunLogger(self.run_dir, self.cfg.logging, to_dict(self.cfg), self.recipe,
                             resuming=self.resuming)
        if self.resume_state is not None:  # the first half's logged history
            state = self.resume_state
            self.logger.restore([(s, m) for s, m in state.history if s <= state.step],
                             state.first, state.final)
        self._catch_sigterm()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is SystemExit and getattr(exc, "code", None) == 143:
            self._report_sigterm()
        if isinstance(exc, WorkerError) and exc.role == "learner" and self.resumable is not None:
            exc.advice = learner_failure_advice(self.run_dir)  # the checkpoint a rerun resumes from
        try:
            self.roles.shutdown()
        finally:
            self.logger.close()
            if self._previous_sigterm is not None:
                signal.signal(signal.SIGTERM, self._previous_sigterm)

    def _check_resume(self) -> None:
        if self.resumable is None:
            if self.cfg.resume == "auto":
                raise ConfigError(f"resume=auto: {self.recipe} keeps no checkpoints, so it cannot "
                                  "resume; run it again with resume=never (it rewrites its outputs)")
            return
        self.resume_from = checkpoint.check_run_dir(self.cfg, self.resumable)
        if self.resume_from is None:
            return
        self.resume_state = checkpoint.read_state(self.resume_from)
        if self.resume_state.data_fingerprint != self.data_fingerprint:
            raise ConfigError(f"resume=auto: the training data differ from those {self.resume_from} "
                              f"was trained on (data.source={self.cfg.data.source}); use a new run_dir")

    def _report_sigterm(self) -> None:
        """Tell the user what a stop left behind: the checkpoint a resume continues from."""
        last = checkpoint.latest(self.run_dir) if self.resumable is not None else None
        kept = (f"the newest complete checkpoint, {last}, is kept: resume=auto continues from it"
                if last else "no checkpoint to resume from")
        print(f"error: {self.recipe} stopped by SIGTERM (exit 143); {kept}", file=sys.stderr, flush=True)

    def _catch_sigterm(self) -> None:
        """SIGTERM (a job stop, a scheduler) unwinds like an error, so ``__exit__`` runs and
        the process exits 143. Installed on enter and again once Ray is up."""
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
            if self._previous_sigterm is None:
                self._previous_sigterm = previous

    # ------------------------------------------------------------------ logging and cadence

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.logger.log(metrics, step)

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        """Time a phase of the run (``summary.json``'s ``phases_s``)."""
        return self.logger.phase(name)

    def steps(self, start: int, total: int, unit: str = "step") -> Iterator[int]:
        """0-based step indices ``start .. total-1`` behind a progress bar."""
        bar = tqdm(total=total, initial=start, desc=self.recipe, unit=unit, dynamic_ncols=True,
                   disable=not self.cfg.logging.progress_bar)
        self.bar = bar
        try:
            for step in range(start, total):
                yield step
                bar.update(1)
        finally:
            bar.close()

    def show(self, metrics: dict[str, float], *keys: str) -> None:
        """Put ``keys`` of ``metrics`` on the progress bar."""
        self.bar.set_postfix({k.split("/", 1)[1]: f"{metrics[k]:.4g}" for k in keys if k in metrics},
                             refresh=False)

    def eval_due(self, step: int, total: int) -> bool:
        """Periodic held-out evaluation after ``step`` steps (the first and last always run)."""
        every = self.cfg.eval_every
        return every > 0 and step % every == 0 and step < total

    def checkpoint_due(self, step: int, total: int) -> bool:
        every = self.cfg.checkpoint.save_every
        return step == total or (every > 0 and step % every == 0)

    # ------------------------------------------------------------------ checkpoints

    def restore(self, learners: Any) -> int:
        """Load the checkpoint being resumed into ``learners``; the step to continue from
        (0 for a fresh run). The recipe's own saved state is in ``resume_state.extra``."""
        if self.resume_from is None:
            return 0
        with self.phase("start"):
            return checkpoint.restore(learners, self.resume_from).step

    def save_checkpoint(self, learners: Any, step: int, extra: dict | None = None) -> Path:
        """The learners' states plus the driver's (step, logged history, ``extra``)."""
        state = checkpoint.JobState(step=step, data_fingerprint=self.data_fingerprint,
                                    first=dict(self.logger.first), final=dict(self.logger.final),
                                    history=list(self.logger.history), extra=dict(extra or {}))
        with self.phase("checkpoint"):
            return checkpoint.save(learners, self.run_dir, state, self.cfg.checkpoint.keep_last)

    # ------------------------------------------------------------------ outputs

    def finish(self, outputs: dict[str, str], extra: dict | None = None,
               plot: tuple[list[str], str] | None = None, xlabel: str = "step") -> dict:
        """Write ``summary.json`` (metrics, outputs, phase times, ``extra``) and close W&B.

        ``plot``: ``(metric keys, title)`` of a learning-curve plot, ``<recipe>.png``."""
        from rlhf_ray.plots import plot_metrics

        outputs = {**outputs, "config": str(self.run_dir / "config.yaml")}
        last = checkpoint.latest(self.run_dir)
        if last is not None:
            outputs["checkpoint"] = str(last)
        if plot is not None and self.logger.history:
            keys, title = plot
            outputs["plot"] = str(plot_metrics(self.logger.history, keys,
                                               self.run_dir / f"{self.recipe}.png", title,
                                               xlabel=xlabel))
        resumed = {"resumed_from": str(self.resume_from) if self.resume_from else None}
        placed = {"workers": self.roles.placements, **self.roles.resolved} if self.roles.placements else {}
        return self.logger.finish(outputs, {**resumed, **placed, **(extra or {})})


def _exit_on_sigterm(*_: Any) -> None:
    sys.exit(143)
