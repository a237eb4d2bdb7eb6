"""The whole pipeline on the tiny model: every stage feeds the next; a report at the end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rlhf_ray.config import PipelineConfig
from rlhf_ray.config_loader import ConfigError, build_config

ROOT = Path(__file__).resolve().parents[2]


def test_pipeline_tiny_end_to_end(ray_local, tmp_path):
    from rlhf_ray.recipes import pipeline

    cfg = build_config(PipelineConfig, ROOT / "launch" / "configs" / "pipeline_tiny.yaml",
                       [f"run_dir={tmp_path}", "logging.progress_bar=false"])
    result = pipeline.run(cfg)
    # every stage ran in its own folder with its own summary
    for stage in ("sft", "prefs", "rm", "rs", "ppo", "dpo"):
        summary = json.loads((tmp_path / stage / "summary.json").read_text())
        assert summary["metrics"], stage
        assert (tmp_path / stage / "config.yaml").is_file()
    # the wiring: RM trained on the prefs output; RS/PPO scored by the RM; PPO from RS, ref = SFT
    rm_cfg = (tmp_path / "rm" / "config.yaml").read_text()
    assert str(tmp_path / "prefs" / "prefs.jsonl") in rm_cfg
    ppo_cfg = (tmp_path / "ppo" / "config.yaml").read_text()
    assert str(tmp_path / "rm" / "model") in ppo_cfg and str(tmp_path / "rs" / "model") in ppo_cfg
    assert yaml.safe_load(ppo_cfg)["reference"]["model"] == str(tmp_path / "sft" / "model")
    dpo_cfg = (tmp_path / "dpo" / "config.yaml").read_text()
    assert str(tmp_path / "sft" / "model") in dpo_cfg
    # the report: held-out score of every stage's model, plots, memory
    assert set(result["heldout_score"]) == {"base", "sft", "rs", "ppo", "dpo"}
    assert all(0.0 <= s <= 1.0 for s in result["heldout_score"].values())
    report = (tmp_path / "report.md").read_text()
    for name in ("base", "sft", "rs", "ppo", "dpo"):
        assert f"| {name} |" in report
    assert (tmp_path / "stage_scores.png").stat().st_size > 1000
    assert (tmp_path / "ppo.png").is_file() and "ppo.png" in report
    assert result["peak_rss_gib"] > 0.5
    # every stage's peak, and which processes held the memory at the overall peak
    assert set(result["stage_peak_rss_gib"]) >= {"sft", "prefs", "rm", "rs", "ppo", "dpo", "score"}
    assert max(result["stage_peak_rss_gib"].values()) == pytest.approx(result["peak_rss_gib"], abs=0.01)
    assert sum(result["peak_rss_by_process_gib"].values()) <= result["peak_rss_gib"] + 0.01
    assert "## Memory" in report
    assert json.loads((tmp_path / "summary.json").read_text())["outputs"]["report"].endswith("report.md")


def test_pipeline_stage_order_is_checked():
    with pytest.raises(ConfigError, match="pipeline order"):
        build_config(PipelineConfig, None, ["stages=[rm,sft]"])
    with pytest.raises(ConfigError, match="unknown"):
        build_config(PipelineConfig, None, ["stages=[sft,grpo]"])
