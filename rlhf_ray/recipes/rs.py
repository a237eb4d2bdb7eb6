"""rs: rejection sampling (best-of-n) fine-tuning, as LLaMA-2-Chat ran it before PPO.

    rlhf-ray rs launch/configs/rs_tiny.yaml rounds=3

For each round r (policy version r):
1. sample ``sampling.n`` responses to each of the round's prompts;
2. score every response with the RewardServer;
3. keep the best response per prompt (if it reaches ``threshold``); write the kept set and
   best-versus-worst preference pairs as JSONL;
4. fine-tune the policy on the kept set (response-only loss);
5. sync the new weights to the rollout workers as version r + 1;
6. log and evaluate on held-out prompts; checkpoint (``resume=auto`` continues at the next
   round, with the learners' weights, optimizer and the rounds' outputs).
The mean reward of single samples (``reward/mean``) should rise from round to round.
"""

from __future__ import annotations

from rlhf_ray import checkpoint
from rlhf_ray.assets import resolve_model
from rlhf_ray.batch import Episode, SequenceBatch
from rlhf_ray.config import RSConfig
from rlhf_ray.data import load_tokenizer
from rlhf_ray.driver import batches
from rlhf_ray.driver import learners as learner_calls
from rlhf_ray.driver.episodes import (
    best_of_n,
    instruction_row,
    preference_row,
    rollout_metrics,
)
from rlhf_ray.driver.evaluation import generate_all, heldout_score, score_all
from rlhf_ray.driver.prompts import load_prompts, prompts_for_step
from rlhf_ray.driver.run import Run
from rlhf_ray.files import write_jsonl_atomic
from rlhf_ray.workers.weight_sync import WeightSync

# what may change between the two halves of a resumed run
RESUMABLE = (*checkpoint.RESUMABLE_KEYS, "rounds", "eval_prompts", "rollout.num_workers")


def run(cfg: RSConfig) -> dict:
    policy_path = resolve_model(cfg.model.path, role="policy")
    tokenizer = load_tokenizer(policy_path)
    train = load_prompts(cfg.data, tokenizer, cfg.rollout.max_model_len, "train")
    heldout = load_prompts(cfg.data, tokenizer, cfg.rollout.max_model_len, "heldout")[: cfg.eval_prompts]
    optimizer_steps_per_round = -(-cfg.prompts_per_round // cfg.batch_size) * cfg.epochs
    data_id = batches.fingerprint([p.prompt_ids for p in train])

    with Run(cfg, "rs", resumable=RESUMABLE,
             data_fingerprint=data_id) as run:
        with run.phase("start"):
            with run.roles.together():
                rollouts = run.roles.rollouts(policy_path, cfg.rollout, cfg.model.dtype, cfg.seed)
                reward = run.roles.reward(cfg.reward)
                learners = run.roles.learners(policy_path, cfg.learner, cfg.optim, cfg.model.dtype,
                                              optimizer_steps=cfg.rounds * optimizer_steps_per_round,
                                              seed=cfg.seed)
            sync = WeightSync(learners, rollouts, dtype=cfg.rollout.dtype or cfg.model.dtype)
        start = run.restore(learners)
        outputs: dict[str, str] = dict(run.resume_state.extra["outputs"]) if run.resuming else {}

        def evaluate() -> dict[str, float]:
            return heldout_score(rollouts, reward, heldout, cfg.sampling.max_new_tokens,
                                 cfg.sampling, cfg.eval_samples)

        if start:
            sync.sync(start)  # the rollout workers continue from the restored weights
        else:
            run.log(evaluate(), 0)
        for r in run.steps(start, cfg.rounds, unit="round"):
            prompts = prompts_for_step(train, r, cfg.prompts_per_round)
            # 1-2. n samples per prompt, scored
            with run.phase("generate"):
                episodes = generate_all(rollouts, prompts, cfg.sampling)
                score_all(reward, episodes)
            # 3. best of n
            kept, pairs = best_of_n(episodes, cfg.sampling.n, cfg.threshold)
            by_index = {p.index: p for p in prompts}
            outputs[f"kept_round{r}"] = str(write_jsonl_atomic(
                run.run_dir / f"round{r}_kept.jsonl",
                [instruction_row(e, by_index[e.prompt_index]) for e in kept]))
            outputs[f"pairs_round{r}"] = str(write_jsonl_atomic(
                run.run_dir / f"round{r}_pairs.jsonl",
                [preference_row(b, w, by_index[b.prompt_index]) for b, w in pairs]))
            # 4. SFT on the kept set
            with run.phase("train"):
                train_m = _finetune(cfg, learners, kept, tokenizer.pad_token_id) if kept else {}
            # 5. new weights
            sync_m = sync.sync(r + 1)
            # 6. log, evaluate, checkpoint
            run.log({**rollout_metrics(episodes, r), **train_m, **sync_m,
                     "rs/kept": float(len(kept)), "rs/kept_frac": len(kept) / len(prompts),
                     "rs/best_mean": sum(e.score for e in kept) / max(len(kept), 1), **evaluate()}, r + 1)
            if run.checkpoint_due(r + 1, cfg.rounds):
                run.save_checkpoint(learners, r + 1, {"outputs": outputs})
        outputs["model"] = learner_calls.export(learners, cfg.run_dir)
        return run.finish(outputs, {"rounds": cfg.rounds, "start_round": start},
                          plot=(["reward/mean", "rs/kept_frac", "eval/score_sampled", "eval/score"],
                                "Rejection sampling"), xlabel="round")


def _finetune(cfg: RSConfig, learners, kept: list[Episode], pad_id: int) -> dict:
    """``epochs`` passes of SFT over the kept (prompt, best response) pairs."""
    totals: dict[str, float] = {}
    steps = 0
    for _ in range(cfg.epochs):
        for start in range(0, len(kept), cfg.batch_size):
            chunk = kept[start: start + cfg.batch_size]
            if len(chunk) < len(learners):  # every learner rank needs at least one row
                continue
            batch = SequenceBatch.from_pairs([(e.prompt_ids, e.response_ids) for e in chunk], pad_id)
            metrics = learner_calls.call_sharded(learners, "sft_step", batch, int(batch.loss_mask.sum()))[0]
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            steps += 1
    return {k: v / steps for k, v in totals.items()} if steps else {}
