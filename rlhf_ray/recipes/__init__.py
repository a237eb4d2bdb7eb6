"""Recipes: one file per job, each ``run(cfg)`` a readable loop; ``RECIPES`` maps a recipe
name to its config tree (the CLI offers every name here whose module exists)."""

from rlhf_ray.config import (
    DoctorConfig,
    DPOConfig,
    GenerateConfig,
    PipelineConfig,
    PPOConfig,
    PrefsConfig,
    RMConfig,
    RSConfig,
    SFTConfig,
)

RECIPES: dict[str, type] = {
    "generate": GenerateConfig,
    "sft": SFTConfig,
    "rm": RMConfig,
    "dpo": DPOConfig,
    "ppo": PPOConfig,
    "rs": RSConfig,
    "prefs": PrefsConfig,
    "pipeline": PipelineConfig,
    "doctor": DoctorConfig,
}
