"""prefs: build a preference dataset that ``rm`` and ``dpo`` read.

    rlhf-ray prefs launch/configs/prefs_tiny.yaml sampling.n=4

judge=reward:
1. the policy writes ``sampling.n`` candidate responses per prompt;
2. the RewardServer (a reward function, a reward model, or both) scores every candidate;
3. per prompt, the best candidate is ``chosen`` and the worst ``rejected`` (ties and pairs
   closer than ``min_margin`` are skipped);
4. the pairs go to ``run_dir/prefs.jsonl`` with their scores.
judge=labels: the pairs already on disk (human labels) are validated and written as is.
prefs keeps no checkpoints: ``resume=auto`` is refused, and a rerun rewrites ``prefs.jsonl``.
"""

from __future__ import annotations

from rlhf_ray.assets import resolve_model
from rlhf_ray.config import PrefsConfig
from rlhf_ray.data import load_rows, load_tokenizer, row_to_dict
from rlhf_ray.driver.episodes import best_and_worst, preference_pairs, preference_row
from rlhf_ray.driver.evaluation import generate_all, score_all
from rlhf_ray.driver.prompts import load_prompts
from rlhf_ray.driver.run import Run
from rlhf_ray.files import write_jsonl_atomic


def run(cfg: PrefsConfig) -> dict:
    with Run(cfg, "prefs", resumable=None) as run:
        out = run.run_dir / "prefs.jsonl"
        if cfg.judge == "labels":
            rows = [row_to_dict(r) for r in load_rows(cfg.data, cfg.split).rows]
            write_jsonl_atomic(out, [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
            run.log({"prefs/pairs": float(len(rows))}, 0)
            return run.finish({"prefs": str(out)}, {"judge": "labels"})

        policy_path = resolve_model(cfg.model.path, role="policy")
        prompts = load_prompts(cfg.data, load_tokenizer(policy_path), cfg.rollout.max_model_len, cfg.split)
        with run.phase("start"), run.roles.together():
            reward = run.roles.reward(cfg.reward)  # first: a broken judge's error is the one raised
            rollouts = run.roles.rollouts(policy_path, cfg.rollout, cfg.model.dtype, cfg.seed)
        # 1-2. candidates, scored
        with run.phase("generate"):
            episodes = generate_all(rollouts, prompts, cfg.sampling)
            score_all(reward, episodes)
        run.roles.shutdown()  # the workers are done; writing the pairs needs none
        # 3. best vs worst per prompt
        by_index = {p.index: p for p in prompts}
        groups = best_and_worst(episodes, cfg.sampling.n)
        pairs = [preference_row(best, worst, by_index[best.prompt_index])
                 for best, worst in preference_pairs(groups, cfg.min_margin)]
        skipped = len(groups) - len(pairs)
        # 4. write
        write_jsonl_atomic(out, pairs)
        scores = [e.score for e in episodes]
        run.log({"prefs/pairs": float(len(pairs)), "prefs/skipped_prompts": float(skipped),
                 "reward/mean": sum(scores) / len(scores),
                 "prefs/margin_mean": sum(p["chosen_score"] - p["rejected_score"] for p in pairs)
                 / max(len(pairs), 1)}, 0)
        print(f"prefs: {len(pairs)} pairs from {len(prompts)} prompts ({skipped} skipped) -> {out}")
        return run.finish({"prefs": str(out)}, {"judge": "reward"})
