"""Driver-side parts shared by the training recipes (sft, rm, dpo).

Each recipe's ``run(cfg)`` keeps the algorithm; this module holds what they all do the same
way: opening the run folder (resume checks, resolved config, logger), the data order, the
learner group, sharding a global batch over the ranks, the step/eval/checkpoint cadence and
the export.

Data order: step ``s`` (0-based) of a run with ``n`` training examples and global batch
``b`` reads rows ``perm_e[p*b:(p+1)*b]`` of epoch ``e = s // (n // b)``, position
``p = s % (n // b)``, where ``perm_e`` is a permutation seeded by ``(seed, e)``. The last
partial batch of an epoch is dropped. The order is a pure function of the step, so a
resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from rlhf_ray import checkpoint
from rlhf_ray.batch import PreferenceBatch, SequenceBatch
from rlhf_ray.config import ConfigError, save_config, to_dict
from rlhf_ray.data import DataError, PackedExample, collate_packed, collate_sft, read_source
from rlhf_ray.metrics import RunLogger

FORMAT_KEYS = {"preference": {"chosen", "rejected"}, "instruction": {"instruction", "output"},
               "conversation": {"messages"}}
USE_FOR = {"preference": "rlhf-ray rm or rlhf-ray dpo", "instruction": "rlhf-ray sft",
           "conversation": "rlhf-ray sft"}


# --------------------------------------------------------------------------- data


def load_splits(loader: Callable, cfg: Any, tokenizer: Any, recipe: str) -> tuple[list, list, Any]:
    """``loader(cfg.data, tokenizer, split) -> (examples, stats, data)`` for train and held-out;
    a format mismatch error says which recipe the rows are for."""
    try:
        train, stats, _ = loader(cfg.data, tokenizer, "train")
        heldout = loader(cfg.data, tokenizer, "heldout")[0] if cfg.data.heldout_fraction else []
    except DataError as e:
        raise DataError(cfg.data.source, _format_hint(cfg.data, recipe, e)) from None
    if cfg.max_eval_rows is not None:
        heldout = heldout[: cfg.max_eval_rows]
    if 0 < len(heldout) < cfg.learner.num_workers:
        raise ConfigError(f"data.heldout_fraction: {len(heldout)} held-out examples cannot be "
                          f"split over learner.num_workers={cfg.learner.num_workers} ranks; "
                          "hold out more rows (or set heldout_fraction=0 to skip evaluation)")
    return train, heldout, stats


def _format_hint(data: Any, recipe: str, error: DataError) -> str:
    text = str(error).removeprefix(f"{data.source}: ")
    try:
        first = next(r.data for r in read_source(data)[0] if isinstance(r.data, dict))
    except Exception:  # unreadable source: the original error says why
        return text
    for fmt, keys in FORMAT_KEYS.items():
        if keys <= set(first) and fmt != data.format:
            return (f"{text} (the rows look like '{fmt}' data, which is for {USE_FOR[fmt]}; "
                    f"{recipe} was given data.format={data.format})")
    return text


def sequence_batch(examples: Sequence, pad_id: int) -> SequenceBatch:
    """SFT examples (or packs) as a right-padded SequenceBatch; the loss mask covers responses."""
    if examples and isinstance(examples[0], PackedExample):
        t = collate_packed(examples, pad_id)
    else:
        t = collate_sft(examples, pad_id)
    return SequenceBatch(t["input_ids"], t["attention_mask"], t["loss_mask"].float())


def preference_batch(pairs: Sequence[tuple[list[int], list[int], list[int]]],
                     pad_id: int) -> PreferenceBatch:
    """``(prompt_ids, chosen_ids, rejected_ids)`` triples as a PreferenceBatch."""
    return PreferenceBatch(SequenceBatch.from_pairs([(p, c) for p, c, _ in pairs], pad_id),
                           SequenceBatch.from_pairs([(p, r) for p, _, r in pairs], pad_id))


def fingerprint(items: Sequence) -> str:
    """A short hash of the training examples: resume refuses changed data."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(repr(item).encode())
    return digest.hexdigest()[:16]


def total_steps(cfg: Any, n_train: int) -> int:
    """Optimizer steps of the run: ``max_steps`` if set (cycling epochs), else all epochs."""
    if n_train < cfg.batch_size:
        raise ConfigError(f"batch_size: {cfg.batch_size} is larger than the {n_train} training "
                          f"examples of {cfg.data.source}; lower batch_size or add data")
    return cfg.max_steps if cfg.max_steps else cfg.epochs * (n_train // cfg.batch_size)


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Rows of step ``step`` (see the module docstring)."""
    per_epoch = n // batch_size
    epoch, pos = divmod(step, per_epoch)
    return _permutation(n, seed, epoch)[pos * batch_size: (pos + 1) * batch_size].tolist()


# --------------------------------------------------------------------------- the run folder


def open_run(cfg: Any, recipe: str, data_fingerprint: str,
             data_metrics: dict[str, float]) -> tuple[RunLogger, Path | None]:
    """Check ``resume`` against the run folder, write the resolved config, start the logger.

    Returns the logger and the checkpoint to resume from (None: start at step 0). A fresh
    run logs ``data_metrics`` at step 0; a resumed one gets the logged history back.
    """
    resume_from = checkpoint.check_run_dir(cfg)
    state = checkpoint.read_state(resume_from) if resume_from else None
    if state is not None and state.data_fingerprint != data_fingerprint:
        raise ConfigError(f"resume=auto: the training data differ from those {resume_from} was "
                          f"trained on (data.source={cfg.data.source}); use a new run_dir")
    save_config(cfg, cfg.run_dir)
    log = RunLogger(cfg.run_dir, cfg.logging, to_dict(cfg), recipe, resuming=state is not None)
    if state is not None:  # the first half's logged history, for summary.json and plots
        log.restore([(step, m) for step, m in state.history if step <= state.step],
                    state.first, state.final)
    else:
        log.log(data_metrics, step=0)
    return log, resume_from


def save_checkpoint(cfg: Any, group: Any, log: RunLogger, step: int, per_epoch: int,
                    data_fingerprint: str) -> Path:
    """Learner states plus the driver's job state after ``step`` optimizer steps."""
    state = checkpoint.JobState(step=step, epoch=step // per_epoch,
                                data_fingerprint=data_fingerprint, first=dict(log.first),
                                final=dict(log.final), history=list(log.history))
    with log.phase("checkpoint"):
        return checkpoint.save(group, cfg.run_dir, state, cfg.checkpoint.keep_last)


# --------------------------------------------------------------------------- learners


@contextlib.contextmanager
def learner_group(cfg: Any, model_path: str, kind: str, steps: int, log: RunLogger,
                  resume_from: Path | None):
    """``cfg.learner.num_workers`` initialised learners, restored from ``resume_from`` if
    set; shut down on exit. Yields ``(group, start_step)``."""
    from rlhf_ray.workers.group import WorkerGroup, WorkerResources
    from rlhf_ray.workers.learner import LearnerWorker

    with log.phase("start"):
        group = WorkerGroup(LearnerWorker, "learner", cfg.learner.num_workers,
                            args=(model_path, cfg.learner, cfg.optim, cfg.model.dtype, kind),
                            kwargs={"total_steps": steps, "seed": cfg.seed}, distributed=True,
                            resources=WorkerResources(cfg.learner.cpus_per_worker,
                                                      cfg.learner.gpus_per_worker,
                                                      placement=cfg.learner.placement),
                            timeout_s=cfg.ray.call_timeout_s,
                            start_timeout_s=cfg.ray.start_timeout_s)
    try:
        with log.phase("start"):
            group.call("init")
            start = checkpoint.restore(group, resume_from).step if resume_from else 0
        yield group, start
    finally:
        group.shutdown()


def shard(batch: SequenceBatch | PreferenceBatch, n: int) -> list:
    """``n`` contiguous, near-equal row shards of a global batch (one per rank)."""
    if len(batch) < n:
        raise ValueError(f"{len(batch)} rows cannot be split over {n} learner ranks "
                         "(every rank needs at least one row)")
    parts = torch.arange(len(batch)).tensor_split(n)
    if isinstance(batch, PreferenceBatch):
        def cut(t, s):
            return None if t is None else t[s]
        return [PreferenceBatch(batch.chosen.select(s), batch.rejected.select(s),
                                cut(batch.ref_chosen_logps, s), cut(batch.ref_rejected_logps, s))
                for s in (slice(int(p[0]), int(p[-1]) + 1) for p in parts)]
    return [batch.select(slice(int(p[0]), int(p[-1]) + 1)) for p in parts]


def call_sharded(group: Any, method: str, batch: Any, *args, **kwargs) -> list:
    """``method(shard_r, *args, **kwargs)`` on every rank r; one result per rank."""
    refs = [group.submit(r, method, s, *args, **kwargs)
            for r, s in enumerate(shard(batch, len(group)))]
    return group.get(refs, list(range(len(refs))), method)


def train_step(group: Any, method: str, batch: Any, *args) -> dict[str, float]:
    """One optimizer step on the global batch; adds step time and throughput."""
    start = time.perf_counter()
    metrics = dict(call_sharded(group, method, batch, *args)[0])  # global (all-reduced)
    metrics["perf/step_s"] = time.perf_counter() - start
    if "perf/tokens" in metrics:
        metrics["perf/tokens_per_s"] = metrics["perf/tokens"] / max(metrics["perf/step_s"], 1e-9)
    return metrics


def infer(group: Any, method: str, batch: SequenceBatch) -> torch.Tensor:
    """A no-grad forward (``forward_logprobs`` / ``forward_scores``) over all ranks, in order."""
    return torch.cat(call_sharded(group, method, batch))


# --------------------------------------------------------------------------- cadence


def progress(cfg: Any, recipe: str, start: int, total: int) -> tqdm:
    return tqdm(total=total, initial=start, desc=recipe, unit="step", dynamic_ncols=True,
                disable=not cfg.logging.progress_bar)


def eval_due(cfg: Any, step: int, total: int) -> bool:
    """Periodic held-out evaluation (the first and last always run)."""
    return cfg.eval_every > 0 and step % cfg.eval_every == 0 and step < total


def checkpoint_due(cfg: Any, step: int, total: int) -> bool:
    every = cfg.checkpoint.save_every
    return step == total or (every > 0 and step % every == 0)


def steps(start: int, total: int, bar: tqdm) -> Iterator[int]:
    """0-based step indices ``start .. total-1``, advancing the progress bar."""
    for step in range(start, total):
        yield step
        bar.update(1)
    bar.close()


def show(bar: tqdm, metrics: dict[str, float], *keys: str) -> None:
    bar.set_postfix({k.split("/", 1)[1]: f"{metrics[k]:.4g}" for k in keys if k in metrics},
                    refresh=False)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


# --------------------------------------------------------------------------- outputs


def export(group: Any, run_dir: str | Path) -> str:
    """The trained model as a Hugging Face folder ``run_dir/model`` (written by rank 0)."""
    path = Path(run_dir).resolve() / "model"
    group.call("export_hf", str(path))
    return str(path)


def finish(cfg: Any, log: RunLogger, model_dir: str, plot_keys: list[str], start: int,
           total: int, resume_from: Path | None, extra: dict | None = None) -> dict:
    """Plot the learning curves, write ``summary.json`` (metrics, outputs, phase times)."""
    from rlhf_ray.plots import plot_metrics

    run_dir = Path(cfg.run_dir).resolve()
    out = {"model": model_dir, "config": str(run_dir / "config.yaml")}
    last = checkpoint.latest(run_dir)
    if last is not None:
        out["checkpoint"] = str(last)
    if log.history:
        out["plot"] = str(plot_metrics(log.history, plot_keys, run_dir / f"{log.recipe}.png",
                                       f"{log.recipe}: {run_dir.name}"))
    return log.finish(out, {"steps": total, "start_step": start,
                            "resumed_from": str(resume_from) if resume_from else None,
                            **(extra or {})})
