"""serve.dtype bf16: the torch backend in bf16 (weights, activations, KV cache) agrees with fp32 greedy,
serves end to end through the official openai client, and bad configurations are one-line user errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
from test_serve_engine import greedy_requests

from fastserve_cli.core.errors import UserError
from fastserve_cli.models.precision import cpu_supports_bf16, resolve_dtype
from fastserve_cli.testing.engine import run_until_finished
from fastserve_cli.testing.server import running_server

needs_bf16 = pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no avx512_bf16/AMX")


@pytest.fixture(scope="module")
def peaked_gpt2_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny GPT-2 whose random logits have real margins (initializer_range 0.2), so greedy ties are rare
    and fp32/bf16 agreement measures the arithmetic, not coin flips between near-equal tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

    out = tmp_path_factory.mktemp("model-peaked")
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    config = GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        n_positions=512,
        vocab_size=len(tok),
        initializer_range=0.2,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def engine(model_dir, dtype: str):
    from transformers import AutoTokenizer

    from fastserve_cli.serve.backends import load_backend
    from fastserve_cli.serve.engine import Engine
    from fastserve_cli.serve.kv_cache import KVCacheManager
    from fastserve_cli.serve.metrics import Metrics
    from fastserve_cli.serve.scheduler import make_scheduler

    be = load_backend("torch", model_dir, dtype=dtype)
    kv = KVCacheManager(be, 100_000 * be.kv_bytes_per_token, 100_000 * be.kv_bytes_per_token)
    return Engine(
        be,
        make_scheduler("fcfs"),
        kv,
        AutoTokenizer.from_pretrained(model_dir),
        Metrics("t"),
        max_batch_size=4,
        token_budget=512,
    )


def greedy(model_dir, dtype: str, n: int = 24):
    eng = engine(model_dir, dtype)
    reqs = greedy_requests(eng.tokenizer, [n] * 5)
    run_until_finished(eng, reqs)
    return eng, [r.output_ids for r in reqs]


def matching_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@needs_bf16
def test_bf16_engine_agrees_with_fp32_and_halves_kv(peaked_gpt2_dir):
    import torch

    fp32, ref = greedy(peaked_gpt2_dir, "fp32")
    bf16, got = greedy(peaked_gpt2_dir, "bf16")
    assert next(bf16.backend.model.parameters()).dtype == torch.bfloat16
    assert bf16.backend.packed.layers[0][0].dtype == torch.bfloat16
    assert bf16.backend.kv_bytes_per_token * 2 == fp32.backend.kv_bytes_per_token
    agreed = sum(matching_prefix(a, b) for a, b in zip(ref, got)) / sum(len(a) for a in ref)
    assert agreed >= 0.8, (agreed, ref, got)
    assert sum(a == b for a, b in zip(ref, got)) >= 3


@needs_bf16
@pytest.mark.slow
def test_bf16_server_end_to_end(peaked_gpt2_dir, tmp_path):
    """`fastserve serve --dtype bf16` answers the openai client; greedy text equals the bf16 engine's."""
    from openai import OpenAI
    from test_serve_engine import PROMPTS

    _, direct = greedy(peaked_gpt2_dir, "bf16", n=12)
    with running_server(
        peaked_gpt2_dir, "--dtype", "bf16", "--max-batch-size", "4", "--threads", "1", log_path=tmp_path / "server.log"
    ) as (url, proc):
        client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        outs = [
            client.completions.create(
                model=peaked_gpt2_dir.name, prompt=p, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
            )
            for p in PROMPTS
        ]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(peaked_gpt2_dir)
    assert all(o.usage.completion_tokens == 12 for o in outs)
    same = sum(o.choices[0].text == tok.decode(d, skip_special_tokens=True) for o, d in zip(outs, direct))
    assert same >= 4, [(o.choices[0].text, tok.decode(d)) for o, d in zip(outs, direct)]


def test_bad_dtype_configs_are_user_errors(tiny_gpt2_dir, tmp_path, monkeypatch):
    from fastserve_cli.serve.backends import load_backend

    cli = subprocess.run(
        [sys.executable, "-m", "fastserve_cli", "serve", str(tiny_gpt2_dir), "--dtype", "fp16"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 2 and "dtype" in cli.stderr and "Traceback" not in cli.stderr, cli.stderr
    with pytest.raises(UserError, match="torch backend"):
        load_backend("onnx", tiny_gpt2_dir, dtype="bf16")
    with pytest.raises(UserError, match="unknown"):
        resolve_dtype("fp8", "cpu")
    import fastserve_cli.models.precision as precision

    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)  # a CPU without avx512_bf16/AMX
    with pytest.raises(UserError, match="avx512_bf16"):
        load_backend("torch", tiny_gpt2_dir, dtype="bf16")


@needs_bf16
def test_bf16_refuses_quantized_variant(tiny_gpt2_dir, tmp_path):
    from fastserve_cli.models.loader import load_causal_lm
    from fastserve_cli.models.quantized import quantize_model, save_quantized
    from fastserve_cli.serve.backends import load_backend

    model = load_causal_lm(tiny_gpt2_dir)
    modules = quantize_model(model, "dynamic_int8")
    (tmp_path / "int8").mkdir()
    save_quantized(model, "dynamic_int8", modules, tiny_gpt2_dir, tmp_path / "int8")
    with pytest.raises(UserError, match="quantized"):
        load_backend("torch", tmp_path / "int8", dtype="bf16")
