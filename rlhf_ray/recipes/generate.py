"""generate: sample responses with vLLM rollout workers and (optionally) score them.

    rlhf-ray generate launch/configs/quickstart.yaml

1. Load and validate the prompts (one split of ``data``).
2. Start ``rollout.num_workers`` vLLM rollout workers and, if a reward is set, a RewardServer.
3. Spread the prompts over the workers; each samples ``sampling.n`` responses per prompt.
4. Score each worker's episodes as soon as that worker finishes.
5. Write ``episodes.jsonl`` and ``summary.json`` to ``run_dir``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import ray
from tqdm import tqdm

from rlhf_ray.assets import resolve_model
from rlhf_ray.config import save_config, to_dict
from rlhf_ray.configs import GenerateConfig
from rlhf_ray.data import load_tokenizer
from rlhf_ray.metrics import RunLogger
from rlhf_ray.recipes import online
from rlhf_ray.runtime import ray_session, worker_env


def run(cfg: GenerateConfig) -> dict:
    run_dir = Path(cfg.run_dir)
    save_config(cfg, run_dir)
    log = RunLogger(run_dir, cfg.logging, to_dict(cfg), "generate")
    model_path = resolve_model(cfg.model.path, role="rollout")

    # 1. prompts
    with log.phase("data"):
        tokenizer = load_tokenizer(model_path)
        prompts = online.load_prompts(cfg.data, tokenizer, cfg.rollout.max_model_len, cfg.split)
    scoring = bool(cfg.reward.model or cfg.reward.function)

    with ray_session(cfg.ray, worker_env(cfg.rollout.kv_cache_gib)):
        # 2. workers
        with log.phase("start"):
            rollouts = online.start_rollouts(model_path, cfg.rollout, cfg.model.dtype, cfg.seed, cfg.ray)
            reward = online.start_reward(cfg.reward, cfg.ray) if scoring else None
        try:
            # 3-4. generate, score as each worker finishes
            with log.phase("generate"):
                episodes = _generate_and_score(cfg, prompts, rollouts, reward)
        finally:
            rollouts.shutdown()
            if reward is not None:
                reward.shutdown()

    # 5. outputs
    out = run_dir / "episodes.jsonl"
    with out.open("w") as f:
        for e in episodes:
            f.write(json.dumps({k: v for k, v in dataclasses.asdict(e).items()
                                if k not in ("prompt_ids", "response_ids", "logprobs")}) + "\n")
    lengths = [len(e.response_ids) for e in episodes]
    metrics = {"rollout/episodes": len(episodes), "rollout/response_len_mean": sum(lengths) / len(lengths),
               "rollout/truncated_frac": sum(e.finish_reason == "length" for e in episodes) / len(episodes),
               "data/prompts": len(prompts), "perf/gen_s": log.phases["generate"],
               "perf/tokens_per_s": sum(lengths) / max(log.phases["generate"], 1e-9)}
    if scoring:
        scores = [e.score for e in episodes]
        metrics["reward/mean"] = sum(scores) / len(scores)
    log.log(metrics, step=0)
    summary = log.finish({"episodes": str(out), "config": str(run_dir / "config.yaml")})
    print(f"generate: {len(episodes)} episodes -> {out}"
          + (f"; mean reward {metrics['reward/mean']:.3f}" if scoring else ""))
    return summary


def _generate_and_score(cfg, prompts, rollouts, reward) -> list:
    shards = [list(range(i, len(prompts), len(rollouts))) for i in range(len(rollouts))]
    refs = {rollouts.submit(r, "generate", [prompts[i].prompt_ids for i in shard], cfg.sampling,
                            shard, [prompts[i].answer for i in shard]): r
            for r, shard in enumerate(shards) if shard}
    score_refs, generated = [], {}
    bar = tqdm(total=len(prompts) * cfg.sampling.n, desc="generate", unit="ep",
               disable=not cfg.logging.progress_bar)
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=cfg.ray.call_timeout_s)
        if not done:
            rollouts.get(pending, [refs[p] for p in pending], "generate")  # raises a timeout error
        rank = refs[done[0]]
        episodes = rollouts.get(done, [rank], "generate")[0]
        generated[rank] = episodes
        bar.update(len(episodes))
        if reward is not None:
            replica = len(score_refs) % len(reward)
            score_refs.append((rank, replica, reward.submit(replica, "score", episodes)))
    bar.close()
    for rank, replica, ref in score_refs:
        for e, s in zip(generated[rank], reward.get([ref], [replica], "score")[0]):
            e.score = s
    return sorted((e for eps in generated.values() for e in eps),
                  key=lambda e: (e.prompt_index, e.sample_index))
