"""prefs: build a preference dataset that ``rm`` and ``dpo`` read.

    rlhf-ray prefs launch/configs/prefs_tiny.yaml sampling.n=4

judge=reward:
1. the policy writes ``sampling.n`` candidate responses per prompt;
2. the RewardServer (a reward function, a reward model, or both) scores every candidate;
3. per prompt, the best candidate is ``chosen`` and the worst ``rejected`` (ties and pairs
   closer than ``min_margin`` are skipped);
4. the pairs go to ``run_dir/prefs.jsonl`` with their scores.
judge=labels: the pairs already on disk (human labels) are validated and written as is.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhf_ray.assets import resolve_model
from rlhf_ray.config import save_config, to_dict
from rlhf_ray.configs_online import PrefsConfig
from rlhf_ray.data import load_rows, load_tokenizer, row_to_dict
from rlhf_ray.metrics import RunLogger
from rlhf_ray.recipes import online
from rlhf_ray.runtime import ray_session, worker_env


def run(cfg: PrefsConfig) -> dict:
    run_dir = Path(cfg.run_dir)
    save_config(cfg, run_dir)
    log = RunLogger(run_dir, cfg.logging, to_dict(cfg), "prefs")
    out = run_dir / "prefs.jsonl"
    if cfg.judge == "labels":
        rows = [row_to_dict(r) for r in load_rows(cfg.data, cfg.split).rows]
        _write(out, [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
        log.log({"prefs/pairs": float(len(rows))}, 0)
        return log.finish({"prefs": str(out)}, {"judge": "labels"})

    policy_path = resolve_model(cfg.model.path, role="policy")
    tokenizer = load_tokenizer(policy_path)
    prompts = online.load_prompts(cfg.data, tokenizer, cfg.rollout.max_model_len, cfg.split)
    with ray_session(cfg.ray, worker_env(cfg.rollout.kv_cache_gib)):
        groups = []
        try:
            with log.phase("start"):
                rollouts = online.start_rollouts(policy_path, cfg.rollout, cfg.model.dtype, cfg.seed, cfg.ray)
                groups.append(rollouts)
                reward = online.start_reward(cfg.reward, cfg.ray)
                groups.append(reward)
            # 1-2. candidates, scored
            with log.phase("generate"):
                episodes = online.generate_all(rollouts, prompts, cfg.sampling)
                online.score_all(reward, episodes)
        finally:
            for group in reversed(groups):
                group.shutdown()
    # 3. best vs worst per prompt
    raw = {p.index: p.raw for p in prompts}
    pairs, skipped = [], 0
    n = cfg.sampling.n
    for start in range(0, len(episodes), n):
        group = sorted(episodes[start: start + n], key=lambda e: e.score, reverse=True)
        best, worst = group[0], group[-1]
        if best.score - worst.score <= cfg.min_margin or best.response_text == worst.response_text:
            skipped += 1
            continue
        pairs.append({"prompt": raw[best.prompt_index], "chosen": best.response_text,
                      "rejected": worst.response_text, "chosen_score": best.score,
                      "rejected_score": worst.score})
    # 4. write
    _write(out, pairs)
    scores = [e.score for e in episodes]
    log.log({"prefs/pairs": float(len(pairs)), "prefs/skipped_prompts": float(skipped),
             "reward/mean": sum(scores) / len(scores),
             "prefs/margin_mean": sum(p["chosen_score"] - p["rejected_score"] for p in pairs) / max(len(pairs), 1)}, 0)
    print(f"prefs: {len(pairs)} pairs from {len(prompts)} prompts ({skipped} skipped) -> {out}")
    return log.finish({"prefs": str(out)}, {"judge": "reward"})


def _write(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)
