"""Recipes: one file per job, each ``run(cfg)`` a readable loop; ``RECIPES`` maps a recipe
name to its config tree (the CLI offers every name here whose module exists)."""

from rlhf_ray.configs import DoctorConfig, DPOConfig, GenerateConfig, RMConfig, SFTConfig
from rlhf_ray.configs_online import PPOConfig

RECIPES: dict[str, type] = {
    "generate": GenerateConfig,
    "sft": SFTConfig,
    "rm": RMConfig,
    "dpo": DPOConfig,
    "ppo": PPOConfig,
    "doctor": DoctorConfig,
}
