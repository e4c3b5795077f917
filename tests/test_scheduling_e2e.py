"""Skip-join MLFQ through the real engine: preemption with KV offload/reload must not change greedy outputs."""

from __future__ import annotations

import pytest

from fastserve_cli.serve.profile import PrefillProfile

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
            outputs.append(ids[len(prompt):])
    return outputs


def make_engine(model_dir, scheduler_name: str, device_tokens: int, host_tokens: int, max_batch_size: int = 2):
    from transformers import AutoTokenizer

    from fastserve_cli.serve.backends import TorchBackend
    from fastserve_cli.serve.engine import Engine
    from fastserve_cli.serve.kv_cache import KVCacheManager
    from fastserve_cli.serve.metrics import Metrics
    from fastserve_cli.serve.scheduler import make_scheduler

    backend = TorchBackend(model_dir, device="cpu")
    per_token = backend.kv_bytes_per_token
    kv = KVCacheManager(backend, device_budget=device_tokens * per_token, host_budget=host_tokens * per_token)
    # A quantum far below one iteration: every request is demoted after each run, so the MLFQ keeps rotating
    # requests through the batch and the caches of the ones left out must move to make room.
    profile = PrefillProfile(lengths=[1, 64], prefill_times=[1e-4, 1e-3], decode_s=1e-4)
    scheduler = make_scheduler(scheduler_name, base_quantum_s=1e-4, estimate_prefill_s=profile.prefill_s,
                               starvation_s=60.0, max_started=16)
    engine = Engine(backend, scheduler, kv, AutoTokenizer.from_pretrained(model_dir), Metrics("tiny"),
                    max_batch_size=max_batch_size, token_budget=256)
    return engine


def run_to_completion(engine, prompts: list[list[int]]) -> list[list[int]]:
    import time

    from fastserve_cli.serve.request import Request, SamplingParams

    reqs = [Request(prompt_ids=p, params=SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0, ignore_eos=True),
                    arrival_time=time.perf_counter()) for p in prompts]
    engine.submit(reqs)
    for _ in range(10_000):
        if all(r.finished for r in reqs):
            break
        engine.step()
    assert all(r.finish_reason == "length" for r in reqs), [r.finish_reason for r in reqs]
    return [r.output_ids for r in reqs]


def prometheus_values(text: str) -> dict[str, float]:
    """Sample name -> value from the exposition text (labels dropped; one model per engine)."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.split("{")[0].split(" ")[0], line.rsplit(" ", 1)[1]
            values[name] = float(value)
    return values


def prompts_for(n: int) -> list[list[int]]:
    return [[(7 * i + 3 * j) % 300 + 5 for j in range(12 + 5 * i)] for i in range(n)]


@pytest.mark.parametrize("host_tokens", [10_000, 0], ids=["offload-to-host", "recompute"])
def test_offload_and_reload_keep_greedy_outputs(tiny_model_dir, host_tokens):
    prompts = prompts_for(6)
    expected = reference_greedy(tiny_model_dir, prompts, MAX_NEW)
    # Device room for about two and a half caches: the other started requests must leave the device.
    engine = make_engine(tiny_model_dir, "skip-join-mlfq", device_tokens=100, host_tokens=host_tokens)
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
    exported = prometheus_values(engine.metrics.render().decode())
    assert exported["fastserve:scheduler_preemptions_total"] == stats.preemptions
    assert exported["fastserve:scheduler_demotions_total"] == stats.demotions
    offloaded = engine.kv.offloaded_bytes
    assert exported["fastserve:kv_cache_offloaded_bytes_total"] == offloaded and (offloaded > 0) == (host_tokens > 0)
    if host_tokens:
        assert engine.kv.offloads > 0 and engine.kv.reloads > 0 and engine.kv.recompute_preemptions == 0
        # Offload victims come from the tail of the priority order: nobody ranked later stayed on the device
        # unless it was running in this iteration (at most max_batch_size of them).
        for victim_rank, device_ranks in moves:
            assert sum(1 for rank in device_ranks if rank > victim_rank) <= 2
    else:
        assert engine.kv.offloads == 0 and engine.kv.recompute_preemptions > 0


def test_fcfs_and_mlfq_agree_without_memory_pressure(tiny_gpt2_dir):
    prompts = prompts_for(4)
    fcfs = run_to_completion(make_engine(tiny_gpt2_dir, "fcfs", 10_000, 0), prompts)
    mlfq = make_engine(tiny_gpt2_dir, "skip-join-mlfq", 10_000, 0)
    assert run_to_completion(mlfq, prompts) == fcfs
    assert mlfq.kv.offloads == 0 and mlfq.scheduler.stats.preemptions > 0
