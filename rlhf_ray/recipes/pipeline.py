"""pipeline: the LLaMA-2-style sequence on one Ray cluster, ending in a report.

    rlhf-ray pipeline launch/configs/quickstart.yaml

1. SFT      the base model on instruction data                     -> sft/model
2. prefs    the SFT model writes n answers per prompt; a judge picks -> prefs/prefs.jsonl
3. RM       a reward model (from the SFT model) on those pairs      -> rm/model
4. RS       best-of-n fine-tuning of the SFT model, scored by the RM -> rs/model
5. PPO      from the RS model; reference = SFT model; reward = RM   -> ppo/model
   DPO      branch: from the SFT model on the same pairs            -> dpo/model
6. Score every stage's model on the same held-out task (greedy, exact-answer checker),
   then write ``report.md`` with plots.
Each stage runs in ``run_dir/<stage>`` with its own summary.json; skipped stages fall back
to the settings in their own section.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from rlhf_ray.assets import resolve_model
from rlhf_ray.config import PipelineConfig, RewardConfig
from rlhf_ray.config_loader import save_config
from rlhf_ray.data import load_tokenizer
from rlhf_ray.driver.evaluation import heldout_score
from rlhf_ray.driver.prompts import load_prompts
from rlhf_ray.driver.roles import Roles
from rlhf_ray.files import write_json_atomic
from rlhf_ray.report import stage_scores_plot, write_report
from rlhf_ray.runtime import MemoryMonitor, ray_session, worker_env


def run(cfg: PipelineConfig) -> dict:
    run_dir = Path(cfg.run_dir)
    save_config(cfg, run_dir)
    base = resolve_model(cfg.model.path, role="pipeline model")
    models: dict[str, str] = {"base": base}
    summaries: dict[str, dict] = {}
    started = time.time()

    def stage(name: str, stage_cfg, **changes):
        """Run one stage in run_dir/<name> with the shared Ray and logging settings."""
        from importlib import import_module

        stage_cfg = dataclasses.replace(stage_cfg, run_dir=str(run_dir / name), ray=cfg.ray,
                                        logging=cfg.logging, **changes)
        print(f"pipeline: stage {name} -> {stage_cfg.run_dir}")
        memory.stage(name)
        summaries[name] = import_module(f"rlhf_ray.recipes.{name}").run(stage_cfg)
        return summaries[name]["outputs"]

    def with_model(section, path: str):
        return dataclasses.replace(section, path=path)
    with MemoryMonitor() as memory, ray_session(cfg.ray, worker_env()):
        sft_model = base
        # 1. SFT
        if "sft" in cfg.stages:
            sft_model = models["sft"] = stage("sft", cfg.sft, model=with_model(cfg.sft.model, base))["model"]
        # 2. preference pairs written by the SFT model
        pairs = None
        if "prefs" in cfg.stages:
            pairs = stage("prefs", cfg.prefs, model=with_model(cfg.prefs.model, sft_model))["prefs"]
        # 3. reward model on those pairs
        rm_model = None
        if "rm" in cfg.stages:
            data = cfg.rm.data if pairs is None else dataclasses.replace(cfg.rm.data, source=pairs)
            rm_model = stage("rm", cfg.rm, model=with_model(cfg.rm.model, sft_model), data=data)["model"]
        # 4. rejection sampling scored by the RM
        policy = sft_model
        if "rs" in cfg.stages:
            reward = cfg.rs.reward if rm_model is None else dataclasses.replace(cfg.rs.reward, model=rm_model)
            policy = models["rs"] = stage("rs", cfg.rs, model=with_model(cfg.rs.model, sft_model),
                                          reward=reward)["model"]
        # 5. PPO from the RS model against the SFT reference
        if "ppo" in cfg.stages:
            reward = cfg.ppo.reward if rm_model is None else dataclasses.replace(cfg.ppo.reward, model=rm_model)
            models["ppo"] = stage("ppo", cfg.ppo, model=with_model(cfg.ppo.model, policy),
                                  reference=dataclasses.replace(cfg.ppo.reference, model=sft_model),
                                  reward=reward)["model"]
        # 5'. DPO branch from the SFT model
        if "dpo" in cfg.stages:
            data = cfg.dpo.data if pairs is None else dataclasses.replace(cfg.dpo.data, source=pairs)
            models["dpo"] = stage("dpo", cfg.dpo, model=with_model(cfg.dpo.model, sft_model),
                                  reference=with_model(cfg.dpo.reference, sft_model), data=data)["model"]
        # 6. every stage's model on the same held-out task
        memory.stage("score")
        scores = _score_models(cfg, models)
    return _finish(cfg, run_dir, models, scores, summaries, memory, time.time() - started)


def _finish(cfg: PipelineConfig, run_dir: Path, models: dict[str, str], scores: dict[str, float],
            summaries: dict[str, dict], memory: MemoryMonitor, wall_s: float) -> dict:
    """The stage-scores plot, ``report.md`` and ``summary.json``."""
    plot = stage_scores_plot(scores, run_dir / "stage_scores.png")
    result = {"recipe": "pipeline", "models": models, "heldout_score": scores,
              "outputs": {"report": str(run_dir / "report.md"), "stage_scores_plot": str(plot),
                          **{f"{k}_model": v for k, v in models.items()}},
              "stages": {k: {"wall_s": v.get("wall_s"), "outputs": v.get("outputs")} for k, v in summaries.items()},
              "metrics": {f"eval/score_{k}": {"first": scores["base"], "final": v} for k, v in scores.items()},
              "peak_rss_gib": round(memory.peak_gib, 2), "stage_peak_rss_gib": memory.stage_peaks_gib,
              "peak_rss_by_process_gib": memory.peak_breakdown_gib(), "wall_s": round(wall_s, 1)}
    write_report(run_dir / "report.md", cfg, result, summaries)
    write_json_atomic(run_dir / "summary.json", result)
    print(f"pipeline: held-out {cfg.eval_checker} score by stage: {json.dumps(scores)}; "
          f"peak RSS {memory.peak_gib:.2f} GiB; report {run_dir / 'report.md'}")
    return result


def _score_models(cfg: PipelineConfig, models: dict[str, str]) -> dict[str, float]:
    """Greedy held-out answers of each model through one rollout worker (weights swapped in)."""
    import ray
    from safetensors.torch import load_file

    tokenizer = load_tokenizer(models["base"])
    rollout_cfg = dataclasses.replace(cfg.rs.rollout, num_workers=1)
    prompts = load_prompts(cfg.eval_data, tokenizer, rollout_cfg.max_model_len, "heldout")[: cfg.eval_prompts]
    scores = {}
    with Roles(cfg.ray) as roles:
        with roles.together():
            rollouts = roles.rollouts(models["base"], rollout_cfg, cfg.model.dtype, cfg.seed)
            reward = roles.reward(RewardConfig(function=cfg.eval_checker))
        for version, (name, path) in enumerate(models.items()):
            if version:
                state = load_file(str(Path(path) / "model.safetensors"))
                rollouts.call("load_weights", version, [ray.put(state)])
            scores[name] = heldout_score(rollouts, reward, prompts, cfg.eval_max_new_tokens)["eval/score"]
            print(f"pipeline: held-out score of {name}: {scores[name]:.3f}")
    return scores
