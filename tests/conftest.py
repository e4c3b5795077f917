"""Shared fixtures: tiny tokenizers and models built from configs (nothing comes from a hub).

The builders live in `fastserve_cli.testing` (the benchmarks use them too); the names below stay importable
from here for tests that import them from conftest.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fastserve_cli.testing.corpus import SAMPLE_MODULES, STDLIB, stdlib_texts
from fastserve_cli.testing.models import make_tiny_model, tiny_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__all__ = ["SAMPLE_MODULES", "STDLIB", "make_tiny_model", "stdlib_texts"]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A 512-token byte-level BPE trained on a few stdlib modules, saved in the HF layout."""
    return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def tiny_model_dir(request, tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A tiny random model directory (gpt2 and llama), loadable by AutoModelForCausalLM."""
    return make_tiny_model(request.param, tiny_tokenizer_dir, tmp_path_factory.mktemp(f"model-{request.param}"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return make_tiny_model("gpt2", tiny_tokenizer_dir, tmp_path_factory.mktemp("model-gpt2"))
