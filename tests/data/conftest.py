"""Shared fixtures for the rlhf_ray.data tests: the real SmolLM2 tokenizer and fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tok():
    """The SmolLM2 tokenizer of the tiny-llama asset (eos = pad = <|im_end|>, no BOS)."""
    from rlhf_ray.assets import ensure
    from rlhf_ray.data import load_tokenizer

    return load_tokenizer(ensure("tiny-llama"))
