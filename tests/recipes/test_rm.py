"""rlhf-ray rm on the tiny model: a two-step run from a causal LM, the exported folder served by a
RewardServer with the training set's normalisation, and clear errors for bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_ray.batch import Episode
from rlhf_ray.config import RewardConfig
from rlhf_ray.data import DataError, load_rows, load_tokenizer, prompt_text
from rlhf_ray.workers.group import WorkerGroup, WorkerResources
from rlhf_ray.workers.reward import RewardServer


def episode(prompt: str, response: str) -> Episode:
    return Episode(prompt_ids=[], response_ids=[], prompt_text=prompt, response_text=response,
                   logprobs=[], finish_reason="stop", policy_version=0)


def test_rm_two_steps_then_reward_server_normalises_with_its_stats(tiny_run, tiny_cfg,
                                                                   tiny_llama, tmp_path):
    summary = tiny_run("rm", tmp_path / "run")
    m = summary["metrics"]
    for key in ("rm/loss", "rm/accuracy", "rm/margin", "eval/loss", "eval/accuracy"):
        assert math.isfinite(m[key]["first"]) and math.isfinite(m[key]["final"]), key
    assert summary["steps"] == 2

    # a sequence classifier with a scalar head, trained from the causal LM's backbone
    model_dir = Path(summary["outputs"]["model"])
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["reward_mean"] == summary["reward_mean"]
    assert config["reward_std"] == summary["reward_std"] > 0
    before = load_file(Path(tiny_llama) / "model.safetensors")
    after = load_file(model_dir / "model.safetensors")
    assert all(not torch.equal(before[k], after[k]) for k in after if k in before)

    # The RewardServer scores prompt_text + response_text. Over the training responses its
    # normalised scores have mean 0 and std 1: serving reads exactly what training stored.
    cfg = tiny_cfg("rm", tmp_path / "run")
    tokenizer = load_tokenizer(tiny_llama)
    rows = load_rows(cfg.data, "train", tokenizer).rows
    texts = [(prompt_text(r, cfg.data.template, tokenizer), r) for r in rows]
    episodes = [episode(p, r.chosen) for p, r in texts] + [episode(p, r.rejected) for p, r in texts]
    server = WorkerGroup(RewardServer, "reward", 1, resources=WorkerResources(num_cpus=0),
                         args=(RewardConfig(model=str(model_dir), normalize=True),))
    try:
        scores = torch.tensor(server.call("score", episodes)[0], dtype=torch.float64)
    finally:
        server.shutdown()
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert scores.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)


def test_rm_refuses_instruction_data(tiny_cfg, tmp_path):
    from rlhf_ray.recipes import rm

    with pytest.raises(DataError, match="expected 'preference' for a reward model"):
        rm.run(tiny_cfg("rm", tmp_path / "run", "data.format=instruction"))
    with pytest.raises(DataError, match="look like 'instruction' data, which is for rlhf-ray sft"):
        rm.run(tiny_cfg("rm", tmp_path / "run", "data.format=preference",
                        f"data.source={_instruction_file(tmp_path)}"))


def _instruction_file(tmp_path: Path) -> Path:
    path = tmp_path / "instructions.jsonl"
    path.write_text("\n".join(json.dumps({"instruction": f"Say {i}.", "output": str(i)})
                              for i in range(10)))
    return path
