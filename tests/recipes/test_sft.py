"""rlhf-ray sft on the tiny model: a two-step run, its outputs, and clear errors for bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rlhf_ray.assets import AssetError
from rlhf_ray.config_loader import ConfigError, to_dict
from rlhf_ray.data import DataError

ROOT = Path(__file__).resolve().parents[2]

VLLM_SCRIPT = """
import json, sys
from rlhf_ray.workers.engine import make_llm, shutdown_llm

if __name__ == "__main__":
    from vllm import SamplingParams, TokensPrompt

    llm = make_llm(sys.argv[1], dtype="float32", max_model_len=256)
    try:
        out = llm.generate([TokensPrompt(prompt_token_ids=json.loads(sys.argv[2]))],
                           SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                           use_tqdm=False)
        print("TOKENS", json.dumps(list(out[0].outputs[0].token_ids)))
    finally:
        shutdown_llm(llm)
"""


def changed_tensors(before: str, after: str) -> tuple[int, int]:
    a = load_file(Path(before) / "model.safetensors")
    b = load_file(Path(after) / "model.safetensors")
    shared = [k for k in a if k in b]
    return sum(not torch.equal(a[k], b[k]) for k in shared), len(shared)


def test_sft_two_steps_outputs_load_in_transformers_and_vllm(tiny_run, tiny_cfg, tiny_llama,
                                                             tmp_path):
    run = tmp_path / "run"
    summary = tiny_run("sft", run, "logging.wandb_mode=offline")
    m = summary["metrics"]

    # loss finite, both held-out evaluations logged, parameters changed
    assert summary["steps"] == 2 and summary["start_step"] == 0
    for key in ("policy/loss", "eval/loss", "eval/perplexity", "policy/grad_norm"):
        assert math.isfinite(m[key]["first"]) and math.isfinite(m[key]["final"]), key
    assert m["eval/perplexity"]["final"] == pytest.approx(math.exp(m["eval/loss"]["final"]))
    changed, total = changed_tensors(tiny_llama, summary["outputs"]["model"])
    assert changed == total, f"only {changed} of {total} tensors changed"

    # the run folder: resolved config, summary, checkpoints, W&B offline run, phases
    resolved = to_dict(tiny_cfg("sft", run, "logging.wandb_mode=offline"))
    assert yaml.safe_load((run / "config.yaml").read_text()) == resolved
    assert json.loads((run / "summary.json").read_text())["metrics"] == m
    kept = [p.name for p in sorted((run / "checkpoints").iterdir())]
    assert kept == ["step_00000001", "step_00000002"]
    assert summary["outputs"]["checkpoint"].endswith("step_00000002")
    assert list((run / "wandb").glob("offline-run-*"))
    assert {"start", "eval", "train", "checkpoint", "export"} <= set(summary["phases_s"])
    assert Path(summary["outputs"]["plot"]).stat().st_size > 1000  # learning curves

    # the exported folder loads in transformers ...
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = summary["outputs"]["model"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = tokenizer("Below is an instruction that describes a task.")["input_ids"]
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                            min_new_tokens=8)[0, len(prompt):].tolist()
    # ... and in vLLM (in a subprocess, keeping vLLM out of pytest), with the same greedy tokens
    script = tmp_path / "load_vllm.py"
    script.write_text(VLLM_SCRIPT)
    out = subprocess.run([sys.executable, str(script), model_dir, json.dumps(prompt)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env=os.environ)
    assert out.returncode == 0, out.stderr[-3000:]
    tokens = json.loads(out.stdout.split("TOKENS", 1)[1])
    assert tokens == hf


def test_sft_packing_with_chat_template(tiny_run, tmp_path):
    summary = tiny_run("sft", tmp_path, "data.packing=true", "data.template=chat", "max_steps=1",
                     "checkpoint.save_every=0")
    m = summary["metrics"]
    assert summary["steps"] == 1 and math.isfinite(m["policy/loss"]["final"])
    # packs hold several rows: fewer training sequences than rows
    assert m["data/train_examples"]["final"] < 38


# --------------------------------------------------------------------------- bad input (no Ray)


def test_preference_data_given_to_sft_says_what_it_is(tiny_cfg, tmp_path):
    from rlhf_ray.recipes import sft

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"prompt": f"What is {i} + 1?", "chosen": str(i + 1),
                                           "rejected": str(i + 2)}) for i in range(20)))
    with pytest.raises(DataError, match="look like 'preference' data, which is for rlhf-ray rm or "
                                        "rlhf-ray dpo"):
        sft.run(tiny_cfg("sft", tmp_path / "run", f"data.source={pairs}"))
    with pytest.raises(DataError, match="expected 'instruction' or 'conversation' for SFT"):
        sft.run(tiny_cfg("sft", tmp_path / "run", f"data.source={pairs}", "data.format=preference"))
    assert not (tmp_path / "run").exists(), "a failed data check must not create the run folder"


def test_bad_paths_and_impossible_sizes_are_clear_errors(tiny_cfg, tmp_path):
    from rlhf_ray.recipes import sft

    with pytest.raises(AssetError, match="sft model: model path '.*nope' does not exist"):
        sft.run(tiny_cfg("sft", tmp_path / "run", f"model.path={tmp_path / 'nope'}"))
    with pytest.raises(DataError, match="missing.jsonl: does not exist"):
        sft.run(tiny_cfg("sft", tmp_path / "run", f"data.source={tmp_path / 'missing.jsonl'}"))
    with pytest.raises(ConfigError, match="batch_size: 64 is larger than the 38 training examples"):
        sft.run(tiny_cfg("sft", tmp_path / "run", "batch_size=64"))
    with pytest.raises(ConfigError, match="cannot feed learner.num_workers=4 ranks"):
        tiny_cfg("sft", tmp_path / "run", "batch_size=2", "learner.num_workers=4")


def test_cli_reports_a_missing_model_without_a_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rlhf_ray.cli", "sft",
                          str(ROOT / "launch" / "configs" / "sft_tiny.yaml"),
                          f"run_dir={tmp_path}", f"model.path={tmp_path / 'nope'}"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 1
    assert "error: sft model: model path" in out.stderr and "Traceback" not in out.stderr
