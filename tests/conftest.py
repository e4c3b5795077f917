"""Shared fixtures: tiny tokenizers and models built from configs (nothing comes from a hub)."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SAMPLE_MODULES = ["json/__init__.py", "json/decoder.py", "json/encoder.py", "textwrap.py", "string.py",
                  "heapq.py", "bisect.py", "fnmatch.py", "glob.py", "shlex.py", "colorsys.py", "keyword.py"]


def stdlib_texts() -> list[str]:
    return [(STDLIB / name).read_text(encoding="utf-8") for name in SAMPLE_MODULES]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A 512-token byte-level BPE trained on a few stdlib modules, saved in the HF layout."""
    from fastserve_cli.core.tokenizer import train_bpe

    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer = train_bpe(stdlib_texts(), vocab_size=512, min_frequency=2, eos_token="<|endoftext|>",
                          pad_token="<|pad|>", extra_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.save_pretrained(path)
    return path


def make_tiny_model(architecture: str, tokenizer_dir: Path, out: Path, seed: int = 0) -> Path:
    """A 2-layer, 64-wide model with random weights, saved with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if architecture == "gpt2":
        config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=512, **common)
    elif architecture == "llama":
        config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=512, **common)
    else:
        raise ValueError(architecture)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    return out


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
    from fastserve_cli.models.onnx import export_onnx

    out = tmp_path_factory.mktemp("onnx-gpt2") / "onnx"
    export_onnx(tiny_gpt2_dir, out, parity_steps=2)
    return out


def _served(target: Path, backend: str, log: Path):
    """A `fastserve serve` process (model name 'tiny', no API key): yields (url, openai client, backend)."""
    from openai import OpenAI

    from fastserve_cli.serve.launch import running_server

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
