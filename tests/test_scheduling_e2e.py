"""Skip-join MLFQ through the real engine: preemption with KV offload/reload must not change greedy outputs."""

from __future__ import annotations

import pytest

from fastserve_cli.serve.profile import PrefillProfile
from fastserve_cli.testing.engine import greedy_request, make_engine, run_until_finished
from fastserve_cli.testing.server import prometheus_samples, running_server

MAX_NEW = 20


def reference_greedy(model_dir, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Greedy continuation by full recomputation with the transformers model (no KV cache at all)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outputs = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(steps):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            outputs.append(ids[len(prompt) :])
    return outputs


def mlfq_engine(model_dir, scheduler_name: str, device_tokens: int, host_tokens: int, max_batch_size: int = 2):
    """A quantum far below one iteration: every request is demoted after each run, so the MLFQ keeps rotating
    requests through the batch and the caches of the ones left out must move to make room."""
    from fastserve_cli.serve.scheduler import make_scheduler

    profile = PrefillProfile(lengths=[1, 64], prefill_times=[1e-4, 1e-3], decode_s=1e-4)
    scheduler = make_scheduler(
        scheduler_name, base_quantum_s=1e-4, estimate_prefill_s=profile.prefill_s, starvation_s=60.0, max_started=16
    )
    return make_engine(
        model_dir,
        "torch",
        scheduler,
        device_tokens=device_tokens,
        host_tokens=host_tokens,
        max_batch_size=max_batch_size,
        token_budget=256,
        device="cpu",
        metrics_name="tiny",
    )


def run_to_completion(engine, prompts: list[list[int]]) -> list[list[int]]:
    reqs = [greedy_request(p, MAX_NEW) for p in prompts]
    run_until_finished(engine, reqs)
    assert all(r.finish_reason == "length" for r in reqs), [r.finish_reason for r in reqs]
    return [r.output_ids for r in reqs]


def prompts_for(n: int) -> list[list[int]]:
    return [[(7 * i + 3 * j) % 300 + 5 for j in range(12 + 5 * i)] for i in range(n)]


@pytest.mark.parametrize("host_tokens", [10_000, 0], ids=["offload-to-host", "recompute"])
def test_offload_and_reload_keep_greedy_outputs(tiny_model_dir, host_tokens):
    prompts = prompts_for(6)
    expected = reference_greedy(tiny_model_dir, prompts, MAX_NEW)
    # Device room for about two and a half caches: the other started requests must leave the device.
    engine = mlfq_engine(tiny_model_dir, "skip-join-mlfq", device_tokens=100, host_tokens=host_tokens)
    moves = []
    to_host = engine.backend.to_host

    def record_offload(req):  # a spy: the real copy still happens
        order = engine.scheduler.priority_order()
        moves.append((order.index(req), [i for i, r in enumerate(order) if r.kv_location == "device"]))
        to_host(req)

    engine.backend.to_host = record_offload
    assert run_to_completion(engine, prompts) == expected
    stats = engine.scheduler.stats
    assert stats.preemptions > 0 and stats.demotions > 0
    exported = prometheus_samples(engine.metrics.render().decode())
    assert exported["fastserve:scheduler_preemptions_total"] == stats.preemptions
    assert exported["fastserve:scheduler_demotions_total"] == stats.demotions
    offloaded = engine.kv.offloaded_bytes
    assert exported["fastserve:kv_cache_offloaded_bytes_total"] == offloaded and (offloaded > 0) == (host_tokens > 0)
    if host_tokens:
        assert engine.kv.offloads > 0 and engine.kv.reloads > 0 and engine.kv.recompute_preemptions == 0
        assert engine.kv.prefetches > 0  # some caches came back ahead of their turn, when room freed up
        # Offload victims come from the tail of the priority order: nobody ranked later stayed on the device
        # unless it was running in this iteration (at most max_batch_size of them).
        for victim_rank, device_ranks in moves:
            assert sum(1 for rank in device_ranks if rank > victim_rank) <= 2
    else:
        assert engine.kv.offloads == 0 and engine.kv.recompute_preemptions > 0


def test_fcfs_and_mlfq_agree_without_memory_pressure(tiny_gpt2_dir):
    prompts = prompts_for(4)
    fcfs = run_to_completion(mlfq_engine(tiny_gpt2_dir, "fcfs", 10_000, 0), prompts)
    mlfq = mlfq_engine(tiny_gpt2_dir, "skip-join-mlfq", 10_000, 0)
    assert run_to_completion(mlfq, prompts) == fcfs
    assert mlfq.kv.offloads == 0 and mlfq.scheduler.stats.preemptions > 0


# ---------------------------------------------------------------- through the HTTP server


@pytest.fixture(scope="module")
def mlfq_server(tiny_gpt2_dir, tmp_path_factory):
    """A real `fastserve serve` process: skip-join-mlfq, one request per iteration, KV room for 128 tokens."""
    args = [
        "--scheduler",
        "skip-join-mlfq",
        "--max-batch-size",
        "1",
        "--kv-cache-memory",
        "128KiB",
        "--set",
        "serve.base_quantum_s=0.0005",
        "--model-name",
        "tiny",
    ]
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    with running_server(
        tiny_gpt2_dir, *args, env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, log_path=log_path
    ) as (url, _):
        yield url


@pytest.mark.slow
def test_server_late_short_request_overtakes_long_one(mlfq_server):
    """With one slot, FCFS would make the short request wait for all 120 tokens of the long one.

    The long request's cache (~125 tokens) fills the KV budget, so it is offloaded to let the short one in.
    """
    import threading

    from openai import OpenAI

    client = OpenAI(base_url=mlfq_server + "/v1", api_key="none")
    done: list[str] = []
    stream = client.completions.create(
        model="tiny",
        prompt="def parse(text):",
        max_tokens=120,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    for _ in range(5):  # the long request is running
        next(chunks)

    def drain() -> None:
        sum(1 for _ in chunks)
        done.append("long")

    reader = threading.Thread(target=drain)
    reader.start()
    short = client.completions.create(
        model="tiny", prompt="x = 1", max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
    )
    done.append("short")
    reader.join()
    assert short.usage.completion_tokens == 4
    assert done == ["short", "long"]


@pytest.mark.slow
def test_server_greedy_outputs_survive_preemption_and_offload(mlfq_server, tiny_gpt2_dir):
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from openai import OpenAI
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    prompts = ["import os\n", "class Parser:\n", "def main(argv):\n    ", "for i in range(10):", "x = {'a': 1,"]
    expected = reference_greedy(tiny_gpt2_dir, [tokenizer.encode(p) for p in prompts], 40)
    client = OpenAI(base_url=mlfq_server + "/v1", api_key="none")
    before = prometheus_samples(httpx.get(mlfq_server + "/metrics").text)

    def complete(prompt: str) -> str:
        out = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=40, temperature=0, extra_body={"ignore_eos": True}
        )
        return out.choices[0].text

    with ThreadPoolExecutor(len(prompts)) as pool:
        texts = list(pool.map(complete, prompts))
    assert texts == [tokenizer.decode(ids) for ids in expected]
    after = prometheus_samples(httpx.get(mlfq_server + "/metrics").text)
    gained = {k: after[k] - before.get(k, 0.0) for k in after if k.endswith("_total")}
    assert gained["fastserve:scheduler_preemptions_total"] > 0 and gained["fastserve:scheduler_demotions_total"] > 0
    assert gained["fastserve:kv_cache_offloads_total"] > 0 and gained["fastserve:kv_cache_reloads_total"] > 0
    assert gained["fastserve:kv_cache_offloaded_bytes_total"] > 0
