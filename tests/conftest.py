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


@pytest.fixture(scope="session")
def tiny_onnx_dir(tmp_path_factory, tiny_gpt2_dir) -> Path:
    """The tiny GPT-2 exported to ONNX (the export stage's layout)."""
    from fastserve_cli.export.onnx_graph import export_onnx

    out = tmp_path_factory.mktemp("onnx-gpt2") / "onnx"
    export_onnx(tiny_gpt2_dir, out, parity_steps=2)
    return out


def _served(target: Path, backend: str, log: Path):
    """A `fastserve serve` process (model name 'tiny', no API key): yields (url, openai client, backend)."""
    from openai import OpenAI

    from fastserve_cli.testing.server import running_server

    with running_server(target, "--model-name", "tiny", "--backend", backend, log_path=log) as (url, proc):
        yield url, OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60), backend
    text = log.read_text()
    assert proc.returncode == 0 and "Traceback" not in text, text[-3000:]


@pytest.fixture(scope="session")
def tiny_torch_server(tiny_gpt2_dir, tmp_path_factory):
    yield from _served(tiny_gpt2_dir, "torch", tmp_path_factory.mktemp("serve-torch") / "server.log")


@pytest.fixture(scope="session")
def tiny_onnx_server(tiny_onnx_dir, tmp_path_factory):
    yield from _served(tiny_onnx_dir, "onnx", tmp_path_factory.mktemp("serve-onnx") / "server.log")


@pytest.fixture(params=["torch", "onnx"])
def tiny_server(request):
    """The API feature tests' server, once per backend (each server is shared by the whole session)."""
    return request.getfixturevalue(f"tiny_{request.param}_server")
