"""dpo: Direct Preference Optimization (DPO, IPO or conservative DPO) from an SFT model.

    rlhf-ray dpo launch/configs/dpo_tiny.yaml [key=value ...]

The frozen reference (by default the starting policy itself) runs in a ReferenceServer; it
gives the summed log-probs of every chosen and rejected response. The policy trains on the
learners with loss ``-log sigmoid(beta * h)`` (``h`` = chosen minus rejected log-ratio to the
reference), or IPO's ``(h - 1/(2 beta))^2``, or cDPO's label-smoothed loss.

1. Load, validate and tokenise the preference pairs (responses end with EOS).
2. Open the run folder: resume checks, the resolved config, W&B.
3. Start the learners (restored with resume=auto) and the ReferenceServer.
4. Reference log-probs of the held-out pairs; held-out metrics before training.
5. For each step: the next global batch of pairs; the reference scores it (the next
   batch's request is in flight while the learners train on this one); one DPO step,
   logging implicit chosen/rejected rewards, accuracy and margin. Periodic evaluation and
   checkpoints.
6. Held-out metrics after training; export the policy (``run_dir/model``); ``summary.json``.

Held-out metrics: ``eval/accuracy`` and ``eval/margin`` use the implicit rewards
``beta * (log pi - log ref)`` (0 at the start, where policy = reference);
``eval/logp_accuracy`` and ``eval/logp_margin`` ask whether the policy itself gives the
chosen response a higher log-likelihood than the rejected one, so they compare the SFT
starting point with the result directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from rlhf_ray.assets import resolve_model
from rlhf_ray.batch import PreferenceBatch, SequenceBatch
from rlhf_ray.config import DPOConfig, ReferenceConfig
from rlhf_ray.data import load_tokenizer, pad_id, preference_examples
from rlhf_ray.driver import batches
from rlhf_ray.driver import learners as learner_calls
from rlhf_ray.driver.run import Run
from rlhf_ray.losses import dpo_loss
from rlhf_ray.workers.group import WorkerGroup


def run(cfg: DPOConfig) -> dict:
    model_path = resolve_model(cfg.model.path, role="dpo policy")
    reference = (model_path, cfg.model.dtype) if cfg.reference_is_policy else \
        (resolve_model(cfg.reference.path, role="dpo reference"), cfg.reference.dtype)

    # 1. data
    tokenizer = load_tokenizer(model_path)
    train, heldout, stats = batches.load_splits(preference_examples, cfg, tokenizer, "dpo")
    pad = pad_id(tokenizer)
    train = [(e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in train]
    heldout = [(e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in heldout]
    total = batches.total_steps(cfg, len(train))

    def batch_at(step: int) -> PreferenceBatch:
        rows = batches.batch_indices(len(train), cfg.batch_size, cfg.seed, step)
        return batches.preference_batch([train[i] for i in rows], pad)

    # 2. run folder; 3. learners (restored with resume=auto) and the frozen reference
    with Run(cfg, "dpo", data_fingerprint=batches.fingerprint(train)) as run:
        with run.phase("start"), run.roles.together():
            learners = run.roles.learners(model_path, cfg.learner, cfg.optim, cfg.model.dtype,
                                          optimizer_steps=total, seed=cfg.seed)
            ref = run.roles.reference(*reference, ReferenceConfig(
                micro_batch_size=cfg.learner.micro_batch_size, cpus_per_replica=cfg.reference_cpus),
                cfg.learner.autocast)
        start = run.restore(learners)
        if start == 0:
            run.log({"data/train_pairs": len(train), "data/heldout_pairs": len(heldout),
                     "data/dropped": stats.dropped, "data/truncated": stats.truncated}, 0)
        # 4. held-out reference log-probs; held-out metrics before training
        eval_batch = next(_with_reference(run, ref, [batches.preference_batch(heldout, pad)])) \
            if heldout else None
        if start == 0:
            _evaluate(run, learners, eval_batch, cfg, 0)

        # 5. train
        with_ref = _with_reference(run, ref, (batch_at(s) for s in range(start, total)))
        for step, batch in zip(run.steps(start, total), with_ref):
            with run.phase("train"):
                metrics = learner_calls.train_step(learners, "dpo_step", batch, cfg.beta,
                                                   cfg.loss_type, cfg.label_smoothing, len(batch))
            run.log(metrics, step + 1)
            run.show(metrics, "dpo/loss", "dpo/accuracy", "dpo/margin")
            if run.eval_due(step + 1, total):
                _evaluate(run, learners, eval_batch, cfg, step + 1)
            if run.checkpoint_due(step + 1, total):
                run.save_checkpoint(learners, step + 1)

        # 6. held-out metrics after training, export
        _evaluate(run, learners, eval_batch, cfg, total)
        with run.phase("export"):
            model_dir = learner_calls.export(learners, cfg.run_dir)
        summary = run.finish({"model": model_dir}, {"steps": total, "start_step": start},
                             plot=(["dpo/loss", "dpo/margin", "eval/accuracy", "eval/logp_accuracy"],
                                   f"dpo: {run.run_dir.name}"))
    _report(summary)
    return summary


# --------------------------------------------------------------------------- the reference


def _with_reference(run: Run, ref: WorkerGroup,
                    pref_batches: Iterable[PreferenceBatch]) -> Iterator[PreferenceBatch]:
    """Fill each batch's summed reference log-probs of its chosen and rejected responses.
    The request for the next batch is sent before this one is handed out, so the reference
    works while the learners train (the ``reference`` phase is the time spent waiting)."""
    pending = None
    for batch in pref_batches:
        refs = [ref.submit(0, "preference_logps", batch)]
        if pending is not None:
            yield _filled(run, ref, *pending)
        pending = (batch, refs)
    if pending is not None:
        yield _filled(run, ref, *pending)


def _filled(run: Run, ref: WorkerGroup, batch: PreferenceBatch, refs: list) -> PreferenceBatch:
    with run.phase("reference"):
        batch.ref_chosen_logps, batch.ref_rejected_logps = ref.get(refs, [0], "preference_logps")[0]
    return batch


# --------------------------------------------------------------------------- evaluation


def _policy_logps(learners, side: SequenceBatch):
    """(B,) summed policy log-probs of each response."""
    return (learner_calls.infer(learners, "forward_logprobs", side) * side.response_mask).sum(-1)


def _evaluate(run: Run, learners, batch: PreferenceBatch | None, cfg: DPOConfig, step: int) -> None:
    if batch is None:
        return
    with run.phase("eval"):
        chosen = _policy_logps(learners, batch.chosen)
        rejected = _policy_logps(learners, batch.rejected)
    out = dpo_loss(chosen, rejected, batch.ref_chosen_logps, batch.ref_rejected_logps, cfg.beta,
                   cfg.loss_type, cfg.label_smoothing)
    run.log({"eval/loss": float(out.loss), "eval/accuracy": float(out.accuracy),
             "eval/margin": float(out.margins.mean()),
             "eval/chosen_rewards": float(out.chosen_rewards.mean()),
             "eval/rejected_rewards": float(out.rejected_rewards.mean()),
             "eval/logp_accuracy": float((chosen > rejected).float().mean()),
             "eval/logp_margin": float((chosen - rejected).mean()),
             "eval/chosen_logps": float(chosen.mean())}, step)


def _report(summary: dict) -> None:
    m = summary["metrics"]
    parts = [f"{name} {m[key]['first']:.3f} -> {m[key]['final']:.3f}"
             for name, key in (("held-out accuracy", "eval/accuracy"),
                               ("margin", "eval/margin"),
                               ("policy prefers chosen", "eval/logp_accuracy"))
             if key in m]
    print(f"dpo: {'; '.join(parts) or 'no held-out pairs'}; model -> {summary['outputs']['model']}")
