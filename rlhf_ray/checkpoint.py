"""Save and resume the full state of a training job.

A checkpoint is a folder ``run_dir/checkpoints/step_00000012`` holding

- ``policy/`` (and ``value/`` with a critic): each learner rank's DeepSpeed checkpoint
  (weights, optimizer, LR schedule), written by ``LearnerWorker.save_checkpoint``;
- ``rng/``: each learner rank's torch random state, so dropout masks continue as if the run
  had never stopped;
- ``state.json``: the driver's job state (:class:`JobState`).

A save writes everything into ``step_00000012.partial`` and renames it to
``step_00000012`` only when every part is on disk (one atomic rename), so a kill at any
moment of a save (the driver, a learner, a SIGTERM) leaves the previous checkpoint as the
newest complete one; the next save removes the unfinished folder.

Every recipe that resumes uses this one format (sft, rm, dpo, rs, ppo); a recipe's own
driver state (PPO's KL coefficient and per-step history, RS's round outputs) goes in
``JobState.extra``. The offline recipes' data order is a pure function of ``(seed, epoch)``
(see :func:`rlhf_ray.driver.batches.batch_indices`) and PPO's prompts a pure function of
the step, so the step counter is the data position: a resumed run rebuilds exactly the
batches an uninterrupted run would have seen.

``resume=auto`` continues from the newest complete checkpoint, after checking that the run
folder's saved config differs from the new one only in keys that may change between the
two halves of a run (:data:`RESUMABLE_KEYS`). Learners must write to a file system the
driver also sees (one machine, or a shared ``run_dir`` on a cluster).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from rlhf_ray.config_loader import ConfigError, to_dict
from rlhf_ray.errors import UserError
from rlhf_ray.files import write_json_atomic

STATE_FILE = "state.json"
PREFIX = "step_"
PARTIAL = ".partial"  # a save in progress (or cut short)
# Keys that may differ between an interrupted run and its resumption (dotted prefixes).
RESUMABLE_KEYS = ("resume", "max_steps", "epochs", "eval_every", "max_eval_rows", "checkpoint",
                  "logging", "ray", "learner.cpus_per_worker", "learner.gpus_per_worker",
                  "learner.micro_batch_size")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint could not be written, or one on disk cannot be resumed; names the folder."""


@dataclasses.dataclass
class JobState:
    """What the driver needs to continue a run: the step counter and the logged history."""

    step: int  # steps done (optimizer steps, PPO policy versions, RS rounds)
    epoch: int = 0  # epoch of the next step (offline recipes; informational)
    data_fingerprint: str = ""  # hash of the training data, to catch changed data
    first: dict[str, float] = dataclasses.field(default_factory=dict)  # first logged values
    final: dict[str, float] = dataclasses.field(default_factory=dict)  # latest logged values
    history: list = dataclasses.field(default_factory=list)  # [(step, metrics)] logged so far
    extra: dict = dataclasses.field(default_factory=dict)  # the recipe's own driver state


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir).resolve() / "checkpoints"


def step_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"{PREFIX}{step:08d}"


def partial_dir(run_dir: str | Path, step: int) -> Path:
    """Where the save of ``step`` is written before it is renamed to :func:`step_dir`."""
    return checkpoints_dir(run_dir) / f"{PREFIX}{step:08d}{PARTIAL}"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders (renamed from ``.partial``, with ``state.json``), oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
             and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest(run_dir: str | Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def save(learners: Any, run_dir: str | Path, state: JobState, keep_last: int) -> Path:
    """Every rank writes its DeepSpeed state, the driver writes ``state.json``, all into
    ``step_<N>.partial``, which is then renamed to ``step_<N>``; all but the newest
    ``keep_last`` checkpoints are pruned."""
    path, partial = step_dir(run_dir, state.step), partial_dir(run_dir, state.step)
    for unfinished in set(checkpoints_dir(run_dir).glob(f"{PREFIX}*")) - set(complete_checkpoints(run_dir)):
        shutil.rmtree(unfinished, ignore_errors=True)  # saves a kill interrupted
    previous = latest(run_dir)
    try:
        partial.mkdir(parents=True)
        learners.call("save_checkpoint", str(partial), "state", {"step": state.step})
        write_json_atomic(partial / STATE_FILE, dataclasses.asdict(state))
        if path.exists():  # the same step saved again: the old copy goes only once the new one is whole
            replaced = path.with_name(path.name + ".replaced")
            path.rename(replaced)
            partial.rename(path)
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            partial.rename(path)
    except OSError as e:  # a full disk, a quota: the previous checkpoint is untouched
        shutil.rmtree(partial, ignore_errors=True)
        kept = (f"the previous checkpoint {previous} is intact; resume=auto continues from it"
                if previous else "no earlier checkpoint exists")
        what = f"writing {e.filename} failed" if e.filename else "the save failed"
        raise CheckpointError(f"checkpoint {path}: {what} ({e.strerror or e}); expected free "
                              f"space in {checkpoints_dir(run_dir)}; {kept}") from None
    for old in complete_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def read_state(path: Path) -> JobState:
    """The driver's job state stored in checkpoint ``path``; a :class:`CheckpointError` that
    names the file when it is unreadable or the learners' part of the folder is missing."""
    file = path / STATE_FILE
    advice = f"delete {path} to resume from the checkpoint before it, or start a new run_dir"
    try:
        state = JobState(**json.loads(file.read_text()))
        if not isinstance(state.step, int) or state.step < 0:
            raise TypeError(f"step is {state.step!r}")
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {file} cannot be read ({type(e).__name__}: {e}); "
                              f"expected the job state a finished save writes; {advice}") from None
    if not (path / "policy").is_dir():
        raise CheckpointError(f"checkpoint {path} has {STATE_FILE} but no policy/ folder; expected "
                              f"the learners' weights and optimizer state there; {advice}")
    return state


def restore(learners: Any, path: Path) -> JobState:
    """Load every rank's DeepSpeed state from ``path``; returns the driver's job state."""
    state = read_state(path)
    client = learners.call("load_checkpoint", str(path), "state")
    steps = {c.get("step") for c in client}
    if steps != {state.step}:
        raise RuntimeError(f"checkpoint {path}: learner states are at steps {sorted(steps)}, "
                           f"state.json at step {state.step}")
    return state


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def config_changes(old: dict, new: dict, resumable: tuple[str, ...] = RESUMABLE_KEYS) -> list[str]:
    """Dotted keys whose values differ and may not change on resume."""
    a, b = _flatten(old), _flatten(new)
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return [k for k in changed if not any(k == r or k.startswith(r + ".") for r in resumable)]


def check_run_dir(cfg: Any, resumable: tuple[str, ...] = RESUMABLE_KEYS) -> Path | None:
    """Before anything is written: the checkpoint to resume from (``resume=auto``), or None.

    Raises :class:`ConfigError` when ``resume=never`` meets a run folder that holds
    checkpoints, or when ``resume=auto`` meets a saved config that differs incompatibly.
    """
    found = latest(cfg.run_dir)
    if found is not None:
        check_resume(cfg, found.name, found, resumable)
    return found


def check_resume(cfg: Any, newest: str, where: Path,
                 resumable: tuple[str, ...] = RESUMABLE_KEYS) -> None:
    """A run folder holds checkpoints (``newest``, written to ``where``): refuse ``resume=never``,
    and a ``resume=auto`` whose config differs from the saved one outside ``resumable``."""
    if cfg.resume == "never":
        raise ConfigError(f"run_dir {cfg.run_dir} already holds checkpoints (newest: "
                          f"{newest}); pass resume=auto to continue that run, or choose a "
                          "new run_dir")
    saved = Path(cfg.run_dir) / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"resume=auto: {saved} is missing, so the checkpoints in "
                          f"{checkpoints_dir(cfg.run_dir)} cannot be checked against this config")
    changes = config_changes(yaml.safe_load(saved.read_text()) or {}, to_dict(cfg), resumable)
    if changes:
        raise ConfigError(f"resume=auto: this config differs from the one that wrote {where} in "
                          f"{', '.join(changes)}; only {', '.join(resumable)} may change on "
                          "resume (use a new run_dir to start over)")
