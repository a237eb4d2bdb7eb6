"""generate: sample responses with vLLM rollout workers and (optionally) score them.

    rlhf-ray generate launch/configs/quickstart.yaml

1. Load and validate the prompts (one split of ``data``).
2. Start ``rollout.num_workers`` vLLM rollout workers and, if a reward is set, a RewardServer.
3. Spread the prompts over the workers; each samples ``sampling.n`` responses per prompt.
4. Score each worker's episodes as soon as that worker finishes.
5. Write ``episodes.jsonl`` and ``summary.json`` to ``run_dir``.
generate keeps no checkpoints: ``resume=auto`` is refused, and a rerun rewrites its outputs.
"""

from __future__ import annotations

import dataclasses

import ray
from tqdm import tqdm

from rlhf_ray.assets import resolve_model
from rlhf_ray.config import GenerateConfig
from rlhf_ray.data import load_tokenizer
from rlhf_ray.driver.prompts import load_prompts
from rlhf_ray.driver.run import Run
from rlhf_ray.files import write_jsonl_atomic


def run(cfg: GenerateConfig) -> dict:
    with Run(cfg, "generate", resumable=None) as run:
        model_path = resolve_model(cfg.model.path, role="rollout")
        # 1. prompts
        with run.phase("data"):
            prompts = load_prompts(cfg.data, load_tokenizer(model_path), cfg.rollout.max_model_len,
                                   cfg.split)
        scoring = cfg.reward.is_set
        # 2. workers
        with run.phase("start"), run.roles.together():  # the reward first: its error is the one raised
            reward = run.roles.reward(cfg.reward) if scoring else None
            rollouts = run.roles.rollouts(model_path, cfg.rollout, cfg.model.dtype, cfg.seed)
        # 3-4. generate, score as each worker finishes
        with run.phase("generate"):
            episodes = _generate_and_score(cfg, prompts, rollouts, reward)
        run.roles.shutdown()
        # 5. outputs
        out = write_jsonl_atomic(run.run_dir / "episodes.jsonl", [
            {k: v for k, v in dataclasses.asdict(e).items()
             if k not in ("prompt_ids", "response_ids", "logprobs")} for e in episodes])
        lengths = [len(e.response_ids) for e in episodes]
        gen_s = run.logger.phases["generate"]
        metrics = {"rollout/episodes": len(episodes), "rollout/response_len_mean": sum(lengths) / len(lengths),
                   "rollout/truncated_frac": sum(e.finish_reason == "length" for e in episodes) / len(episodes),
                   "data/prompts": len(prompts), "perf/gen_s": gen_s,
                   "perf/tokens_per_s": sum(lengths) / max(gen_s, 1e-9)}
        if scoring:
            metrics["reward/mean"] = sum(e.score for e in episodes) / len(episodes)
        run.log(metrics, step=0)
        summary = run.finish({"episodes": str(out)})
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
