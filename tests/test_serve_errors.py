"""Malformed requests get a 4xx in OpenAI's error shape, never a 500; the server starts on short-context models.

A real `fastserve serve` process on 127.0.0.1 with httpx (raw bodies, to send what the openai client would
refuse to build) and the official openai client.
"""

from __future__ import annotations

import httpx
import pytest
from serve_helpers import make_short_context_model

from fastserve_cli.testing.server import running_server

KEY = "sk-errors"
NAME = "tiny"


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-errors") / "server.log"
    with running_server(tiny_gpt2_dir, "--model-name", NAME, env={"FASTSERVE_API_KEY": KEY}, log_path=log) as (
        url,
        proc,
    ):
        yield url
    text = log.read_text()
    assert proc.returncode == 0 and "Traceback" not in text, text[-3000:]


def raw_post(server: str, path: str, raw_json: str) -> httpx.Response:
    """POST a JSON text as is (so escapes like \\ud800 reach the server unchanged)."""
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    return httpx.post(f"{server}{path}", content=raw_json.encode("ascii"), headers=headers, timeout=60)


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize(
    "path, raw, param",
    [
        ("/v1/completions", '{"model": "tiny", "prompt": "a\\ud800b"}', "prompt"),
        ("/v1/completions", '{"model": "tiny", "prompt": ["ok", "\\udfff"]}', "prompt[1]"),
        ("/v1/completions", '{"model": "tiny", "prompt": "x", "stop": ["\\ud800"]}', "stop[0]"),
        ("/v1/completions", '{"model": "\\ud800", "prompt": "x"}', "model"),
        ("/v1/completions", '{"model": "tiny", "prompt": "x", "\\ud800": 1}', None),
        (
            "/v1/chat/completions",
            '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
            "messages[0].content",
        ),
        (
            "/v1/chat/completions",
            '{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}',
            "messages[0].content[0].text",
        ),
    ],
)
def test_lone_surrogate_is_400(server, path, raw, param):
    error = assert_openai_error(raw_post(server, path, raw), 400, param)
    assert "surrogate" in error["message"]


def test_paired_surrogates_are_text(server):
    """An emoji sent as a JSON surrogate pair is ordinary text."""
    r = raw_post(server, "/v1/completions", '{"model": "tiny", "prompt": "hi \\ud83d\\ude00", "max_tokens": 2}')
    assert r.status_code == 200, r.text


def test_any_integer_seed_is_folded_to_64_bits(server):
    """A seed past 64 bits used to crash torch.manual_seed (a 500); its low 64 bits are used instead."""

    def texts(seed: int) -> list[str]:
        body = f'{{"model": "tiny", "prompt": "x", "max_tokens": 4, "n": 2, "seed": {seed}, "ignore_eos": true}}'
        r = raw_post(server, "/v1/completions", body)
        assert r.status_code == 200, r.text
        return [c["text"] for c in r.json()["choices"]]

    for seed in (2**63 - 1, -(2**63), -1, 10**40):
        assert len(texts(seed)) == 2
    assert texts(2**64 + 5) == texts(5)
    assert_openai_error(
        raw_post(server, "/v1/completions", '{"model": "tiny", "prompt": "x", "seed": 1.5}'), 400, "seed"
    )


@pytest.mark.parametrize(
    "raw, param",
    [
        ('{"model": "tiny", "prompt": "x", "temperature": NaN}', "temperature"),
        ('{"model": "tiny", "prompt": "x", "top_p": Infinity}', "top_p"),
        ('{"model": "tiny", "prompt": [[]]}', "prompt"),
        ('{"model": "tiny", "prompt": [1, 99999999999999999999999]}', "prompt"),
        ('{"model": "tiny", "prompt": "x", "max_tokens": 99999999999999999999999}', "max_tokens"),
        ('{"model": "tiny", "prompt": "x", "top_k": 99999999999999999999999, "max_tokens": 1}', None),
        ("[1, 2]", None),
        ('"just a string"', None),
        ("{}", "model"),
    ],
)
def test_odd_values_are_4xx(server, raw, param):
    r = raw_post(server, "/v1/completions", raw)
    if param is None and r.status_code == 200:  # a huge top_k is simply "no top-k"
        return
    assert_openai_error(r, 400, param)


def test_unknown_model_route_and_method_are_openai_shaped(server):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert info.value.body["code"] == "model_not_found"
    assert_openai_error(httpx.get(f"{server}/v1/nope"), 404)
    assert_openai_error(httpx.get(f"{server}/v1/completions"), 405)


def test_default_scheduler_starts_on_a_64_token_model(tiny_tokenizer_dir, tmp_path):
    """The skip-join MLFQ's start-up profile used to decode at position 64 and fail loading."""
    model = make_short_context_model(tiny_tokenizer_dir, tmp_path / "ctx64", 64)
    with running_server(model, "--model-name", "short", log_path=tmp_path / "log") as (url, _):
        body = {"model": "short", "prompt": "x", "max_tokens": 60, "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 60, r.text
        too_long = httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 64}, timeout=60)
        assert_openai_error(too_long, 400, "max_tokens")


@pytest.mark.parametrize("context", [8, 12, 64])
def test_profile_fits_every_trainable_context(tiny_tokenizer_dir, tmp_path, context):
    """block_size may be as small as 8 (recipe bound): the profile stays inside the model's positions."""
    from fastserve_cli.serve.backends import TorchBackend
    from fastserve_cli.serve.profile import measure_backend

    backend = TorchBackend(make_short_context_model(tiny_tokenizer_dir, tmp_path / "m", context), device="cpu")
    backend.max_rows = 2
    profile = measure_backend(backend, batch_size=2)
    assert profile.decode_s > 0 and max(profile.lengths) < context
