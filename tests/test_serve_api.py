"""The HTTP server as users run it: `fastserve serve` in a real process on 127.0.0.1, httpx and openai clients."""

from __future__ import annotations

import asyncio
import json
import signal

import httpx
import pytest

from fastserve_cli.testing.server import running_server

KEY = "sk-test-123"
NAME = "tiny"


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with running_server(
        tiny_gpt2_dir,
        "--model-name",
        NAME,
        "--max-batch-size",
        "2",
        "--max-queue",
        "4",
        env={"FASTSERVE_API_KEY": KEY},
        log_path=log,
    ) as (url, proc):
        yield url
    assert proc.returncode == 0, log.read_text()[-2000:]


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def post(server, path, body, key=KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server}{path}", json=body, headers=headers, timeout=60)


def sse_events(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


def test_open_endpoints_and_auth(server):
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    assert "fastserve:num_requests_running" in httpx.get(f"{server}/metrics").text
    assert "/v1/chat/completions" in httpx.get(f"{server}/openapi.json").json()["paths"]
    for key in (None, "wrong"):
        r = post(server, "/v1/completions", {"model": NAME, "prompt": "x"}, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    models = httpx.get(f"{server}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert [m["id"] for m in models["data"]] == [NAME]


def test_openai_completion_greedy_equals_generate(client, tiny_gpt2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = "def foo(x):\n    return"
    out = client.completions.create(
        model=NAME, prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    ids = torch.tensor([tok(prompt).input_ids])
    ref = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, eos_token_id=None
    )
    assert out.choices[0].text == tok.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 12 and out.usage.prompt_tokens == ids.shape[1]


def test_chat_and_streaming(client, server):
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hello"}], max_tokens=6)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 6
    stream = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].choices == []
    assert chunks[-2].choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert streamed == whole.choices[0].message.content
    raw = post(server, "/v1/completions", {"model": NAME, "prompt": "x =", "max_tokens": 3, "stream": True})
    events = sse_events(raw.text)
    assert events[-1] == "[DONE]" and json.loads(events[0])["object"] == "text_completion"


def test_n_seed_stop_logprobs(client):
    a = client.completions.create(
        model=NAME, prompt="import", max_tokens=10, n=3, seed=5, temperature=1.2, extra_body={"ignore_eos": True}
    )
    b = client.completions.create(
        model=NAME, prompt="import", max_tokens=10, n=3, seed=5, temperature=1.2, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # each choice has its own stream of randomness
    full = (
        client.completions.create(
            model=NAME, prompt="def", max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    stop = full.strip()[3:6] if len(full.strip()) >= 6 else full.strip()[-1:]
    cut = client.completions.create(
        model=NAME, prompt="def", max_tokens=20, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
    ).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(stop)]
    lp = (
        client.completions.create(model=NAME, prompt="def", max_tokens=4, temperature=0, logprobs=3).choices[0].logprobs
    )
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) <= 4
    assert all(
        len(top) <= 3 and max(top.values()) == pytest.approx(lp_)
        for top, lp_ in zip(lp.top_logprobs, lp.token_logprobs)
    )
    chat = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "a"}], max_tokens=3, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert content and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "x " * 600}, "prompt"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "tools": [{"type": "function"}]}, "tools"),
        ({"prompt": "x", "response_format": {"type": "xml"}}, "response_format.type"),
        ({"prompt": "x", "temperature": 5}, "temperature"),
    ],
)
def test_invalid_requests_are_400_in_openai_shape(server, body, param):
    r = post(server, "/v1/completions", {"model": NAME, **body})
    assert r.status_code == 400
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param


def test_bad_json_and_openai_errors(server, client):
    import openai

    r = httpx.post(
        f"{server}/v1/completions",
        content=b"{nope",
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):  # as OpenAI: an unknown model is a 404 model_not_found
        client.completions.create(model="other", prompt="x")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="bad", max_retries=0).models.list()


def test_queue_full_is_429(server):
    """--max-batch-size 2 --max-queue 4: a burst of 12 long requests gets some 429s, the rest finish."""

    async def burst():
        async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as http:
            body = {"model": NAME, "prompt": "for i in", "max_tokens": 60, "ignore_eos": True}
            return await asyncio.gather(*[http.post(f"{server}/v1/completions", json=body) for _ in range(12)])

    codes = [r.status_code for r in asyncio.run(burst())]
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}


def test_disconnect_cancels_request(server):
    def aborted() -> float:
        for line in httpx.get(f"{server}/metrics").text.splitlines():
            if line.startswith("fastserve:request_success_total") and 'finished_reason="abort"' in line:
                return float(line.split()[-1])
        return 0.0

    before = aborted()
    body = {"model": NAME, "prompt": "x", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        for _ in zip(range(3), r.iter_lines()):
            pass
    for _ in range(100):
        if aborted() > before:
            break
        asyncio.run(asyncio.sleep(0.1))
    assert aborted() == before + 1
    metrics = httpx.get(f"{server}/metrics").text
    assert 'fastserve:num_requests_running{model_name="tiny"} 0.0' in metrics


def test_sigterm_finishes_inflight_stream_and_exits_0(tiny_gpt2_dir):
    body = {"model": tiny_gpt2_dir.name, "prompt": "x", "max_tokens": 40, "ignore_eos": True, "stream": True}
    with running_server(tiny_gpt2_dir) as (url, proc):
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        assert json.loads(first[6:])["choices"] and rest[-1] == "data: [DONE]"
        assert proc.wait(timeout=30) == 0


def test_503_while_the_model_loads(tiny_gpt2_dir):
    """A real uvicorn server whose (real) loader is held back: 503 in OpenAI's shape, then 200."""
    import threading

    import uvicorn

    from fastserve_cli.core.recipe import ServeConfig
    from fastserve_cli.serve import ServeTarget, build_engine
    from fastserve_cli.serve.api import ServerState, create_app
    from fastserve_cli.testing.server import free_port, wait_ready

    gate = threading.Event()

    def loader():
        gate.wait(60)
        return build_engine(ServeTarget(tiny_gpt2_dir, "torch", "tiny"), ServeConfig(kv_cache_memory="64MiB"))

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(ServerState("tiny", None, loader)), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x"})
                break
            except httpx.TransportError:
                asyncio.run(asyncio.sleep(0.05))
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        assert httpx.get(f"{url}/health").status_code == 503
        gate.set()
        wait_ready(url, timeout=60)
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
    finally:
        gate.set()
        server.should_exit = True
        thread.join(30)


def test_targets_run_dir_recipe_and_user_errors(tiny_gpt2_dir, tmp_path):
    """TARGET may be a recipe or a run directory (serve.source picks model/, onnx/ or a variant); mistakes
    are one-line user errors with exit code 2 before anything starts."""
    import shutil
    import subprocess
    import sys

    from fastserve_cli.cli import load_target
    from fastserve_cli.serve import resolve_target

    run = tmp_path / "runs" / "demo"
    shutil.copytree(tiny_gpt2_dir, run / "model")
    recipe_path = tmp_path / "demo.yaml"
    recipe_path.write_text(f"name: demo\nrun_dir: {run}\nserve:\n  model_name: served\n")
    target = resolve_target(recipe_path, None, None, load_target(str(recipe_path), []))
    assert (target.model_dir, target.backend, target.name) == (run / "model", "torch", "served")
    (run / "recipe.yaml").write_text(recipe_path.read_text())
    target = resolve_target(run, None, None, load_target(str(run), []))
    assert target.model_dir == run / "model" and target.run_dir == run
    cli = [sys.executable, "-m", "fastserve_cli", "serve"]
    for args, message in [
        ([str(run), "--source", "onnx"], "nothing to serve for source 'onnx'"),
        ([str(tmp_path / "nope")], "no such"),
        ([str(tiny_gpt2_dir), "--kv-cache-memory", "lots"], "--kv-cache-memory 'lots'"),
        ([str(tiny_gpt2_dir), "--backend", "onnx"], "needs model.onnx"),
        ([str(tiny_gpt2_dir), "--set", "serve.backend=onnx"], "needs model.onnx"),
    ]:
        proc = subprocess.run(cli + args, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
