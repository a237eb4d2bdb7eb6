"""ppo: online RL with a streaming driver (PPO with GAE, or critic-free GRPO / RLOO / REINFORCE++).

    rlhf-ray ppo launch/configs/ppo_tiny.yaml advantage=grpo max_staleness=1

1. Load train and held-out prompts; start rollout workers (vLLM), reward and reference
   servers, and DeepSpeed learners (plus a value model for ``gae``).
2. Queue the prompts of the first ``max_staleness + 1`` steps.
3. For each step (policy version v):
   a. collect the step's episodes; each chunk was scored by the reward and reference servers
      as soon as it finished generating;
   b. never train on an episode older than v - max_staleness (such episodes are dropped);
   c. advantages: KL-shaped rewards + GAE, or group baselines (GRPO / RLOO), or REINFORCE++;
   d. ``ppo_epochs`` passes of ``mini_batches`` clipped policy-gradient steps (only value steps
      during the first ``value_warmup_steps``, gae); meanwhile the
      rollout workers keep generating the ``max_staleness`` steps already queued;
   e. sync the new weights to the rollout workers as version v + 1;
   f. queue the prompts of step v + max_staleness + 1 (with 0: strictly on-policy);
   g. log, evaluate on held-out prompts, checkpoint.
4. Export the final policy and write ``summary.json`` and a plot of reward and KL.

Checkpoints use the shared format (:mod:`rlhf_ray.checkpoint`); the driver's own state (the
KL coefficient and the per-step history) travels in the checkpoint's ``extra``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray
import torch

from rlhf_ray import checkpoint
from rlhf_ray.advantages import AdaptiveKLController, FixedKLController, kl_estimate
from rlhf_ray.assets import resolve_model
from rlhf_ray.config import KLConfig, OptimConfig, PPOConfig
from rlhf_ray.data import load_tokenizer
from rlhf_ray.driver import batches, scaling
from rlhf_ray.driver import learners as learner_calls
from rlhf_ray.driver.episodes import check_groups, rollout_metrics
from rlhf_ray.driver.evaluation import heldout_score
from rlhf_ray.driver.prompts import load_prompts, prompts_for_step
from rlhf_ray.driver.run import Run
from rlhf_ray.driver.stream import EpisodeStream
from rlhf_ray.experience import (
    critic_free_advantages,
    episodes_to_batch,
    gae_advantages,
    rollout_correction,
)
from rlhf_ray.files import write_jsonl_atomic
from rlhf_ray.workers.group import WorkerGroup
from rlhf_ray.workers.weight_sync import WeightSync

# what may change between the two halves of a resumed run
RESUMABLE = (*checkpoint.RESUMABLE_KEYS, "steps", "eval_prompts", "rollout.num_workers")


@dataclass
class Workers:
    """The roles of one PPO run."""

    rollouts: WorkerGroup
    reward: WorkerGroup
    reference: WorkerGroup
    learners: WorkerGroup
    sync: WeightSync


def run(cfg: PPOConfig) -> dict:
    policy_path = resolve_model(cfg.model.path, role="policy")
    tokenizer = load_tokenizer(policy_path)
    train_prompts, eval_prompts = _prompts(cfg, tokenizer)
    kl_ctl = _kl_controller(cfg.kl)
    data_id = batches.fingerprint([p.prompt_ids for p in train_prompts])

    with Run(cfg, "ppo", resumable=RESUMABLE, kv_cache_gib=cfg.rollout.kv_cache_gib,
             data_fingerprint=data_id) as run:
        # 1. the roles; resume=auto restores the learners, the KL coefficient and the history
        workers = _start(run, cfg, policy_path)
        version, history = _resume(run, workers, kl_ctl)

        def evaluate() -> dict[str, float]:
            with run.phase("eval"):
                return heldout_score(workers.rollouts, workers.reward, eval_prompts,
                                     cfg.sampling.max_new_tokens, cfg.sampling, cfg.eval_samples)

        run.log(evaluate(), version)
        # 2. queue the first max_staleness + 1 steps; `rlhf-ray scale` may resize the rollouts
        stream = EpisodeStream(workers.rollouts, workers.reward, workers.reference, cfg.sampling)
        control = scaling.open_control(run.run_dir.name, cfg.rollout.num_workers)
        run.roles.on_shutdown(lambda: ray.kill(control))
        for ahead in range(version, min(cfg.steps, version + cfg.max_staleness + 1)):
            stream.submit(prompts_for_step(train_prompts, ahead, cfg.prompts_per_step), cfg.chunk_size)

        # 3. one policy version per step
        for step in run.steps(version, cfg.steps):
            metrics, trained = _step(cfg, step, version, stream, workers, kl_ctl, tokenizer.pad_token_id)
            version += 1
            # f. queue step + k + 1: it is generated with version >= v + 1 and trained at
            #    v + k + 1, so its staleness is at most k
            if step + cfg.max_staleness + 1 < cfg.steps:
                stream.submit(prompts_for_step(train_prompts, step + cfg.max_staleness + 1,
                                               cfg.prompts_per_step), cfg.chunk_size)
            metrics.update(scaling.apply(control, workers.rollouts, stream, workers.sync, version))
            # g. log, evaluate, checkpoint
            if cfg.eval_every and version % cfg.eval_every == 0 and version < cfg.steps:
                metrics.update(evaluate())
            run.log(metrics, version)
            history.append({"step": version, **metrics, **trained})
            run.show(metrics, "reward/mean", "kl/mean")
            if run.checkpoint_due(version, cfg.steps):
                run.save_checkpoint(workers.learners, version, {"kl_coef": kl_ctl.value, "history": history})
        run.log(evaluate(), version)

        # 4. outputs
        model_dir = workers.learners.call("export_hf", str(run.run_dir / "model"))[0]
        history_file = write_jsonl_atomic(run.run_dir / "history.jsonl", history)
        return run.finish({"model": model_dir, "history": str(history_file)},
                          {"advantage": cfg.advantage, "max_staleness": cfg.max_staleness,
                           "final_version": version},
                          plot=(["reward/mean", "kl/mean", "eval/score", "eval/score_sampled"],
                                f"PPO ({cfg.advantage})"))


def _prompts(cfg: PPOConfig, tokenizer) -> tuple[list, list]:
    train = load_prompts(cfg.data, tokenizer, cfg.rollout.max_model_len, "train")
    heldout = load_prompts(cfg.data, tokenizer, cfg.rollout.max_model_len, "heldout")[: cfg.eval_prompts]
    if len(heldout) < cfg.eval_prompts:
        print(f"ppo: the held-out split has {len(heldout)} prompts; evaluating on all of them "
              f"(eval_prompts={cfg.eval_prompts})")
    return train, heldout


def _kl_controller(kl: KLConfig):
    if kl.adaptive:
        return AdaptiveKLController(kl.coef, kl.target, kl.horizon)
    return FixedKLController(kl.coef)


def _start(run: Run, cfg: PPOConfig, policy_path: str) -> Workers:
    """Rollout workers, reward and reference servers, learners (a value model too for gae)."""
    reference_path = resolve_model(cfg.reference or cfg.model.path, role="reference")
    optimizer_steps = cfg.steps * cfg.ppo_epochs * cfg.mini_batches
    with run.phase("start"):
        rollouts = run.roles.rollouts(policy_path, cfg.rollout, cfg.model.dtype, cfg.seed)
        reward = run.roles.reward(cfg.reward)
        reference = run.roles.reference(reference_path, cfg.model.dtype)
        learners = run.roles.learners(
            policy_path, cfg.learner, cfg.optim, cfg.model.dtype, optimizer_steps=optimizer_steps,
            seed=cfg.seed, value_model=cfg.value_model,
            value_optim=OptimConfig(lr=cfg.value_lr) if cfg.advantage == "gae" else None)
    return Workers(rollouts, reward, reference, learners, WeightSync(learners, rollouts))


def _resume(run: Run, workers: Workers, kl_ctl) -> tuple[int, list[dict]]:
    """``resume=auto``: the restored policy version (its weights pushed to the rollout
    workers), KL coefficient and per-step history; ``(0, [])`` for a fresh run."""
    version = run.restore(workers.learners)
    if not run.resuming:
        return 0, []
    extra = run.resume_state.extra
    kl_ctl.value = float(extra["kl_coef"])
    workers.sync.sync(version)
    print(f"ppo: resumed from {run.resume_from.name} (policy version {version})")
    return version, list(extra["history"])


def _step(cfg: PPOConfig, step: int, version: int, stream: EpisodeStream, workers: Workers,
          kl_ctl, pad_id: int) -> tuple[dict, dict]:
    """Steps a-e of one policy version; returns its metrics and which versions it trained on."""
    t_step = time.perf_counter()
    # a. this step's scored episodes
    episodes = stream.collect(cfg.prompts_per_step, cfg.ray.call_timeout_s)
    gen_s = time.perf_counter() - t_step
    # b. the staleness bound
    fresh = [e for e in episodes if e.policy_version >= version - cfg.max_staleness]
    if not fresh:
        raise RuntimeError(f"step {step}: every episode is staler than max_staleness={cfg.max_staleness}")
    check_groups(fresh, cfg.sampling.n)
    # c. advantages
    batch, adv_metrics = _experience(cfg, fresh, pad_id, workers.learners, kl_ctl)
    # d. policy (and value) updates
    t_train = time.perf_counter()
    kl_coef_in_loss = kl_ctl.value if cfg.kl.mode == "loss" else 0.0
    train_metrics = _train(cfg, batch, workers.learners, kl_coef_in_loss,
                           train_policy=step >= cfg.value_warmup_steps)
    train_s = time.perf_counter() - t_train
    # e. new weights to the rollout workers
    sync_metrics = workers.sync.sync(version + 1)
    kl_ctl.update(adv_metrics.get("kl/mean", 0.0), len(fresh))
    step_s = time.perf_counter() - t_step
    tokens = sum(len(e.response_ids) for e in episodes)
    metrics = {**rollout_metrics(fresh, version), **adv_metrics, **train_metrics, **sync_metrics,
               "rollout/dropped_stale": float(len(episodes) - len(fresh)), "kl/coef": kl_ctl.value,
               "perf/gen_s": gen_s, "perf/score_s": stream.pop_score_latency(),
               "perf/train_s": train_s, "perf/step_s": step_s, "perf/tokens_per_s": tokens / step_s}
    trained = {"trained_at_version": version,
               "versions_trained": sorted({e.policy_version for e in fresh})}
    return metrics, trained


def _experience(cfg: PPOConfig, episodes, pad_id: int, learners, kl_ctl):
    """Episodes -> ExperienceBatch with advantages (and returns / old values for gae).

    pi_old, the policy PPO's ratio starts from, is recomputed by the learners now, in their
    precision: vLLM's sampling log-probs stay as ``rollout_logprobs``, and the gap between the
    two is corrected (``rollout_correction``) and logged. With ``max_staleness > 0`` pi_old is
    the learners' policy at train time, newer than the one that sampled (decoupled PPO: the
    correction weights then also cover the staleness)."""
    batch = episodes_to_batch(episodes, pad_id)
    scores = torch.tensor([e.score for e in episodes], dtype=torch.float32)
    mask = batch.response_mask
    batch.old_logprobs = learner_calls.infer(learners, "forward_logprobs", batch,
                                             cfg.sampling.temperature) * mask
    weights, correction = rollout_correction(batch.old_logprobs, batch.rollout_logprobs, mask,
                                             cfg.rollout_correction, cfg.rollout_correction_cap)
    kl = kl_estimate(batch.old_logprobs, batch.ref_logprobs, cfg.kl.reward_estimator) * mask
    metrics = {"kl/mean": float(kl.sum(-1).mean())}
    kl_coef_in_reward = kl_ctl.value if cfg.kl.mode == "reward" else 0.0
    if cfg.advantage == "gae":
        values = learners.call("forward_values", batch)[0]
        batch.advantages, batch.returns, m = gae_advantages(batch, scores, values, kl_coef_in_reward,
                                                           cfg.kl.reward_estimator, cfg.gamma, cfg.lam)
        batch.old_values = values
        metrics.update({"value/mean_old": float((values * mask).sum() / mask.sum())})
    else:  # the KL penalty is added after the group normalisation, never scaled by it
        batch.advantages, m = critic_free_advantages(batch, scores, cfg.advantage, cfg.sampling.n,
                                                     kl_coef_in_reward, cfg.kl.reward_estimator, cfg.gamma)
    batch.advantages = batch.advantages * weights
    m.pop("kl/mean", None)
    m.pop("kl/coef", None)
    return batch, {**metrics, **m, **correction}


def _train(cfg: PPOConfig, batch, learners, kl_coef_in_loss: float, train_policy: bool = True) -> dict:
    """ppo_epochs x mini_batches optimizer steps; each mini-batch sharded over the learner
    ranks. ``train_policy=False``: value warm-up, only the value model steps."""
    size = -(-len(batch) // cfg.mini_batches)
    totals: dict[str, float] = {}
    optimizer_steps = 0
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(len(batch))
        for start in range(0, len(batch), size):
            mini = batch.select(order[start: start + size])
            tokens = int(mini.response_mask.sum())
            results = learners.call_each("ppo_step", [
                (shard, cfg.clip_eps, cfg.clip_eps_high, cfg.dual_clip, kl_coef_in_loss, cfg.kl.loss_estimator,
                 cfg.value_clip_eps, "token_mean", tokens, len(mini), train_policy,
                 cfg.sampling.temperature)
                for shard in mini.shards(len(learners))])
            for k, v in results[0].items():
                totals[k] = totals.get(k, 0.0) + float(v)
            optimizer_steps += 1
    return {**{k: v / optimizer_steps for k, v in totals.items()}, "policy/trained": float(train_policy)}
