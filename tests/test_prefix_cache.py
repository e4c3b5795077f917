"""Automatic prefix caching (serve/prefix_cache.py): greedy outputs identical with the cache on and off, on
both backends, under eviction, offload and recompute preemption; referenced blocks never evicted; metrics."""

from __future__ import annotations

import re

import pytest

from fastserve_cli.serve.request import Request
from fastserve_cli.testing.engine import RoundRobin, greedy_request, make_engine, run_until_finished

SYSTEM = "You are a careful Python reviewer.\nclass A:\n    def run(self, x):\n        return x + 1\n"
QUESTIONS = ["import os\nimport", "for i in range(10):\n", "x = [1, 2,", "def foo(x):\n    return"]


def shared_prefix_requests(tokenizer, new_tokens: int = 10, system: str = SYSTEM) -> list[Request]:
    prefix = tokenizer(system).input_ids
    return [greedy_request(prefix + tokenizer(q).input_ids, new_tokens) for q in QUESTIONS]


def outputs(engine, reqs: list[Request], waves: int = 2) -> list[list[int]]:
    """Run `reqs` in `waves` groups (a later group can hit what an earlier one cached); their outputs."""
    size = -(-len(reqs) // waves)
    for start in range(0, len(reqs), size):
        run_until_finished(engine, reqs[start : start + size])
    return [r.output_ids for r in reqs]


def cache_off_outputs(model_dir, backend: str = "torch", **kw) -> list[list[int]]:
    engine = make_engine(model_dir, backend=backend, **kw)
    return outputs(engine, shared_prefix_requests(engine.tokenizer))


def test_greedy_outputs_identical_with_cache_on_and_off_torch(tiny_model_dir):
    """gpt2 and llama (grouped-query attention): later requests start from the cached system prompt."""
    engine = make_engine(tiny_model_dir, prefix_cache_tokens=10_000, block_size=4)
    reqs = shared_prefix_requests(engine.tokenizer)
    assert outputs(engine, reqs) == cache_off_outputs(tiny_model_dir)
    stats = engine.kv.prefix.stats
    prefix_len = len(engine.tokenizer(SYSTEM).input_ids)
    assert stats.hits >= 2 * (prefix_len // 4 * 4)  # the second wave's two requests hit the whole system prompt
    assert stats.queries == sum(r.prompt_len for r in reqs)
    assert engine.kv.used(engine.live, "device") == 0 and engine.kv.prefix.held_bytes == 0


def test_greedy_outputs_identical_with_cache_on_and_off_onnx(tiny_onnx_dir, tiny_gpt2_dir):
    """The onnx backend takes the cached KV as its past the same way (the base class's prefill)."""
    engine = make_engine(tiny_onnx_dir, backend="onnx", prefix_cache_tokens=10_000, block_size=4)
    reqs = shared_prefix_requests(engine.tokenizer)
    assert outputs(engine, reqs) == cache_off_outputs(tiny_gpt2_dir)
    assert engine.kv.prefix.stats.hits > 0


def test_second_request_reuses_the_whole_prompt_but_its_last_token(tiny_gpt2_dir):
    """A repeated prompt hits all its full blocks except one that would cover the last token."""
    engine = make_engine(tiny_gpt2_dir, prefix_cache_tokens=10_000, block_size=4)
    ids = engine.tokenizer(SYSTEM).input_ids[:24]  # 6 full blocks
    first, second = greedy_request(ids, 5), greedy_request(ids, 5)
    run_until_finished(engine, [first])
    run_until_finished(engine, [second])
    assert engine.kv.prefix.stats.hits == 20  # 5 blocks: the 6th would leave no token to compute
    assert first.output_ids == second.output_ids


def test_tiny_cache_budget_evicts_and_keeps_outputs(tiny_gpt2_dir):
    """A cache of 3 blocks and prompts with different prefixes: blocks are evicted, outputs do not change."""
    engine = make_engine(tiny_gpt2_dir, prefix_cache_tokens=12, block_size=4)
    cache = engine.kv.prefix
    tok = engine.tokenizer
    reqs = []
    for i in (0, 0, 1, 1, 2, 3, 0, 2, 2):
        question = QUESTIONS[i]
        reqs.append(greedy_request(tok(question + SYSTEM).input_ids, 6))
        run_until_finished(engine, reqs[-1:])
        assert cache.bytes <= cache.capacity
    reference = make_engine(tiny_gpt2_dir)
    refs = [greedy_request(r.prompt_ids, 6) for r in reqs]
    run_until_finished(reference, refs)
    assert [r.output_ids for r in reqs] == [r.output_ids for r in refs]
    assert cache.stats.evicted_blocks > 0 and cache.stats.hits > 0


@pytest.mark.parametrize("host_tokens, expect", [(100_000, "offloads"), (0, "recompute_preemptions")])
def test_offload_and_recompute_with_cache_keep_outputs_and_budget(tiny_gpt2_dir, host_tokens, expect):
    """A device budget smaller than the live requests forces offload (or recompute without a host pool); the
    cache gives its unreferenced blocks back first and live KV plus cached blocks never exceed the budget."""
    device_tokens = 160
    kw = dict(device_tokens=device_tokens, host_tokens=host_tokens, max_batch_size=3)
    engine = make_engine(tiny_gpt2_dir, prefix_cache_tokens=device_tokens, block_size=4, **kw)
    engine.scheduler = RoundRobin()
    reqs = shared_prefix_requests(engine.tokenizer, new_tokens=14)
    engine.submit(reqs)
    budget = engine.kv.device_budget
    for _ in range(10_000):
        if all(r.finished for r in reqs):
            break
        engine.step()
        assert engine.kv.used(engine.live, "device") + engine.kv.cached_bytes() <= budget
    reference = make_engine(tiny_gpt2_dir, **kw)
    reference.scheduler = RoundRobin()
    refs = [greedy_request(r.prompt_ids, 14) for r in reqs]
    run_until_finished(reference, refs)
    assert [r.output_ids for r in reqs] == [r.output_ids for r in refs]
    assert getattr(engine.kv, expect) > 0
    assert engine.kv.prefix.stats.hits > 0 and engine.kv.prefix.stats.evicted_blocks > 0
    if expect == "recompute_preemptions":  # a preempted request's re-prefill queries the cache again
        assert engine.kv.prefix.stats.queries > sum(r.prompt_len for r in reqs)


def test_blocks_a_scheduled_prefill_reads_are_never_evicted(tiny_gpt2_dir):
    """make_room: the prefill at the head of the batch references its cached prefix, so the next request's
    need cannot evict it; unreferenced blocks go, least recently used leaves first."""
    engine = make_engine(tiny_gpt2_dir, device_tokens=64, prefix_cache_tokens=64, block_size=4)
    cache, tok = engine.kv.prefix, engine.tokenizer
    prefix = tok(SYSTEM).input_ids[:24]
    other = tok(QUESTIONS[0] + SYSTEM).input_ids[:16]
    run_until_finished(engine, [greedy_request(prefix + [5], 1)])  # caches 6 blocks
    run_until_finished(engine, [greedy_request(other + [5], 1)])  # 4 more, used later
    assert len(cache.blocks) == 10
    reader = greedy_request(prefix + [7, 8], 3)
    hungry = greedy_request(tok(QUESTIONS[2] * 12).input_ids[:40], 3)  # needs 40 of the 64 tokens
    runnable = engine.kv.make_room([reader, hungry], [reader, hungry], lambda: [reader, hungry])
    assert runnable == [reader]  # room for `hungry` only by evicting what `reader` holds: it waits
    assert cache.match(prefix + [7, 8]) and cache.held_bytes == 6 * cache.block_bytes
    assert not cache.match(other + [5])  # the unreferenced blocks went
    assert cache.stats.evicted_blocks == 4


def test_lru_evicts_leaves_of_the_least_recently_used_chain(tiny_gpt2_dir):
    engine = make_engine(tiny_gpt2_dir, prefix_cache_tokens=10_000, block_size=4)
    cache, tok = engine.kv.prefix, engine.tokenizer
    a, b = tok(SYSTEM).input_ids[:12], tok(QUESTIONS[1] + SYSTEM).input_ids[:12]
    for ids in (a, b):
        run_until_finished(engine, [greedy_request(ids + [5], 1)])
    run_until_finished(engine, [greedy_request(a + [6], 1)])  # `a` is now the most recently used
    assert cache.evict(cache.block_bytes) == cache.block_bytes
    assert len(cache.match(b + [5])) == 2 and len(cache.match(a + [5])) == 3  # b's leaf went first
    cache.clear()
    assert cache.blocks == {}


def test_metrics_count_queries_and_hits(tiny_gpt2_dir):
    engine = make_engine(tiny_gpt2_dir, prefix_cache_tokens=10_000, block_size=4)
    outputs(engine, shared_prefix_requests(engine.tokenizer))
    text = engine.metrics.render().decode()
    stats = engine.kv.prefix.stats

    def value(name: str) -> float:
        return float(re.search(rf"^fastserve:{name}\{{[^}}]*\}} (\S+)$", text, re.M).group(1))

    assert value("prefix_cache_queries_total") == stats.queries > 0
    assert value("prefix_cache_hits_total") == stats.hits > 0
    assert value("prefix_cache_hit_rate") == pytest.approx(stats.hits / stats.queries)
    assert 0 < value("prefix_cache_usage_perc") <= 1


def metric(text: str, name: str) -> float:
    match = re.search(rf'^fastserve:{name}\{{model_name="tiny"\}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def test_server_reports_prefix_cache_hits(tiny_server):
    """Through the official client: the second chat with the same long system prompt is a cache hit in /metrics
    (the server's prefix cache is on by default)."""
    import httpx

    url, client, _ = tiny_server
    before = httpx.get(f"{url}/metrics").text
    system = SYSTEM * 3
    replies = [
        client.completions.create(model="tiny", prompt=system + q, max_tokens=4, temperature=0) for q in QUESTIONS[:2]
    ]
    assert all(r.choices[0].text is not None for r in replies)
    after = httpx.get(f"{url}/metrics").text
    assert metric(after, "prefix_cache_hits_total") - metric(before, "prefix_cache_hits_total") >= 16
    assert metric(after, "prefix_cache_queries_total") > metric(before, "prefix_cache_queries_total")
    assert 0 < metric(after, "prefix_cache_hit_rate") <= 1


def test_flag_and_recipe_keys_turn_the_cache_off():
    from fastserve_cli.serve import serve_config

    assert serve_config(None, [], {}).prefix_cache is True
    assert serve_config(None, [], {"prefix_cache": False}).prefix_cache is False
    cfg = serve_config(None, ["serve.prefix_cache_block_size=32", "serve.prefix_cache_fraction=0.25"], {})
    assert (cfg.prefix_cache_block_size, cfg.prefix_cache_fraction) == (32, 0.25)


@pytest.mark.parametrize("chunk", [3, 8])
def test_cache_hits_compose_with_chunked_and_batched_prefill(tiny_gpt2_dir, chunk):
    """A hit attaches the cached prefix before the iteration's batched prefill; the rest of the prompt is then
    computed in chunks while an earlier request decodes: outputs equal cache off, chunking off."""
    reference = cache_off_outputs(tiny_gpt2_dir)
    engine = make_engine(tiny_gpt2_dir, prefix_cache_tokens=10_000, block_size=4, prefill_chunk_tokens=chunk)
    engine.chunk_when_idle = True  # chunk even the first wave's prompts (nobody decodes yet)
    reqs = shared_prefix_requests(engine.tokenizer)
    run_until_finished(engine, reqs[:1])
    run_until_finished(engine, reqs[1:])  # three newcomers in one batched prefill, all hitting the prefix
    assert [r.output_ids for r in reqs] == reference
    assert engine.kv.prefix.stats.hits >= 3 * 4
    assert engine.kv.used(engine.live, "device") == 0 and engine.kv.prefix.held_bytes == 0
