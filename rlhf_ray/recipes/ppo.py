"""ppo: online RL with a streaming driver (PPO with GAE, or critic-free GRPO / RLOO / REINFORCE++).

    rlhf-ray ppo launch/configs/ppo_tiny.yaml advantage=grpo max_staleness=1

1. Load train and held-out prompts; start rollout workers (vLLM), reward and reference
   servers, and DeepSpeed learners (plus a value model for ``gae``).
2. Queue the prompts of the first ``max_staleness + 1`` steps.
3. For each step (policy version v):
   a. collect the step's episodes; each chunk was scored by the reward and reference servers
      as soon as it finished generating;
   b. never train on an episode older than v - max_staleness (the stream regenerates such
      prompt groups with the current weights: no prompt is dropped);
   c. advantages: KL-shaped rewards + GAE, or group baselines (GRPO / RLOO), or REINFORCE++;
   d. ``ppo_epochs`` passes of ``mini_batches`` clipped policy-gradient steps (only value steps
      during the first ``value_warmup_steps``, gae); meanwhile the rollout workers keep
      generating the ``max_staleness`` steps already queued, and the driver sends what they
      finish to scoring at once, so those steps are ready when training ends;
   e. sync the new weights to the rollout workers as version v + 1;
   f. queue the prompts of step v + max_staleness + 1 (with 0: strictly on-policy);
   g. log, evaluate on held-out prompts, checkpoint.
4. Export the final policy and write ``summary.json`` and a plot of reward and KL.

Checkpoints use the shared format (:mod:`rlhf_ray.checkpoint`); the driver's own state (the
KL coefficient and the per-step history) travels in the checkpoint's ``extra``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass

import ray
import torch

from rlhf_ray import checkpoint
from rlhf_ray.advantages import (
    AdaptiveKLController,
    FixedKLController,
    kept_group_rows,
    kl_estimate,
    overlong_keep_mask,
    overlong_penalty,
    zero_variance_groups,
)
from rlhf_ray.assets import resolve_model
from rlhf_ray.config import KLConfig, OptimConfig, PPOConfig
from rlhf_ray.data import load_tokenizer
from rlhf_ray.driver import batches, scaling
from rlhf_ray.driver import learners as learner_calls
from rlhf_ray.driver.episodes import check_groups, rollout_metrics, sample_rows
from rlhf_ray.driver.evaluation import heldout_score
from rlhf_ray.driver.prompts import load_prompts, prompts_for_step
from rlhf_ray.driver.run import Run
from rlhf_ray.driver.stream import EpisodeStream
from rlhf_ray.driver.supervisor import Supervisor
from rlhf_ray.experience import (
    critic_free_advantages,
    episodes_to_batch,
    gae_advantages,
    rollout_correction,
    turn_rewards,
)
from rlhf_ray.files import write_jsonl_atomic
from rlhf_ray.loss_terms import PPOLossSettings
from rlhf_ray.workers.group import WorkerGroup
from rlhf_ray.workers.weight_sync import WeightSync

# what may change between the two halves of a resumed run
RESUMABLE = (*checkpoint.RESUMABLE_KEYS, "steps", "eval_prompts", "rollout.num_workers")


@dataclass
class Workers:
    """The roles of one PPO run."""

    rollouts: WorkerGroup
    reward: WorkerGroup | None  # None: an environment scores the episodes
    reference: WorkerGroup
    learners: WorkerGroup
    sync: WeightSync


def run(cfg: PPOConfig) -> dict:
    policy_path = resolve_model(cfg.model.path, role="policy")
    tokenizer = load_tokenizer(policy_path)
    train_prompts, eval_prompts = _prompts(cfg, tokenizer)
    kl = KLPenalty(cfg.kl)
    data_id = batches.fingerprint([p.prompt_ids for p in train_prompts])

    with Run(cfg, "ppo", resumable=RESUMABLE,
             data_fingerprint=data_id) as run:
        # 1. the roles; resume=auto restores the learners, the KL coefficient and the history
        workers = _start(run, cfg, policy_path)
        version, history = _resume(run, workers, kl)
        # a dead rollout, reward or reference worker is replaced (rollouts get the weights first)
        supervisor = _supervise(cfg, run, workers)

        def evaluate() -> dict[str, float]:
            with run.phase("eval"):
                return supervisor.retrying(lambda: heldout_score(
                    workers.rollouts, workers.reward, eval_prompts, cfg.sampling.max_new_tokens,
                    cfg.sampling, cfg.eval_samples))

        run.log(evaluate(), version)
        # 2. queue the first max_staleness + 1 steps; `rlhf-ray scale` may resize the rollouts
        stream = EpisodeStream(workers.rollouts, workers.reward, workers.reference, cfg.sampling,
                               supervisor=supervisor)
        control = scaling.open_control(run.run_dir.name, cfg.rollout.num_workers)
        run.roles.on_shutdown(lambda: ray.kill(control))
        for ahead in range(version, min(cfg.steps, version + cfg.max_staleness + 1)):
            stream.submit(prompts_for_step(train_prompts, ahead, cfg.prompts_per_step), cfg.chunk_size,
                          step=ahead)

        # 3. one policy version per step
        for step in run.steps(version, cfg.steps):
            metrics, trained, samples = _step(cfg, step, version, stream, workers, kl,
                                              tokenizer.pad_token_id, train_prompts, supervisor)
            version += 1
            # f. queue step + k + 1: it is generated with version >= v + 1 and trained at
            #    v + k + 1, so its staleness is at most k
            if step + cfg.max_staleness + 1 < cfg.steps:
                stream.submit(prompts_for_step(train_prompts, step + cfg.max_staleness + 1,
                                               cfg.prompts_per_step), cfg.chunk_size,
                              step=step + cfg.max_staleness + 1)
            metrics.update(supervisor.retrying(lambda v=version: scaling.apply(
                control, workers.rollouts, stream, workers.sync, v)))
            supervisor.write_workers()
            # the episode ledger: every prompt and episode accounted for (rollout/ledger_*),
            # and what faults cost (faults/*)
            stream.ledger.check()
            metrics.update({**stream.ledger.as_metrics(), **supervisor.metrics()})
            # g. log, evaluate, checkpoint
            if run.eval_due(version, cfg.steps):
                metrics.update(evaluate())
            if samples:
                run.logger.log_samples(samples, version)
            run.log(metrics, version)
            history.append({"step": version, **metrics, **trained})
            run.show(metrics, "reward/mean", "kl/mean")
            if run.checkpoint_due(version, cfg.steps):
                run.save_checkpoint(workers.learners, version, {"kl_coef": kl.coef, "history": history})
        run.log(evaluate(), version)
        # every submitted prompt was collected and trained on; nothing left in the stream
        stream.ledger.check(final=True)

        # 4. outputs
        model_dir = workers.learners.call("export_hf", str(run.run_dir / "model"))[0]
        history_file = write_jsonl_atomic(run.run_dir / "history.jsonl", history)
        return run.finish({"model": model_dir, "history": str(history_file)},
                          {"advantage": cfg.advantage, "max_staleness": cfg.max_staleness,
                           "final_version": version, "episode_ledger": stream.ledger.as_dict(),
                           "faults": supervisor.summary()},
                          plot=(["reward/mean", "kl/mean", "eval/score", "eval/score_sampled",
                                 *(["env/tool_calls", "eval/tool_calls_mean"] if cfg.env.is_set else [])],
                                f"PPO ({cfg.advantage})" + (f", env {cfg.env.name}" if cfg.env.is_set else "")))


def _prompts(cfg: PPOConfig, tokenizer) -> tuple[list, list]:
    train = load_prompts(cfg.data, tokenizer, cfg.rollout.max_model_len, "train")
    heldout = load_prompts(cfg.data, tokenizer, cfg.rollout.max_model_len, "heldout")[: cfg.eval_prompts]
    if len(heldout) < cfg.eval_prompts:
        print(f"ppo: the held-out split has {len(heldout)} prompts; evaluating on all of them "
              f"(eval_prompts={cfg.eval_prompts})")
    return train, heldout


class KLPenalty:
    """The KL to the reference, in one place: where it enters the update (shaped into the
    rewards with ``kl.reward_estimator``, or added to the loss with ``kl.loss_estimator``)
    and its coefficient, fixed or adapted toward ``kl.target``. ``kl/mean`` is always the
    reward estimator's per-episode KL."""

    def __init__(self, kl: KLConfig):
        self.cfg = kl
        self.controller = AdaptiveKLController(kl.coef, kl.target, kl.horizon) if kl.adaptive \
            else FixedKLController(kl.coef)

    @property
    def coef(self) -> float:
        return self.controller.value

    @coef.setter
    def coef(self, value: float) -> None:
        self.controller.value = value

    @property
    def in_reward(self) -> float:
        return self.coef if self.cfg.mode == "reward" else 0.0

    @property
    def in_loss(self) -> float:
        return self.coef if self.cfg.mode == "loss" else 0.0

    def per_token(self, batch) -> torch.Tensor:
        """(B, T-1) reward-estimator KL of the sampled tokens, 0 outside the responses."""
        return kl_estimate(batch.old_logprobs, batch.ref_logprobs, self.cfg.reward_estimator) * \
            batch.response_mask

    def update(self, kl_mean: float, episodes: int) -> None:
        self.controller.update(kl_mean, episodes)


def _start(run: Run, cfg: PPOConfig, policy_path: str) -> Workers:
    """Rollout workers, reward and reference servers, learners (a value model too for gae)."""
    reference_path = resolve_model(cfg.reference.model or cfg.model.path, role="reference")
    optimizer_steps = cfg.steps * cfg.ppo_epochs * cfg.mini_batches
    with run.phase("start"), run.roles.together():  # the reward first: its error is the one raised
        # with an environment, it scores the episodes and no RewardServer is started
        reward = None if cfg.env.is_set else run.roles.reward(cfg.reward)
        rollouts = run.roles.rollouts(policy_path, cfg.rollout, cfg.model.dtype, cfg.seed, env=cfg.env)
        reference = run.roles.reference(reference_path, cfg.model.dtype, cfg.reference, cfg.learner.autocast)
        learners = run.roles.learners(
            policy_path, cfg.learner, cfg.optim, cfg.model.dtype, optimizer_steps=optimizer_steps,
            seed=cfg.seed, value_model=cfg.value_model,
            value_optim=OptimConfig(lr=cfg.value_lr) if cfg.advantage == "gae" else None,
            exclusive=cfg.max_staleness == 0)  # with staleness, generation runs during training
    sync = WeightSync(learners, rollouts, cfg.weight_sync.transport, cfg.weight_sync.bucket_mb,
                      dtype=cfg.rollout.dtype or cfg.model.dtype)
    return Workers(rollouts, reward, reference, learners, sync)


def _supervise(cfg: PPOConfig, run: Run, workers: Workers) -> Supervisor:
    """The run's supervisor: watches the replaceable roles; lists the learners' pids too."""
    supervisor = Supervisor(cfg.faults, run.run_dir)
    supervisor.watch(workers.rollouts, after_restart=lambda rank: workers.sync.push([rank]))
    supervisor.watch(workers.reward)
    supervisor.watch(workers.reference)
    supervisor.watch(workers.learners)
    return supervisor


def _resume(run: Run, workers: Workers, kl: KLPenalty) -> tuple[int, list[dict]]:
    """``resume=auto``: the restored policy version (its weights pushed to the rollout
    workers), KL coefficient and per-step history; ``(0, [])`` for a fresh run."""
    version = run.restore(workers.learners)
    if not run.resuming:
        return 0, []
    extra = run.resume_state.extra
    kl.coef = float(extra["kl_coef"])
    workers.sync.sync(version)
    print(f"ppo: resumed from {run.resume_from.name} (policy version {version})")
    return version, list(extra["history"])


def _step(cfg: PPOConfig, step: int, version: int, stream: EpisodeStream, workers: Workers,
          kl: KLPenalty, pad_id: int, train_prompts: list,
          supervisor: Supervisor) -> tuple[dict, dict, list | None]:
    """Steps a-e of one policy version; returns its metrics, which versions it trained on,
    and sample rows for the samples table when one is due."""
    t_step = time.perf_counter()
    # a. this step's scored episodes, all of its prompts; b. the staleness bound: the stream
    #    regenerates (whole) the prompt groups older than v - max_staleness, nothing is dropped
    dropped_before = stream.ledger.dropped_stale
    episodes = stream.collect(step, cfg.ray.call_timeout_s, min_version=version - cfg.max_staleness)
    episodes, sampling_metrics = _dynamic_sampling(cfg, step, version, episodes, stream, train_prompts)
    gen_s = time.perf_counter() - t_step
    check_groups(episodes, cfg.sampling.n)
    failed = [e.env_error for e in episodes if e.env_error is not None]
    if failed:  # env.on_error=count: trained on with env.failure_reward, counted in env/errors
        print(f"step {step}: {len(failed)} episode(s) failed in the environment, e.g. {failed[0]}",
              file=sys.stderr, flush=True)
    # c. advantages
    batch, adv_metrics = _experience(cfg, episodes, pad_id, workers.learners, kl, stream)
    # d. policy (and value) updates; meanwhile the stream scores what finishes generating
    t_train = time.perf_counter()
    train_metrics = _train(cfg, batch, workers.learners, kl.in_loss, stream,
                           train_policy=step >= cfg.value_warmup_steps)
    train_s = time.perf_counter() - t_train
    stream.ledger.record_trained(len(episodes))
    # e. new weights to the rollout workers
    sync_metrics = supervisor.retrying(lambda: workers.sync.sync(version + 1))
    # kl/mean: from pi_old's pass, or from the update when pi_old is its forward
    kl.update({**adv_metrics, **train_metrics}.get("kl/mean", 0.0), len(episodes))
    step_s = time.perf_counter() - t_step
    tokens = sum(len(e.response_ids) for e in episodes)
    metrics = {**rollout_metrics(episodes, version), **sampling_metrics, **adv_metrics, **train_metrics,
               **sync_metrics, "kl/coef": kl.coef,
               "rollout/dropped_stale": float(stream.ledger.dropped_stale - dropped_before),
               "perf/gen_s": gen_s, "perf/score_s": stream.pop_score_latency(),
               "perf/train_s": train_s, "perf/step_s": step_s, "perf/tokens_per_s": tokens / step_s}
    trained = {"trained_at_version": version,
               "versions_trained": sorted({e.policy_version for e in episodes}),
               "prompts_trained": sorted({e.prompt_index for e in episodes})}
    every = cfg.logging.samples_every
    samples = sample_rows(episodes, cfg.logging.samples_per_table) if every and step % every == 0 else None
    return metrics, trained, samples


def _dynamic_sampling(cfg: PPOConfig, step: int, version: int, episodes: list, stream: EpisodeStream,
                      train_prompts: list) -> tuple[list, dict[str, float]]:
    """DAPO's dynamic sampling. ``rollout/zero_variance_frac`` is the share of prompt groups
    whose samples all scored the same (no group signal). With ``dynamic_sampling`` those
    groups are left out (counted as filtered in the ledger) and refilled with fresh prompts,
    generated with the current weights, for at most ``dynamic_sampling_rounds`` extra rounds;
    the step trains on at most ``prompts_per_step`` groups."""
    n = cfg.sampling.n
    zero = zero_variance_groups(torch.tensor([e.score for e in episodes]), n)
    metrics = {"rollout/zero_variance_frac": float(zero.float().mean())}
    if not cfg.dynamic_sampling:
        return episodes, metrics
    kept = [episodes[i] for i in kept_group_rows(~zero, n).tolist()]
    filtered = len(episodes) - len(kept)
    rounds = 0
    while len(kept) < cfg.prompts_per_step * n and rounds < cfg.dynamic_sampling_rounds:
        tag = ("refill", step, rounds)
        missing = cfg.prompts_per_step - len(kept) // n
        stream.submit(_refill_prompts(cfg, train_prompts, step, rounds, missing), cfg.chunk_size, step=tag)
        extra = stream.collect(tag, cfg.ray.call_timeout_s, min_version=version - cfg.max_staleness)
        zero = zero_variance_groups(torch.tensor([e.score for e in extra]), n)
        good = [extra[i] for i in kept_group_rows(~zero, n).tolist()][: missing * n]
        filtered += len(extra) - len(good)
        kept += good
        rounds += 1
    stream.ledger.record_filtered(filtered)
    metrics.update({"rollout/filtered_groups": float(filtered // n), "rollout/refill_rounds": float(rounds),
                    "rollout/trained_groups": float(len(kept) // n)})
    if not kept:
        raise RuntimeError(f"step {step}: every prompt group scored the same in every sample, also "
                           f"after {rounds} refill rounds; nothing to learn from (dynamic_sampling)")
    return kept, metrics


def _refill_prompts(cfg: PPOConfig, train_prompts: list, step: int, round_: int, count: int) -> list:
    """Prompts for a refill: a deterministic walk beyond the training schedule, each with a
    group index of its own (so it never shares one with a prompt of the step)."""
    offset = cfg.steps + step * cfg.dynamic_sampling_rounds + round_
    picked = prompts_for_step(train_prompts, offset, cfg.prompts_per_step)[:count]
    unique = len(train_prompts) * (1 + offset)
    return [dataclasses.replace(p, index=unique + i) for i, p in enumerate(picked)]


def _experience(cfg: PPOConfig, episodes, pad_id: int, learners, kl: KLPenalty, stream: EpisodeStream):
    """Episodes -> ExperienceBatch with advantages (and returns / old values for gae).

    pi_old, the policy PPO's ratio starts from, is recomputed by the learners now, in their
    precision: vLLM's sampling log-probs stay as ``rollout_logprobs``, and the gap between the
    two is corrected (``rollout_correction``) and logged. With ``max_staleness > 0`` pi_old is
    the learners' policy at train time, newer than the one that sampled (decoupled PPO: the
    correction weights then also cover the staleness). When the update is one optimizer
    step on the current weights (:func:`pi_old_in_update`), pi_old is that step's own forward
    and the learners apply the correction. Overlong responses are penalised in
    the score (``soft_penalty``) or left out of the loss (``mask``)."""
    batch = episodes_to_batch(episodes, pad_id)
    scores = torch.tensor([e.score for e in episodes], dtype=torch.float32)
    metrics: dict[str, float] = {}
    if cfg.overlong == "soft_penalty":
        penalty = overlong_penalty(torch.tensor([len(e.response_ids) for e in episodes]),
                                   cfg.sampling.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty)
        scores = scores + penalty
        metrics["reward/overlong_penalty_mean"] = float(penalty.mean())
    elif cfg.overlong == "mask":  # truncated responses take no part in the loss
        keep = overlong_keep_mask([e.finish_reason for e in episodes]).to(batch.loss_mask.dtype)
        batch.loss_mask = batch.loss_mask * keep[:, None]
        metrics["rollout/overlong_masked_frac"] = float(1.0 - keep.mean())
    mask = batch.response_mask
    t_pi_old = time.perf_counter()
    if pi_old_in_update(cfg):
        # the update's own forward is pi_old: the learners weight the advantages by the
        # rollout correction and report kl/mean from it (no separate pass here)
        batch.old_logprobs = None
        weights, correction = mask, {}
    else:
        batch.old_logprobs = learner_calls.infer(learners, "forward_logprobs", batch, cfg.sampling.temperature,
                                                 while_waiting=stream.progress_while) * mask
        weights, correction = rollout_correction(batch.old_logprobs, batch.rollout_logprobs, mask,
                                                 cfg.rollout_correction, cfg.rollout_correction_cap)
        metrics["kl/mean"] = float(kl.per_token(batch).sum(-1).mean())
    metrics["perf/pi_old_s"] = time.perf_counter() - t_pi_old
    if cfg.advantage == "gae":
        values = learner_calls.call_each(learners, "forward_values", [(batch,)] * len(learners),
                                         while_waiting=stream.progress_while)[0]
        # multi-turn episodes: each turn's reward on its last policy token
        token_scores = turn_rewards(episodes, scores, tuple(mask.shape))
        batch.advantages, batch.returns, m = gae_advantages(batch, scores, values, kl.in_reward,
                                                           cfg.kl.reward_estimator, cfg.gamma, cfg.lam,
                                                           token_scores)
        batch.old_values = values
        metrics["value/mean_old"] = float((values * mask).sum() / mask.sum().clamp(min=1))
    else:  # the KL penalty is added after the group normalisation, never scaled by it
        batch.advantages, m = critic_free_advantages(batch, scores, cfg.advantage, cfg.sampling.n,
                                                     kl.in_reward, cfg.kl.reward_estimator, cfg.gamma,
                                                     cfg.grpo.normalize_std)
    batch.advantages = batch.advantages * weights
    m.pop("kl/mean", None)
    m.pop("kl/coef", None)
    return batch, {**metrics, **m, **correction}


def pi_old_in_update(cfg: PPOConfig) -> bool:
    """Whether pi_old can be the update's own forward instead of a separate pass before it.
    It can when that forward runs on exactly pi_old's weights and nothing before the update
    needs pi_old: one optimizer step per batch (``ppo_epochs = mini_batches = 1``),
    critic-free advantages and the KL in the loss (so no advantage or reward is shaped by
    it), unless ``pi_old=recompute``. The result is the same; the pass costs about a third
    of a training step. Staleness does not matter: pi_old is the learners' policy at train
    time either way (the separate pass runs right before the update, on the same weights),
    and the rollout correction, which covers the sampler's older weights, is computed from
    it in both places."""
    return (cfg.pi_old == "auto" and cfg.ppo_epochs == 1 and cfg.mini_batches == 1
            and cfg.advantage != "gae" and cfg.kl.mode == "loss")


def _train(cfg: PPOConfig, batch, learners, kl_coef_in_loss: float, stream: EpisodeStream,
           train_policy: bool = True) -> dict:
    """ppo_epochs x mini_batches optimizer steps; each mini-batch sharded over the learner
    ranks. ``train_policy=False``: value warm-up, only the value model steps."""
    settings = PPOLossSettings(
        clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high, dual_clip=cfg.dual_clip,
        kl_coef=kl_coef_in_loss, kl_estimator=cfg.kl.loss_estimator, value_clip_eps=cfg.value_clip_eps,
        temperature=cfg.sampling.temperature, aggregation=cfg.loss_aggregation,
        norm_len=float(cfg.sampling.max_new_tokens), policy_loss=cfg.policy_loss,
        entropy_coef=cfg.entropy_coef,
        # applied by the learners only when pi_old is the update's own forward
        rollout_correction=cfg.rollout_correction, rollout_correction_cap=cfg.rollout_correction_cap,
        kl_metric_estimator=cfg.kl.reward_estimator)
    size = -(-len(batch) // cfg.mini_batches)
    totals: dict[str, float] = {}
    optimizer_steps = 0
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(len(batch))
        for start in range(0, len(batch), size):
            mini = batch.select(order[start: start + size])
            # the global normalisers: response tokens, and sequences that have any
            tokens = max(int(mini.response_mask.sum()), 1)
            sequences = max(int((mini.response_mask.sum(-1) > 0).sum()), 1)
            results = learner_calls.call_each(learners, "ppo_step", [
                (shard, settings, tokens, sequences, train_policy) for shard in mini.shards(len(learners))],
                while_waiting=stream.progress_while)
            for k, v in results[0].items():
                totals[k] = totals.get(k, 0.0) + float(v)
            optimizer_steps += 1
    return {**{k: v / optimizer_steps for k, v in totals.items()}, "policy/trained": float(train_policy)}
