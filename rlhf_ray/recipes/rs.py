"""rs: rejection sampling (best-of-n) fine-tuning, as LLaMA-2-Chat ran it before PPO.

    rlhf-ray rs launch/configs/rs_tiny.yaml rounds=3

For each round r (policy version r):
1. sample ``sampling.n`` responses to each of the round's prompts;
2. score every response with the RewardServer;
3. keep the best response per prompt (if it reaches ``threshold``); write the kept set and
   best-versus-worst preference pairs as JSONL;
4. fine-tune the policy on the kept set (response-only loss);
5. sync the new weights to the rollout workers as version r + 1.
The mean reward of single samples (``reward/mean``) should rise from round to round.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from rlhf_ray.assets import resolve_model
from rlhf_ray.batch import Episode, SequenceBatch
from rlhf_ray.config import save_config, to_dict
from rlhf_ray.configs_online import RSConfig
from rlhf_ray.data import load_tokenizer
from rlhf_ray.metrics import RunLogger
from rlhf_ray.plots import plot_metrics
from rlhf_ray.recipes import online
from rlhf_ray.runtime import ray_session, worker_env
from rlhf_ray.weight_sync import WeightSync


def run(cfg: RSConfig) -> dict:
    run_dir = Path(cfg.run_dir)
    save_config(cfg, run_dir)
    log = RunLogger(run_dir, cfg.logging, to_dict(cfg), "rs")
    policy_path = resolve_model(cfg.model.path, role="policy")
    tokenizer = load_tokenizer(policy_path)
    train = online.load_prompts(cfg.data, tokenizer, cfg.rollout.max_model_len, "train")
    heldout = online.load_prompts(cfg.data, tokenizer, cfg.rollout.max_model_len, "heldout")[: cfg.eval_prompts]
    outputs: dict[str, str] = {}
    steps_per_round = -(-cfg.prompts_per_round // cfg.batch_size) * cfg.epochs

    with ray_session(cfg.ray, worker_env(cfg.rollout.kv_cache_gib)):
        groups = []
        try:
            with log.phase("start"):
                rollouts = online.start_rollouts(policy_path, cfg.rollout, cfg.model.dtype, cfg.seed, cfg.ray)
                groups.append(rollouts)
                reward = online.start_reward(cfg.reward, cfg.ray)
                groups.append(reward)
                learners = online.start_learners(policy_path, cfg.learner, cfg.optim, cfg.model.dtype,
                                                 cfg.rounds * steps_per_round, cfg.seed, cfg.ray)
                groups.append(learners)
                sync = WeightSync(learners, rollouts)

            def evaluate() -> dict[str, float]:
                return online.heldout_score(rollouts, reward, heldout, cfg.sampling.max_new_tokens,
                                            cfg.sampling, cfg.eval_samples)

            log.log(evaluate(), 0)
            for r in tqdm(range(cfg.rounds), desc="rs", unit="round", disable=not cfg.logging.progress_bar):
                prompts = online.prompts_for_step(train, r, cfg.prompts_per_round)
                # 1-2. n samples per prompt, scored
                with log.phase("generate"):
                    episodes = online.generate_all(rollouts, prompts, cfg.sampling)
                    online.score_all(reward, episodes)
                # 3. best of n
                kept, pairs = best_of_n(episodes, cfg.sampling.n, cfg.threshold)
                outputs[f"kept_round{r}"] = _write_jsonl(run_dir / f"round{r}_kept.jsonl",
                                                         [_kept_row(e, prompts) for e in kept])
                outputs[f"pairs_round{r}"] = _write_jsonl(run_dir / f"round{r}_pairs.jsonl",
                                                          [_pair_row(b, w, prompts) for b, w in pairs])
                # 4. SFT on the kept set
                with log.phase("train"):
                    train_m = _finetune(cfg, learners, kept, tokenizer.pad_token_id) if kept else {}
                # 5. new weights
                sync_m = sync.sync(r + 1)
                metrics = {**online.rollout_metrics(episodes, r), **train_m, **sync_m,
                           "rs/kept": float(len(kept)), "rs/kept_frac": len(kept) / len(prompts),
                           "rs/best_mean": sum(e.score for e in kept) / max(len(kept), 1),
                           **evaluate()}
                log.log(metrics, r + 1)
            outputs["model"] = learners.call("export_hf", str(run_dir / "model"))[0]
        finally:
            for group in reversed(groups):
                group.shutdown()
    outputs["plot"] = str(plot_metrics(log.history, ["reward/mean", "rs/kept_frac", "eval/score_sampled", "eval/score"],
                                       run_dir / "rs.png", "Rejection sampling", xlabel="round"))
    return log.finish(outputs, {"rounds": cfg.rounds})


def best_of_n(episodes: list[Episode], n: int, threshold: float | None) -> tuple[list[Episode], list]:
    """Per prompt group: the best episode (kept if it reaches ``threshold``) and a
    (best, worst) pair when their scores differ."""
    kept, pairs = [], []
    for start in range(0, len(episodes), n):
        group = sorted(episodes[start: start + n], key=lambda e: e.score, reverse=True)
        best, worst = group[0], group[-1]
        if threshold is None or best.score >= threshold:
            kept.append(best)
        if best.score > worst.score:
            pairs.append((best, worst))
    return kept, pairs


def _finetune(cfg: RSConfig, learners, kept: list[Episode], pad_id: int) -> dict:
    """``epochs`` passes of SFT over the kept (prompt, best response) pairs."""
    d = len(learners)
    totals: dict[str, float] = {}
    steps = 0
    for _ in range(cfg.epochs):
        for start in range(0, len(kept), cfg.batch_size):
            chunk = kept[start: start + cfg.batch_size]
            if len(chunk) < d:  # every learner rank needs at least one row
                continue
            batch = SequenceBatch.from_pairs([(e.prompt_ids, e.response_ids) for e in chunk], pad_id)
            tokens = int(batch.loss_mask.sum())
            shards = [(batch.select(slice(r, None, d)), tokens) for r in range(d)]
            for k, v in learners.call_each("sft_step", shards)[0].items():
                totals[k] = totals.get(k, 0.0) + float(v)
            steps += 1
    return {k: v / steps for k, v in totals.items()} if steps else {}


def _kept_row(e: Episode, prompts: list[online.Prompt]) -> dict:
    raw = {p.index: p for p in prompts}[e.prompt_index].raw
    if isinstance(raw, str):
        return {"instruction": raw, "output": e.response_text, "score": e.score}
    return {"messages": [*raw, {"role": "assistant", "content": e.response_text}], "score": e.score}


def _pair_row(best: Episode, worst: Episode, prompts: list[online.Prompt]) -> dict:
    by_index = {p.index: p for p in prompts}
    return {"prompt": by_index[best.prompt_index].raw, "chosen": best.response_text,
            "rejected": worst.response_text, "chosen_score": best.score, "rejected_score": worst.score}


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)
    return str(path)
