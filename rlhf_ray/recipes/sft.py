"""sft: supervised fine-tuning on instruction data, with the loss on response tokens only.

    rlhf-ray sft launch/configs/sft_tiny.yaml [key=value ...]

1. Load, validate and tokenise the instruction rows (Alpaca template by default, or the
   tokenizer's chat template); optionally pack several rows into one sequence.
2. Open the run folder: resume checks, the resolved config, W&B.
3. Start ``learner.num_workers`` DeepSpeed learners; restore the last checkpoint (resume=auto).
4. Held-out loss and perplexity before training.
5. For each step: the next global batch (a seeded, resumable order), split over the ranks;
   one optimizer step of next-token cross entropy on the response tokens. Periodic
   held-out evaluation and checkpoints.
6. Held-out loss and perplexity after training; export a Hugging Face folder
   (``run_dir/model``) that transformers and vLLM load; write ``summary.json``.
"""

from __future__ import annotations

from rlhf_ray.assets import resolve_model
from rlhf_ray.configs import SFTConfig
from rlhf_ray.data import load_tokenizer, pad_id, sft_examples
from rlhf_ray.recipes import common
from rlhf_ray.runtime import ray_session, worker_env


def run(cfg: SFTConfig) -> dict:
    model_path = resolve_model(cfg.model.path, role="sft model")

    # 1. data
    tokenizer = load_tokenizer(model_path)
    train, heldout, stats = common.load_splits(sft_examples, cfg, tokenizer, "sft")
    pad = pad_id(tokenizer)
    total = common.total_steps(cfg, len(train))
    per_epoch = len(train) // cfg.batch_size
    data_id = common.fingerprint([(e.input_ids, e.loss_mask) for e in train])
    eval_batch = common.sequence_batch(heldout, pad) if heldout else None

    # 2. run folder
    log, resume_from = common.open_run(cfg, "sft", data_id, {
        "data/train_examples": len(train), "data/heldout_examples": len(heldout),
        "data/dropped": stats.dropped, "data/truncated": stats.truncated})

    # 3. learners (restored from the last checkpoint with resume=auto)
    with ray_session(cfg.ray, worker_env()), common.learner_group(
            cfg, model_path, "causal_lm", total, log, resume_from) as (learners, start):
        # 4. held-out loss before training
        if start == 0:
            _evaluate(learners, eval_batch, log, 0)

        # 5. train
        bar = common.progress(cfg, "sft", start, total)
        for step in common.steps(start, total, bar):
            rows = common.batch_indices(len(train), cfg.batch_size, cfg.seed, step)
            batch = common.sequence_batch([train[i] for i in rows], pad)
            with log.phase("train"):
                metrics = common.train_step(learners, "sft_step", batch,
                                            float(batch.response_mask.sum()),
                                            cfg.loss_aggregation, len(batch))
            log.log(metrics, step + 1)
            common.show(bar, metrics, "policy/loss")
            if common.eval_due(cfg, step + 1, total):
                _evaluate(learners, eval_batch, log, step + 1)
            if common.checkpoint_due(cfg, step + 1, total):
                common.save_checkpoint(cfg, learners, log, step + 1, per_epoch, data_id)

        # 6. held-out loss after training, export
        _evaluate(learners, eval_batch, log, total)
        with log.phase("export"):
            model_dir = common.export(learners, cfg.run_dir)

    summary = common.finish(cfg, log, model_dir, ["policy/loss", "eval/loss", "policy/lr"],
                            start, total, resume_from)
    _report(summary)
    return summary


def _evaluate(learners, batch, log, step: int) -> None:
    """Held-out token-mean loss and perplexity (global over ranks)."""
    if batch is None:
        return
    with log.phase("eval"):
        m = common.call_sharded(learners, "evaluate", batch, "sft", aggregation="token_mean")[0]
    m["eval/perplexity"] = common.perplexity(m["eval/loss"])
    log.log(m, step)


def _report(summary: dict) -> None:
    loss = summary["metrics"].get("eval/loss")
    where = summary["outputs"]["model"]
    if loss:
        print(f"sft: held-out loss {loss['first']:.4f} -> {loss['final']:.4f}; model -> {where}")
    else:
        print(f"sft: no held-out rows (data.heldout_fraction=0); model -> {where}")
