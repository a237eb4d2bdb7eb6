"""rm: train a reward model on preference pairs with the pairwise (Bradley-Terry) loss.

    rlhf-ray rm launch/configs/rm_tiny.yaml [key=value ...]

The model is a sequence classifier with a scalar head (a causal LM folder is loaded as one,
with a fresh head). Its score of a text is the head at the last real token. Each side of a
pair is laid out exactly as the RewardServer will see an episode: ``prompt_text +
response_text`` (the prompt rendered with ``data.template``), tokenised as one text with no
special tokens and no EOS, so training and serving scores agree.

1. Load and validate the preference rows; render and tokenise both sides of each pair.
2. Open the run folder: resume checks, the resolved config, W&B.
3. Start the learners (model_kind="reward"); restore the last checkpoint (resume=auto).
4. Held-out pairwise loss and accuracy before training.
5. For each step: the next global batch of pairs, split over the ranks; one optimizer step
   of -log sigmoid(r_chosen - r_rejected - margin). Periodic evaluation and checkpoints.
6. Held-out loss and accuracy after training. Score the training responses and store their
   mean and std as ``reward_mean`` / ``reward_std`` in the exported model's config.json,
   which the RewardServer reads to normalise; write ``summary.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhf_ray.assets import resolve_model
from rlhf_ray.batch import PreferenceBatch, SequenceBatch
from rlhf_ray.config import RMConfig
from rlhf_ray.data import DataError, TokenizeStats, load_rows, load_tokenizer, pad_id, prompt_text
from rlhf_ray.driver import batches
from rlhf_ray.driver import learners as learner_calls
from rlhf_ray.driver.run import Run
from rlhf_ray.files import write_json_atomic

Pair = tuple[list[int], list[int], int, int]  # chosen ids, rejected ids, their prompt lengths


def run(cfg: RMConfig) -> dict:
    model_path = resolve_model(cfg.model.path, role="reward model")

    # 1. data: prompt_text + response, as the RewardServer scores it
    tokenizer = load_tokenizer(model_path)
    train, heldout, stats = batches.load_splits(reward_pairs, cfg, tokenizer, "rm")
    pad = pad_id(tokenizer)
    total = batches.total_steps(cfg, len(train))
    eval_batch = pair_batch(heldout, pad) if heldout else None

    # 2. run folder; 3. learners (restored from the last checkpoint with resume=auto)
    with Run(cfg, "rm", data_fingerprint=batches.fingerprint(train)) as run:
        with run.phase("start"):
            learners = run.roles.learners(model_path, cfg.learner, cfg.optim, cfg.model.dtype,
                                          optimizer_steps=total, seed=cfg.seed, model_kind="reward")
        start = run.restore(learners)
        if start == 0:
            run.log({"data/train_pairs": len(train), "data/heldout_pairs": len(heldout),
                     "data/dropped": stats.dropped, "data/truncated": stats.truncated}, 0)
            # 4. held-out accuracy before training
            _evaluate(run, learners, eval_batch, cfg.margin, 0)

        # 5. train
        for step in run.steps(start, total):
            rows = batches.batch_indices(len(train), cfg.batch_size, cfg.seed, step)
            batch = pair_batch([train[i] for i in rows], pad)
            with run.phase("train"):
                metrics = learner_calls.train_step(learners, "rm_step", batch, cfg.margin, len(batch))
            run.log(metrics, step + 1)
            run.show(metrics, "rm/loss", "rm/accuracy")
            if run.eval_due(step + 1, total):
                _evaluate(run, learners, eval_batch, cfg.margin, step + 1)
            if run.checkpoint_due(step + 1, total):
                run.save_checkpoint(learners, step + 1)

        # 6. held-out accuracy after training; reward statistics; export
        _evaluate(run, learners, eval_batch, cfg.margin, total)
        with run.phase("reward_stats"):
            mean, std = _reward_stats(learners, train[: cfg.stats_rows], pad)
        run.log({"rm/reward_mean": mean, "rm/reward_std": std}, total)
        with run.phase("export"):
            model_dir = learner_calls.export(learners, cfg.run_dir)
            _store_stats(model_dir, mean, std)
        summary = run.finish({"model": model_dir},
                             {"steps": total, "start_step": start, "reward_mean": mean, "reward_std": std},
                             plot=(["rm/loss", "rm/accuracy", "eval/accuracy"], f"rm: {run.run_dir.name}"))
    acc = summary["metrics"].get("eval/accuracy")
    before_after = f"held-out accuracy {acc['first']:.3f} -> {acc['final']:.3f}; " if acc else ""
    print(f"rm: {before_after}reward mean {mean:.3f} std {std:.3f}; model -> {model_dir}")
    return summary


# --------------------------------------------------------------------------- data


def reward_pairs(data, tokenizer, split: str) -> tuple[list[Pair], TokenizeStats, object]:
    """Preference rows of ``split`` as token ids of ``prompt_text + response`` (no special
    tokens, no EOS), with each side's prompt length. Rows over ``data.max_length`` are
    dropped, or cut on the right with ``truncation=truncate``."""
    if data.format != "preference":
        raise DataError(data.source, f"data.format is '{data.format}' (expected 'preference' "
                                     "for a reward model)")
    loaded = load_rows(data, split, tokenizer)
    prompts = [prompt_text(row, data.template, tokenizer) for row in loaded.rows]
    texts = [t for p, row in zip(prompts, loaded.rows) for t in (p + row.chosen, p + row.rejected)]
    ids = _encode(tokenizer, texts)
    prompt_lengths = [len(x) for x in _encode(tokenizer, prompts)]
    stats, pairs = TokenizeStats(), []
    for i, n in enumerate(prompt_lengths):
        chosen, rejected = ids[2 * i], ids[2 * i + 1]
        if max(len(chosen), len(rejected)) > data.max_length:
            if data.truncation == "drop":
                stats.dropped += 1
                continue
            chosen, rejected = chosen[: data.max_length], rejected[: data.max_length]
            if chosen == rejected:
                stats.dropped += 1
                continue
            stats.truncated += 1
        stats.kept += 1
        pairs.append((chosen, rejected, min(n, len(chosen) - 1), min(n, len(rejected) - 1)))
    return pairs, stats, loaded


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def pair_batch(pairs: list[Pair], pad: int) -> PreferenceBatch:
    return PreferenceBatch(_side([(c, n) for c, _, n, _ in pairs], pad),
                           _side([(r, n) for _, r, _, n in pairs], pad))


def _side(items: list[tuple[list[int], int]], pad: int) -> SequenceBatch:
    return SequenceBatch.from_pairs([(ids[:n], ids[n:]) for ids, n in items], pad)


# --------------------------------------------------------------------------- evaluation, stats


def _evaluate(run: Run, learners, batch, margin: float, step: int) -> None:
    """Held-out pairwise loss, accuracy, mean scores and margin (global over ranks)."""
    if batch is None:
        return
    with run.phase("eval"):
        run.log(learner_calls.call_sharded(learners, "evaluate", batch, "rm", margin=margin)[0], step)


def _reward_stats(learners, pairs: list[Pair], pad: int) -> tuple[float, float]:
    """Mean and (population) std of the scores of every training response."""
    texts = [c for c, _, _, _ in pairs] + [r for _, r, _, _ in pairs]
    batch = SequenceBatch.from_pairs([(ids[:1], ids[1:]) for ids in texts], pad)
    scores = learner_calls.infer(learners, "forward_scores", batch).double()
    return float(scores.mean()), float(scores.std(unbiased=False).clamp_min(1e-6))


def _store_stats(model_dir: str, mean: float, std: float) -> None:
    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text())
    config.update({"reward_mean": mean, "reward_std": std})
    write_json_atomic(path, config, sort_keys=True)

