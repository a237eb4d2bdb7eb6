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
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import ray
import torch
from tqdm import tqdm

from rlhf_ray import checkpoint, scaling
from rlhf_ray.advantages import AdaptiveKLController, FixedKLController, kl_estimate
from rlhf_ray.assets import resolve_model
from rlhf_ray.config import save_config, to_dict
from rlhf_ray.configs import OptimConfig
from rlhf_ray.configs_online import PPOConfig
from rlhf_ray.data import load_tokenizer
from rlhf_ray.experience import critic_free_advantages, episodes_to_batch, gae_advantages
from rlhf_ray.metrics import RunLogger
from rlhf_ray.plots import plot_metrics
from rlhf_ray.recipes import online
from rlhf_ray.runtime import ray_session, worker_env
from rlhf_ray.stream import EpisodeStream
from rlhf_ray.weight_sync import WeightSync


def run(cfg: PPOConfig) -> dict:
    run_dir = Path(cfg.run_dir)
    resuming = _check_run_dir(cfg, run_dir)
    save_config(cfg, run_dir)
    log = RunLogger(run_dir, cfg.logging, to_dict(cfg), "ppo", resuming)
    policy_path = resolve_model(cfg.model.path, role="policy")
    reference_path = resolve_model(cfg.reference or cfg.model.path, role="reference")
    tokenizer = load_tokenizer(policy_path)
    train_prompts = online.load_prompts(cfg.data, tokenizer, cfg.rollout.max_model_len, "train")
    eval_prompts = online.load_prompts(cfg.data, tokenizer, cfg.rollout.max_model_len, "heldout")[: cfg.eval_prompts]
    if len(eval_prompts) < cfg.eval_prompts:
        print(f"ppo: the held-out split has {len(eval_prompts)} prompts; evaluating on all of them "
              f"(eval_prompts={cfg.eval_prompts})")
    kl_ctl = (AdaptiveKLController(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon) if cfg.kl.adaptive
              else FixedKLController(cfg.kl.coef))
    history: list[dict] = []

    with ray_session(cfg.ray, worker_env(cfg.rollout.kv_cache_gib)):
        groups = []
        try:
            # 1. the roles
            with log.phase("start"):
                rollouts = online.start_rollouts(policy_path, cfg.rollout, cfg.model.dtype, cfg.seed, cfg.ray)
                groups.append(rollouts)
                reward = online.start_reward(cfg.reward, cfg.ray)
                groups.append(reward)
                reference = online.start_reference(reference_path, cfg.model.dtype, cfg.ray)
                groups.append(reference)
                gae = cfg.advantage == "gae"
                learners = online.start_learners(
                    policy_path, cfg.learner, cfg.optim, cfg.model.dtype,
                    cfg.steps * cfg.ppo_epochs * cfg.mini_batches, cfg.seed, cfg.ray, with_value=gae,
                    value_model=cfg.value_model, value_optim=OptimConfig(lr=cfg.value_lr))
                groups.append(learners)
                sync = WeightSync(learners, rollouts)
            version = _resume(run_dir, learners, sync, kl_ctl, log, history) if resuming else 0

            def evaluate() -> dict[str, float]:
                return online.heldout_score(rollouts, reward, eval_prompts, cfg.sampling.max_new_tokens,
                                            cfg.sampling, cfg.eval_samples)

            with log.phase("eval"):
                log.log(evaluate(), version)

            # 2. queue the first steps; `rlhf-ray scale` may resize the rollout group later
            stream = EpisodeStream(rollouts, reward, reference, cfg.sampling)
            control = scaling.open_control(run_dir.name, cfg.rollout.num_workers)
            for ahead in range(version, min(cfg.steps, version + cfg.max_staleness + 1)):
                stream.submit(online.prompts_for_step(train_prompts, ahead, cfg.prompts_per_step), cfg.chunk_size)

            bar = tqdm(range(version, cfg.steps), desc="ppo", unit="step", disable=not cfg.logging.progress_bar)
            for step in bar:
                t_step = time.perf_counter()
                # a. this step's scored episodes
                t0 = time.perf_counter()
                episodes = stream.collect(cfg.prompts_per_step, cfg.ray.call_timeout_s)
                gen_s = time.perf_counter() - t0
                # b. the staleness bound
                fresh = [e for e in episodes if e.policy_version >= version - cfg.max_staleness]
                dropped = len(episodes) - len(fresh)
                if not fresh:
                    raise RuntimeError(f"step {step}: every episode is staler than max_staleness={cfg.max_staleness}")
                online.check_groups(fresh, cfg.sampling.n)
                rollout_m = online.rollout_metrics(fresh, version)
                trained = {"trained_at_version": version,
                           "versions_trained": sorted({e.policy_version for e in fresh})}
                # c. advantages
                batch, adv_metrics = _experience(cfg, fresh, tokenizer.pad_token_id, learners, kl_ctl)
                # d. policy (and value) updates
                t0 = time.perf_counter()
                train_policy = step >= cfg.value_warmup_steps
                train_metrics = _train(cfg, batch, learners, kl_ctl.value if cfg.kl.mode == "loss" else 0.0,
                                       train_policy)
                train_s = time.perf_counter() - t0
                # e. new weights to the rollout workers
                sync_metrics = sync.sync(version + 1)
                version += 1
                # f. queue step + k + 1: it is generated with version >= v + 1 and trained at
                #    v + k + 1, so its staleness is at most k
                if step + cfg.max_staleness + 1 < cfg.steps:
                    stream.submit(online.prompts_for_step(train_prompts, step + cfg.max_staleness + 1,
                                                          cfg.prompts_per_step), cfg.chunk_size)
                scale_m = scaling.apply(control, rollouts, stream, sync, version)
                # g. log, evaluate, checkpoint
                kl_ctl.update(adv_metrics.get("kl/mean", 0.0), len(fresh))
                step_s = time.perf_counter() - t_step
                tokens = sum(len(e.response_ids) for e in episodes)
                metrics = {**rollout_m, **adv_metrics, **train_metrics, **scale_m,
                           **sync_metrics, "rollout/dropped_stale": float(dropped), "kl/coef": kl_ctl.value,
                           "perf/gen_s": gen_s, "perf/score_s": stream.pop_score_latency(),
                           "perf/train_s": train_s, "perf/step_s": step_s, "perf/tokens_per_s": tokens / step_s}
                if cfg.eval_every and version % cfg.eval_every == 0 and version < cfg.steps:
                    metrics.update(evaluate())
                log.log(metrics, version)
                history.append({"step": version, **metrics, **trained})
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics.get('kl/mean', 0):.3f}")
                if cfg.checkpoint.save_every and version % cfg.checkpoint.save_every == 0:
                    _save(cfg, run_dir, learners, version, kl_ctl, log, history)
            with log.phase("eval"):
                log.log(evaluate(), version)
            # 4. outputs
            _save(cfg, run_dir, learners, version, kl_ctl, log, history)
            model_dir = learners.call("export_hf", str(run_dir / "model"))[0]
        finally:
            if "control" in locals():
                ray.kill(control)
            for group in reversed(groups):
                group.shutdown()
    plot = plot_metrics(log.history, ["reward/mean", "kl/mean", "eval/score", "eval/score_sampled"],
                        run_dir / "ppo.png", f"PPO ({cfg.advantage})")
    (run_dir / "history.jsonl").write_text("".join(_json(h) + "\n" for h in history))
    return log.finish({"model": model_dir, "plot": str(plot), "history": str(run_dir / "history.jsonl")},
                      {"advantage": cfg.advantage, "max_staleness": cfg.max_staleness, "final_version": version})


def _experience(cfg: PPOConfig, episodes, pad_id: int, learners, kl_ctl):
    """Episodes -> ExperienceBatch with advantages (and returns / old values for gae)."""
    batch = episodes_to_batch(episodes, pad_id)
    scores = torch.tensor([e.score for e in episodes], dtype=torch.float32)
    mask = batch.response_mask
    kl = kl_estimate(batch.old_logprobs, batch.ref_logprobs, cfg.kl.estimator) * mask
    metrics = {"kl/mean": float(kl.sum(-1).mean())}
    in_reward = kl_ctl.value if cfg.kl.mode == "reward" else 0.0
    if cfg.advantage == "gae":
        values = learners.call("forward_values", batch)[0]
        batch.advantages, batch.returns, m = gae_advantages(batch, scores, values, in_reward,
                                                           cfg.kl.estimator, cfg.gamma, cfg.lam)
        batch.old_values = values
        metrics.update({"value/mean_old": float((values * mask).sum() / mask.sum())})
    else:
        if cfg.advantage in ("grpo", "rloo") and in_reward:
            scores = scores - in_reward * kl.sum(-1)  # sequence-level KL penalty in the reward
        batch.advantages, m = critic_free_advantages(batch, scores, cfg.advantage, cfg.sampling.n,
                                                     in_reward, cfg.kl.estimator, cfg.gamma)
    m.pop("kl/mean", None)
    m.pop("kl/coef", None)
    return batch, {**metrics, **m}


def _train(cfg: PPOConfig, batch, learners, kl_coef_loss: float, train_policy: bool = True) -> dict:
    """ppo_epochs x mini_batches steps; each mini-batch split over the D learner ranks.
    ``train_policy=False``: value warm-up, only the value model steps."""
    n, d = len(batch), len(learners)
    size = -(-n // cfg.mini_batches)
    totals: dict[str, float] = {}
    steps = 0
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(n)
        for start in range(0, n, size):
            mini = batch.select(order[start: start + size])
            tokens = int(mini.response_mask.sum())
            shards = [mini.select(torch.arange(r, len(mini), d)) for r in range(d)]
            results = learners.call_each("ppo_step", [
                (s, cfg.clip_eps, cfg.clip_eps_high, cfg.dual_clip, kl_coef_loss, cfg.kl.estimator,
                 cfg.value_clip_eps, "token_mean", tokens, len(mini), train_policy) for s in shards])
            for k, v in results[0].items():
                totals[k] = totals.get(k, 0.0) + float(v)
            steps += 1
    return {**{k: v / steps for k, v in totals.items()}, "policy/trained": float(train_policy)}


def _save(cfg: PPOConfig, run_dir: Path, learners, version: int, kl_ctl, log: RunLogger,
          history: list[dict]) -> None:
    """Learner states plus the driver's: version, KL coefficient, and what was logged so far."""
    state = {"version": version, "kl_coef": kl_ctl.value, "log": log.state(), "history": list(history)}
    learners.call("save_checkpoint", str(run_dir / "checkpoints"), f"step{version}", state)
    (run_dir / "checkpoints" / "latest").write_text(f"step{version}")
    # keep the newest checkpoint.keep_last tags of every engine (policy/, value/) and of rng/
    for engine_dir in (run_dir / "checkpoints").iterdir():
        if engine_dir.is_dir():
            tags = sorted((p for p in engine_dir.glob("step*") if p.is_dir()),
                          key=lambda p: int(p.name.removeprefix("step")))
            for old in tags[: max(len(tags) - cfg.checkpoint.keep_last, 0)]:
                shutil.rmtree(old)


# what may change between the two halves of a resumed run
RESUMABLE = (*checkpoint.RESUMABLE_KEYS, "steps", "eval_prompts", "rollout.num_workers")


def _check_run_dir(cfg: PPOConfig, run_dir: Path) -> bool:
    """Before anything is written: refuse to start over a run's checkpoints, or to resume one
    with settings that would make its two halves different runs. True: this run resumes."""
    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file():
        return False
    checkpoint.check_resume(cfg, latest.read_text().strip(), latest.parent, RESUMABLE)
    return True


def _resume(run_dir: Path, learners, sync: WeightSync, kl_ctl, log: RunLogger,
            history: list[dict]) -> int:
    """``resume=auto``: restore the last checkpoint (weights, optimizer, KL coefficient, logged
    history) and push its weights; returns the version."""
    latest = run_dir / "checkpoints" / "latest"
    state = learners.call("load_checkpoint", str(run_dir / "checkpoints"), latest.read_text().strip())[0]
    version = int(state["version"])
    kl_ctl.value = float(state.get("kl_coef", kl_ctl.value))
    if "log" in state:
        log.restore(**state["log"])
        history.extend(state["history"])
    sync.sync(version)
    print(f"ppo: resumed from {latest.read_text().strip()} (policy version {version})")
    return version


def _json(obj) -> str:
    import json

    return json.dumps(obj, default=float)
