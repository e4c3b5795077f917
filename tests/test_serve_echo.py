"""`echo: true` + `logprobs` on /v1/completions: the prompt's own token log-probabilities, as lm-eval asks for them.

Real `fastserve serve` processes (torch and onnx backends) on 127.0.0.1; the reference is transformers' forward.
"""

from __future__ import annotations

import httpx
import pytest

from fastserve_cli.testing.server import running_server

PROMPT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x = 1\n"


@pytest.fixture(scope="module")
def onnx_dir(tiny_gpt2_dir, tmp_path_factory):
    from fastserve_cli.export.onnx_graph import export_onnx

    out = tmp_path_factory.mktemp("echo-onnx") / "onnx"
    export_onnx(tiny_gpt2_dir, out, parity_steps=2)
    return out


@pytest.fixture(scope="module")
def torch_url(tiny_gpt2_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("echo-serve") / "server.log"
    with running_server(tiny_gpt2_dir, "--model-name", "m", "--scheduler", "fcfs", log_path=log) as (url, _):
        yield url


def reference_logprobs(model_dir, ids: list[int]) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits[:-1].float(), -1)
    return logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def complete(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": "m", **body}, timeout=60)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_prompt_logprobs_match_transformers(backend, request, tiny_gpt2_dir, tmp_path):
    import contextlib

    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_gpt2_dir).encode(PROMPT)
    expected = reference_logprobs(tiny_gpt2_dir, ids)
    if backend == "torch":
        server = contextlib.nullcontext((request.getfixturevalue("torch_url"), None))
    else:
        server = running_server(
            request.getfixturevalue("onnx_dir"),
            "--model-name",
            "m",
            "--scheduler",
            "fcfs",
            log_path=tmp_path / "server.log",
        )
    with server as (url, _):
        # lm-eval's exact request: token ids, echo, one generated token, logprobs 1
        r = complete(url, prompt=[ids, ids[:5]], echo=True, max_tokens=1, logprobs=1, temperature=0, seed=1234)
        assert r.status_code == 200, r.text
        first, second = sorted(r.json()["choices"], key=lambda c: c["index"])
        lp = first["logprobs"]
        assert len(lp["tokens"]) == len(ids) + 1 and len(second["logprobs"]["tokens"]) == 6
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        got = lp["token_logprobs"][1 : len(ids)]
        assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-4
        assert second["logprobs"]["token_logprobs"][1:5] == pytest.approx(expected[:4], abs=1e-4)
        for token_lp, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
            assert max(top.values()) >= token_lp - 1e-6  # the top-1 alternative, plus the prompt token itself
        assert first["text"].startswith(PROMPT) and lp["text_offset"][:2] == [0, len(lp["tokens"][0])]
        assert r.json()["usage"]["completion_tokens"] == 2

        # max_tokens 0: the prompt alone; a string prompt comes back verbatim
        r = complete(url, prompt=PROMPT, echo=True, max_tokens=0, logprobs=0)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["text"] == PROMPT and len(choice["logprobs"]["tokens"]) == len(ids)
        assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)
        assert r.json()["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}

        # the engine still generates normally after scoring (its pack was not touched)
        plain = complete(url, prompt=PROMPT, max_tokens=4, temperature=0, ignore_eos=True)
        echoed = complete(url, prompt=PROMPT, max_tokens=4, temperature=0, ignore_eos=True, echo=True)
        assert echoed.json()["choices"][0]["text"] == PROMPT + plain.json()["choices"][0]["text"]


def test_echo_errors_are_400(torch_url):
    for body, param in [
        ({"prompt": "x", "echo": True, "stream": True}, "echo"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x " * 600, "echo": True, "max_tokens": 0, "logprobs": 1}, "prompt"),
    ]:
        r = complete(torch_url, **body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = httpx.post(
        f"{torch_url}/v1/chat/completions",
        json={"model": "m", "echo": True, "messages": [{"role": "user", "content": "hi"}]},
        timeout=60,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"
