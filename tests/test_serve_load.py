"""Slow end-to-end checks: the load test (shortened) and the onnx backend behind the real server."""

from __future__ import annotations

import pytest

from fastserve_cli.testing.load import load_test


@pytest.mark.slow
def test_64_streaming_clients(tiny_gpt2_dir, tmp_path):
    """The issue's load test is 64 clients x 60 s (scripts/load_serve.py); CI runs 10 s of it."""
    report = load_test(tiny_gpt2_dir, clients=64, duration=10, log_path=tmp_path / "log")
    assert report.errors == [] and report.missing_done == 0 and report.requests >= 64
    assert report.rss_growth <= 0.10, (report.rss_warm_mib, report.rss_mid_mib, report.rss_after_mib)


@pytest.mark.slow
def test_onnx_server_greedy_equals_generate(tiny_model_dir, tmp_path):
    import torch
    from openai import OpenAI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastserve_cli.export.onnx_graph import export_onnx
    from fastserve_cli.testing.server import running_server

    export_onnx(tiny_model_dir, tmp_path / "onnx", parity_steps=2)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = ["def foo(x):\n    return", "import os\nimport sys\n", "class A:\n"]
    with running_server(tmp_path / "onnx", "--backend", "onnx", "--model-name", "m") as (url, _):
        client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        out = client.completions.create(
            model="m", prompt=prompts, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
        )
    for prompt, choice in zip(prompts, out.choices):
        ids = torch.tensor([tok(prompt).input_ids])
        ref = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False, eos_token_id=None
        )
        assert choice.text == tok.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)
