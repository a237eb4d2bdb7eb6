"""Fixtures for the training-recipe tests (sft, rm, dpo): build a tiny config, run a recipe."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from rlhf_ray.config_loader import build_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "launch" / "configs"


def tiny_config(recipe: str, run_dir: Path, *overrides: str):
    """``launch/configs/<recipe>_tiny.yaml`` with ``run_dir`` and quiet logging."""
    from rlhf_ray.recipes import RECIPES

    return build_config(RECIPES[recipe], CONFIGS / f"{recipe}_tiny.yaml",
                        [f"run_dir={run_dir}", "logging.progress_bar=false",
                         "logging.wandb_mode=disabled", *overrides])


def run_recipe(recipe: str, run_dir: Path, *overrides: str) -> dict:
    """Run ``rlhf_ray.recipes.<recipe>.run`` on its tiny config; returns the summary."""
    module = importlib.import_module(f"rlhf_ray.recipes.{recipe}")
    return module.run(tiny_config(recipe, run_dir, *overrides))


@pytest.fixture
def tiny_run(ray_local):
    """``tiny_run(name, run_dir, *overrides) -> summary`` on the session's local Ray."""
    return run_recipe


@pytest.fixture
def tiny_cfg():
    """``tiny_cfg(name, run_dir, *overrides) -> config`` (no Ray needed)."""
    return tiny_config
