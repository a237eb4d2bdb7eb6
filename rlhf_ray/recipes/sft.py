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
from rlhf_ray.config import SFTConfig
from rlhf_ray.data import load_tokenizer, pad_id, sft_examples
from rlhf_ray.driver import batches
from rlhf_ray.driver import learners as learner_calls
from rlhf_ray.driver.run import Run


def run(cfg: SFTConfig) -> dict:
    model_path = resolve_model(cfg.model.path, role="sft model")

    # 1. data
    tokenizer = load_tokenizer(model_path)
    train, heldout, stats = batches.load_splits(sft_examples, cfg, tokenizer, "sft")
    pad = pad_id(tokenizer)
    total = batches.total_steps(cfg, len(train))
    eval_batch = batches.sequence_batch(heldout, pad) if heldout else None
    data_id = batches.fingerprint([(e.input_ids, e.loss_mask) for e in train])

    # 2. run folder (resume checks, config.yaml, W&B); 3. learners, restored with resume=auto
    with Run(cfg, "sft", data_fingerprint=data_id) as run:
        with run.phase("start"):
            learners = run.roles.learners(model_path, cfg.learner, cfg.optim, cfg.model.dtype,
                                          optimizer_steps=total, seed=cfg.seed)
        start = run.restore(learners)
        if start == 0:
            run.log({"data/train_examples": len(train), "data/heldout_examples": len(heldout),
                     "data/dropped": stats.dropped, "data/truncated": stats.truncated}, 0)
            # 4. held-out loss before training
            _evaluate(run, learners, eval_batch, 0)

        # 5. train
        for step in run.steps(start, total):
            rows = batches.batch_indices(len(train), cfg.batch_size, cfg.seed, step)
            batch = batches.sequence_batch([train[i] for i in rows], pad)
            with run.phase("train"):
                metrics = learner_calls.train_step(learners, "sft_step", batch,
                                                   float(batch.response_mask.sum()),
                                                   cfg.loss_aggregation, len(batch))
            run.log(metrics, step + 1)
            run.show(metrics, "policy/loss")
            if run.eval_due(step + 1, total):
                _evaluate(run, learners, eval_batch, step + 1)
            if run.checkpoint_due(step + 1, total):
                run.save_checkpoint(learners, step + 1)

        # 6. held-out loss after training, export
        _evaluate(run, learners, eval_batch, total)
        with run.phase("export"):
            model_dir = learner_calls.export(learners, cfg.run_dir)
        summary = run.finish({"model": model_dir}, {"steps": total, "start_step": start},
                             plot=(["policy/loss", "eval/loss", "policy/lr"], f"sft: {run.run_dir.name}"))
    _report(summary)
    return summary


def _evaluate(run: Run, learners, batch, step: int) -> None:
    """Held-out token-mean loss and perplexity (global over ranks)."""
    if batch is None:
        return
    with run.phase("eval"):
        m = learner_calls.call_sharded(learners, "evaluate", batch, "sft", aggregation="token_mean")[0]
    m["eval/perplexity"] = learner_calls.perplexity(m["eval/loss"])
    run.log(m, step)


def _report(summary: dict) -> None:
    loss = summary["metrics"].get("eval/loss")
    where = summary["outputs"]["model"]
    if loss:
        print(f"sft: held-out loss {loss['first']:.4f} -> {loss['final']:.4f}; model -> {where}")
    else:
        print(f"sft: no held-out rows (data.heldout_fraction=0); model -> {where}")
