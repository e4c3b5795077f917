"""`fastserve serve --replicas 2` on a real local Ray instance: the official openai client through the ingress,
greedy output equal to the single-process server, each router's choices in /metrics, a replica SIGKILLed
during a burst, and the bad configurations. One Ray instance (started here) and one least-loaded app are
shared by the module; the ingress runs as a real `fastserve serve` process that joins that instance."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from fastserve_cli.testing.server import running_server

pytestmark = pytest.mark.slow
pytest.importorskip("ray.serve")

KEY = "sk-cluster"
NAME = "tiny"
PROXY: dict[str, int] = {}
LONG_PREFIX = "You are a helpful assistant. Answer briefly and cite the module you used for it. " * 3


@pytest.fixture(scope="module")
def ray_address():
    import ray
    from ray import serve

    from fastserve_cli.testing.server import free_port

    ray.init(num_cpus=8, include_dashboard=False, logging_level="WARNING")  # logical CPUs: replicas ask 0.5
    try:
        # Serve's HTTP proxy, for the KubeRay-style application test (ingress processes leave it as it is).
        PROXY["port"] = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": PROXY["port"]})
        yield ray.get_runtime_context().gcs_address
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


def cluster_args(address: str, router: str = "least-loaded") -> list[str]:
    return [
        "--replicas",
        "2",
        "--ray-address",
        address,
        "--router",
        router,
        "--threads",
        "1",
        "--model-name",
        NAME,
        "--max-batch-size",
        "4",
        "--set",
        "serve.replica_cpus=0.5",
    ]


@pytest.fixture(scope="module")
def cluster(tiny_gpt2_dir, ray_address, tmp_path_factory):
    log = tmp_path_factory.mktemp("cluster") / "ingress.log"
    with running_server(
        tiny_gpt2_dir, *cluster_args(ray_address), env={"FASTSERVE_API_KEY": KEY}, log_path=log, ready=False
    ) as (url, proc):
        wait_replicas(url, 2)
        yield url, proc
    assert proc.returncode == 0, log.read_text()[-3000:]  # SIGTERM: drained, app deleted, exit 0


@pytest.fixture(scope="module")
def single(tiny_gpt2_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("single") / "server.log"
    with running_server(
        tiny_gpt2_dir,
        "--model-name",
        NAME,
        "--threads",
        "1",
        "--max-batch-size",
        "4",
        env={"FASTSERVE_API_KEY": KEY},
        log_path=log,
    ) as (url, _):
        yield url


def client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)


def health(url: str) -> tuple[int, dict]:
    r = httpx.get(f"{url}/health", timeout=10)
    return r.status_code, r.json()


def wait_replicas(url: str, count: int, timeout: float = 300) -> dict:
    """Until /health lists `count` replicas that reported their load (start-up on a busy 2-core VM is slow)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            code, last = health(url)
            if code == 200 and last["replicas_up"] == count and all(r["pid"] for r in last["replicas"]):
                return last
        except httpx.HTTPError as err:
            last = err
        time.sleep(0.5)
    raise TimeoutError(f"{url}: {count} replicas not up after {timeout} s: {last!r}")


def metric(url: str, name: str, **labels: str) -> dict[str, float]:
    """Samples of `name` matching `labels`, keyed by their replica label (or '')."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                key = s.labels.get("replica", "")
                out[key] = out.get(key, 0.0) + s.value
    return out


def test_health_and_metrics_name_both_replicas(cluster):
    url, _ = cluster
    code, body = health(url)
    assert code == 200 and body["replicas_up"] == 2 and len({r["pid"] for r in body["replicas"]}) == 2
    deadline = time.monotonic() + 20  # replica pages arrive with the routing stats (every 0.5 s)
    while len(metric(url, "fastserve:num_requests_running")) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert set(metric(url, "fastserve:num_requests_running")) == {r["replica"] for r in body["replicas"]}
    assert metric(url, "fastserve:cluster_replicas_up") == {"": 2.0}
    r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "x"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_completions_chat_and_streams_equal_the_single_process_server(cluster, single):
    url, _ = cluster
    remote, local = client(url), client(single)
    for prompt in ("def foo(x):\n    return", "import os\n", LONG_PREFIX + "Which module?"):
        kwargs = dict(
            model=NAME, prompt=prompt, max_tokens=12, temperature=0, logprobs=2, extra_body={"ignore_eos": True}
        )
        a, b = remote.completions.create(**kwargs), local.completions.create(**kwargs)
        assert a.choices[0].text == b.choices[0].text and a.usage == b.usage
        assert a.choices[0].logprobs.tokens == b.choices[0].logprobs.tokens
        streamed = "".join(c.choices[0].text for c in remote.completions.create(**kwargs, stream=True) if c.choices)
        assert streamed == a.choices[0].text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    chat = dict(model=NAME, messages=messages, max_tokens=10, temperature=0)
    a, b = remote.chat.completions.create(**chat), local.chat.completions.create(**chat)
    assert a.choices[0].message.content == b.choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or "" for c in remote.chat.completions.create(**chat, stream=True) if c.choices
    )
    assert streamed == a.choices[0].message.content
    n = remote.completions.create(model=NAME, prompt="for i in", max_tokens=6, n=3, seed=5, stop=["\n"])
    assert [c.index for c in n.choices] == [0, 1, 2] and all("\n" not in c.text for c in n.choices)
    assert metric(url, "fastserve:router_requests_total", policy="least-loaded", decision="p2c")
    # structured outputs and logit_bias reach the replicas (each compiles the grammar itself)
    choice = dict(
        model=NAME,
        prompt="pick:",
        max_tokens=8,
        temperature=1.0,
        seed=3,
        extra_body={"guided_choice": ["alpha", "beta"]},
    )
    assert remote.completions.create(**choice).choices[0].text == local.completions.create(**choice).choices[0].text
    assert remote.completions.create(**choice).choices[0].text in ("alpha", "beta")
    biased = dict(model=NAME, prompt="x", max_tokens=3, temperature=0, logit_bias={"7": 100})
    assert remote.completions.create(**biased).choices[0].text == local.completions.create(**biased).choices[0].text


def test_client_disconnect_cancels_on_the_replica(cluster):
    url, _ = cluster

    def aborted() -> float:
        return sum(metric(url, "fastserve:request_success_total", finished_reason="abort").values())

    before = aborted()
    body = {"model": NAME, "prompt": "x", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream(
        "POST", f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ) as r:
        for _ in zip(range(3), r.iter_lines()):
            pass
    deadline = time.monotonic() + 30
    while aborted() == before and time.monotonic() < deadline:
        time.sleep(0.3)
    assert aborted() == before + 1


def test_round_robin_and_prefix_routers_in_metrics(tiny_gpt2_dir, ray_address, tmp_path):
    with contextlib.ExitStack() as stack:  # both apps load at once (one Ray instance)
        rr = stack.enter_context(
            running_server(
                tiny_gpt2_dir,
                *cluster_args(ray_address, "round-robin"),
                "--max-queue",
                "2",
                "--max-batch-size",
                "1",
                *("--set", "serve.ray_transport=object-ref"),  # the other transport (the module's app: grpc)
                *("--set", "serve.replica_stream_interval=3"),  # 3 tokens per item after the first
                log_path=tmp_path / "rr.log",
                ready=False,
            )
        )[0]
        px = stack.enter_context(
            running_server(
                tiny_gpt2_dir, *cluster_args(ray_address, "prefix"), log_path=tmp_path / "prefix.log", ready=False
            )
        )[0]
        wait_replicas(rr, 2)
        wait_replicas(px, 2)
        for _ in range(6):
            client(rr).completions.create(model=NAME, prompt="x", max_tokens=2)
        per_replica = metric(rr, "fastserve:router_requests_total", policy="round-robin", decision="rr")
        assert sorted(per_replica.values()) == [3.0, 3.0]
        whole = client(rr).completions.create(model=NAME, prompt="def f(", max_tokens=8, temperature=0)
        chunks = client(rr).completions.create(model=NAME, prompt="def f(", max_tokens=8, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
        codes = asyncio.run(burst(rr, 16))  # 2 replicas x (1 running + 2 waiting) fit; the rest get 429
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        assert sum(metric(rr, "fastserve:router_rejected_total").values()) >= 1
        for i in range(6):
            client(px).completions.create(model=NAME, prompt=LONG_PREFIX + f"question {i}?", max_tokens=2)
        client(px).completions.create(model=NAME, prompt="short", max_tokens=2)
        hits = metric(px, "fastserve:router_requests_total", policy="prefix", decision="prefix_hit")
        assert list(hits.values()) == [6.0]  # one replica took every request of that prefix
        assert sum(metric(px, "fastserve:router_requests_total", decision="no_prefix").values()) == 1.0


async def burst(url: str, count: int) -> list[int]:
    async with httpx.AsyncClient(timeout=120) as http:
        body = {"model": NAME, "prompt": "for i in", "max_tokens": 40, "ignore_eos": True}
        responses = await asyncio.gather(*[http.post(f"{url}/v1/completions", json=body) for _ in range(count)])
    for r in responses:
        if r.status_code == 429:
            assert r.json()["error"]["type"] == "rate_limit_error"
    return [r.status_code for r in responses]


def test_bad_configurations(tiny_gpt2_dir, ray_address, tmp_path):
    no_ray = (
        "import sys; sys.modules['ray'] = None; from fastserve_cli.cli import main; "
        f"main(['serve', {str(tiny_gpt2_dir)!r}, '--replicas', '2'])"
    )
    r = subprocess.run([sys.executable, "-c", no_ray], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "fastserve[ray]" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "fastserve_cli", "serve", str(tiny_gpt2_dir), "--replicas", "2", "--router", "random"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "router" in r.stderr, r.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_gpt2_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a checkpoint")
    port = str(_free_port())
    r = subprocess.run(
        [sys.executable, "-m", "fastserve_cli", "serve", str(broken), "--port", port, *cluster_args(ray_address)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("error: replica on node ") and str(broken) in last, r.stderr[-3000:]


def test_the_same_app_as_a_serve_application_for_kuberay(tiny_gpt2_dir, ray_address):
    """deploy/rayservice.yaml's import path, run the way KubeRay runs it: behind Ray Serve's HTTP proxy."""
    from ray import serve

    from fastserve_cli.serve.cluster.app import build_app

    args = {
        "target": str(tiny_gpt2_dir),
        "replicas": "2",
        "router": "round-robin",
        "replica_cpus": "0.5",
        "num_threads": "1",
        "model_name": NAME,
        "app_name": "kuberay",
    }
    serve.run(build_app(args), name="kuberay", route_prefix="/")
    try:
        url = f"http://127.0.0.1:{PROXY['port']}"
        wait_replicas(url, 2)
        for _ in range(2):
            out = client(url).completions.create(model=NAME, prompt="def foo", max_tokens=4, temperature=0)
            assert out.choices[0].finish_reason == "length"
        chunks = list(
            client(url).chat.completions.create(
                model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
            )
        )
        assert chunks[-1].choices[0].finish_reason == "length"
        assert sorted(metric(url, "fastserve:router_requests_total", decision="rr").values()) == [1.0, 2.0]
    finally:
        serve.delete("kuberay")


def _free_port() -> int:
    from fastserve_cli.testing.server import free_port

    return free_port()


def test_replica_sigkilled_during_a_burst(cluster):
    """40 streams; one replica is SIGKILLed once some have tokens. Streams that had not started are retried on
    the live replica and finish; started ones on the dead replica end with an error event; none hangs.
    Ray restarts the replica."""
    from openai import APIError, AsyncOpenAI

    url, _ = cluster
    body = wait_replicas(url, 2)
    retries_before = sum(metric(url, "fastserve:router_retries_total").values())
    started = asyncio.Event()
    outcome: dict[str, int] = {"completed": 0, "failed_started": 0, "failed_unstarted": 0}

    async def one(api: AsyncOpenAI, i: int, counter: list[int]) -> None:
        got = 0
        try:
            stream = await api.completions.create(
                model=NAME, prompt=f"item {i}:", max_tokens=48, logprobs=0, stream=True, extra_body={"ignore_eos": True}
            )
            async for chunk in stream:
                got += len(chunk.choices[0].logprobs.tokens) if chunk.choices and chunk.choices[0].logprobs else 0
                if got:
                    counter[0] += 1 if got == 1 else 0
                    if counter[0] >= 2:  # early: most of the burst has not started yet
                        started.set()
                if chunk.choices and chunk.choices[0].finish_reason:
                    assert got == 48
            outcome["completed"] += 1
        except APIError:
            outcome["failed_started" if got else "failed_unstarted"] += 1

    async def burst() -> None:
        api = AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=180)
        counter = [0]
        tasks = [asyncio.create_task(one(api, i, counter)) for i in range(40)]
        await asyncio.wait_for(started.wait(), 120)
        async with httpx.AsyncClient() as http:
            live = (await http.get(f"{url}/health", timeout=10)).json()["replicas"]
        victim = max(live, key=lambda r: r["inflight"])  # the ingress's exact count of requests on it
        os.kill(victim["pid"], signal.SIGKILL)
        await asyncio.wait_for(asyncio.gather(*tasks), 240)  # none hangs

    asyncio.run(burst())
    retried = sum(metric(url, "fastserve:router_retries_total").values()) - retries_before
    print(f"burst of 40 with a SIGKILL: {outcome}, retried {retried:.0f}")
    assert outcome["failed_unstarted"] == 0 and sum(outcome.values()) == 40
    assert outcome["completed"] >= 20
    after = wait_replicas(url, 2)  # Ray Serve replaced the dead replica
    assert victim_pid_gone(body, after)
    assert client(url).completions.create(model=NAME, prompt="x", max_tokens=3).choices[0].text is not None


def victim_pid_gone(before: dict, after: dict) -> bool:
    return {r["pid"] for r in before["replicas"]} != {r["pid"] for r in after["replicas"]}
