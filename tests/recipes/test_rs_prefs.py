"""Rejection sampling and preference building on the tiny model, with real workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_ray.batch import Episode
from rlhf_ray.config import PrefsConfig, RSConfig
from rlhf_ray.config_loader import ConfigError, build_config
from rlhf_ray.driver.episodes import best_of_n

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "launch" / "configs"


def _ep(prompt: int, sample: int, score: float) -> Episode:
    return Episode([1], [2], "p", f"r{prompt}{sample}", [0.0], "stop", 0, prompt, sample, score=score)


def test_best_of_n_keeps_the_best_and_pairs_best_with_worst():
    episodes = [_ep(0, 0, 0.1), _ep(0, 1, 0.9), _ep(0, 2, 0.5), _ep(1, 0, 0.2), _ep(1, 1, 0.2), _ep(1, 2, 0.2)]
    kept, pairs = best_of_n(episodes, 3, threshold=None)
    assert [e.response_text for e in kept] == ["r01", "r10"]
    assert [(b.response_text, w.response_text) for b, w in pairs] == [("r01", "r00")]  # ties make no pair
    kept, _ = best_of_n(episodes, 3, threshold=0.5)
    assert [e.response_text for e in kept] == ["r01"]


def test_rs_rounds_write_kept_sets_and_pairs(ray_local, tmp_path):
    from rlhf_ray.recipes import rs

    cfg = build_config(RSConfig, CONFIGS / "rs_tiny.yaml", [f"run_dir={tmp_path}", "logging.progress_bar=false",
                                                              "eval_samples=5"])
    summary = rs.run(cfg)
    for r in range(2):
        kept = [json.loads(x) for x in (tmp_path / f"round{r}_kept.jsonl").read_text().splitlines()]
        assert len(kept) == 6 and all(k["instruction"] and "score" in k for k in kept)
        for pair in map(json.loads, (tmp_path / f"round{r}_pairs.jsonl").read_text().splitlines()):
            assert pair["chosen_score"] > pair["rejected_score"]
    m = summary["metrics"]
    assert m["sync/version"]["final"] == 2
    assert m["eval/sampled_answers"]["final"] == 4 * 5  # eval_prompts x eval_samples
    assert m["policy/loss"]["final"] == m["policy/loss"]["final"]  # trained, finite
    # the kept responses are the longest (the reward is the length): best >= the mean sample
    assert m["rs/best_mean"]["first"] >= m["reward/mean"]["first"]
    assert Path(summary["outputs"]["plot"]).is_file()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(summary["outputs"]["model"])


def test_prefs_from_a_reward_function_feeds_rm_and_dpo_format(ray_local, tmp_path):
    from rlhf_ray.config import DataConfig
    from rlhf_ray.data import load_rows
    from rlhf_ray.recipes import prefs

    cfg = build_config(PrefsConfig, CONFIGS / "prefs_tiny.yaml", [f"run_dir={tmp_path}"])
    summary = prefs.run(cfg)
    rows = [json.loads(x) for x in Path(summary["outputs"]["prefs"]).read_text().splitlines()]
    assert rows and all(len(r["chosen"]) > len(r["rejected"]) for r in rows)  # judged by length
    # the file is valid preference data for rm / dpo
    loaded = load_rows(DataConfig(source=summary["outputs"]["prefs"], format="preference",
                                  heldout_fraction=0.0), "all")
    assert len(loaded) == len(rows)


def test_prefs_from_existing_labels(tmp_path):
    from rlhf_ray.recipes import prefs

    src = tmp_path / "human.jsonl"
    src.write_text('{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}\n'
                   '{"prompt": "2+2?", "chosen": "4", "rejected": "5"}\n')
    cfg = build_config(PrefsConfig, None, [f"run_dir={tmp_path / 'run'}", "judge=labels",
                                           f"data.source={src}", "data.format=preference",
                                           "split=all", "logging.wandb_mode=disabled"])
    summary = prefs.run(cfg)
    assert len(Path(summary["outputs"]["prefs"]).read_text().splitlines()) == 2
    with pytest.raises(ConfigError, match="judge=labels"):
        build_config(PrefsConfig, None, ["judge=labels"])
    with pytest.raises(ConfigError, match="at least 2 samples"):
        build_config(RSConfig, None, ["sampling.n=1"])
