"""Driver-only logging: W&B (online, offline or disabled), the console, and ``summary.json``.

Workers return flat metric dicts; only the driver logs them, under namespaced keys
(``rollout/*``, ``reward/*``, ``policy/*``, ``value/*``, ``kl/*``, ``perf/*``, ``eval/*`` ...).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import time
from pathlib import Path

from rlhf_ray.config import LoggingConfig
from rlhf_ray.files import write_atomic, write_json_atomic, write_jsonl_atomic

NAMESPACES = ("rollout", "env", "reward", "policy", "value", "kl", "perf", "eval", "train", "sync",
              "data", "dpo", "rm", "sft", "rs", "prefs", "faults")


class RunLogger:
    """Logs metrics for one run and keeps what ``summary.json`` needs."""

    def __init__(self, run_dir: str | Path, cfg: LoggingConfig, config: dict, recipe: str,
                 resuming: bool = False):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.recipe, self.cfg = recipe, cfg
        self.first: dict[str, float] = {}
        self.final: dict[str, float] = {}
        self.phases: dict[str, float] = {}
        self.history: list[tuple[int, dict[str, float]]] = []  # (step, metrics) for plots
        self.start = time.time()
        # every logged step, appended as it happens (watch it with `tail -f`); a resumed run
        # puts its earlier part back with restore()
        self.metrics_file = self.run_dir / "metrics.jsonl"
        write_atomic(self.metrics_file, "")
        self.wandb = None
        if cfg.wandb_mode != "disabled":
            from rlhf_ray.files import temp_files_in_scratch

            with temp_files_in_scratch():  # W&B's media and artifact folders, made at import
                import wandb

            if cfg.wandb_mode == "online" and not os.environ.get("WANDB_API_KEY"):
                raise ValueError("logging.wandb_mode=online needs WANDB_API_KEY; "
                                 "use offline or disabled")
            # a resumed run continues the same W&B run (its id is kept in the run folder)
            id_file = self.run_dir / "wandb_run_id"
            run_id = id_file.read_text().strip() if resuming and id_file.is_file() else None
            if run_id is None:
                run_id = secrets.token_hex(4)
                write_atomic(id_file, run_id + "\n")
            self.wandb = wandb.init(project=cfg.project, name=cfg.run_name or self.run_dir.name,
                                    group=cfg.group, tags=list(cfg.tags) or None,
                                    dir=str(self.run_dir), mode=cfg.wandb_mode, config=config,
                                    job_type=recipe, reinit="finish_previous", id=run_id,
                                    resume="allow",
                                    settings=wandb.Settings(x_disable_stats=not cfg.system_metrics))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key in metrics:
            if key.split("/", 1)[0] not in NAMESPACES or "/" not in key:
                raise ValueError(f"metric '{key}' has no known namespace ({', '.join(NAMESPACES)})")
        self.history.append((step, {k: float(v) for k, v in metrics.items()}))
        with self.metrics_file.open("a") as f:
            f.write(json.dumps({"step": step, **self.history[-1][1]}) + "\n")
        for key, value in metrics.items():
            value = float(value)
            if math.isfinite(value):
                self.first.setdefault(key, value)
                self.final[key] = value
        if self.wandb is not None and step % max(self.cfg.log_every, 1) == 0:
            self.wandb.log(metrics, step=step)

    SAMPLE_COLUMNS = ("step", "prompt", "response", "reward", "kl", "version")

    def log_samples(self, rows: list[dict], step: int) -> None:
        """A table of sample episodes (``SAMPLE_COLUMNS``): appended to ``samples.jsonl``
        and logged to W&B as ``samples/episodes`` at ``step``."""
        rows = [{"step": step, **{k: r[k] for k in self.SAMPLE_COLUMNS[1:]}} for r in rows]
        with (self.run_dir / "samples.jsonl").open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            import wandb

            table = wandb.Table(columns=list(self.SAMPLE_COLUMNS),
                                data=[[r[c] for c in self.SAMPLE_COLUMNS] for r in rows])
            self.wandb.log({"samples/episodes": table}, step=step)

    def restore(self, history: list, first: dict[str, float], final: dict[str, float]) -> None:
        """A resumed run: take back the history logged before the checkpoint."""
        self.history = [(int(step), dict(m)) for step, m in history]
        self.first.update(first)
        self.final.update(final)
        self._rewrite()

    def state(self) -> dict:
        """What restore() needs, for the run's checkpoint."""
        return {"history": list(self.history), "first": dict(self.first), "final": dict(self.final)}

    def _rewrite(self) -> None:
        write_jsonl_atomic(self.metrics_file, ({"step": step, **m} for step, m in self.history))

    @contextlib.contextmanager
    def phase(self, name: str):
        """Time a phase of the run (summed if entered several times)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start

    def summary(self, outputs: dict[str, str], extra: dict | None = None) -> dict:
        return {
            "recipe": self.recipe,
            "metrics": {k: {"first": self.first[k], "final": self.final[k]} for k in sorted(self.final)},
            "outputs": outputs,
            "phases_s": {k: round(v, 3) for k, v in self.phases.items()},
            "wall_s": round(time.time() - self.start, 3),
            **(extra or {}),
        }

    def close(self) -> None:
        """Close W&B if ``finish`` did not (a run that stopped on an error)."""
        if self.wandb is not None:
            self.wandb.finish(exit_code=1)
            self.wandb = None

    def finish(self, outputs: dict[str, str], extra: dict | None = None) -> dict:
        """Write ``summary.json`` and close W&B; returns the summary."""
        self._rewrite()
        summary = self.summary({**outputs, "metrics": str(self.metrics_file)}, extra)
        if self.wandb is not None:
            summary["wandb_dir"] = str(Path(self.wandb.dir).parent)
            self.wandb.finish()
            self.wandb = None
        write_json_atomic(self.run_dir / "summary.json", summary)
        return summary
