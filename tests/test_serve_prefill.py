"""Batched and chunked prefill: real tiny models, torch and onnx backends, greedy outputs compared exactly."""

from __future__ import annotations

import time

import pytest

from fastserve_cli.serve.request import Request, SamplingParams
from fastserve_cli.testing.engine import RoundRobin, greedy_request, make_engine, run_until_finished

TEXT = "def foo(x):\n    return x + 1\nimport os\nclass A:\n    pass\nfor i in range(10):\n    print(i)\n" * 6
LENGTHS = (3, 41, 17, 60, 9)  # prompts of different lengths: both pads of the batched layout get exercised


def engine_for(backend, tiny_gpt2_dir, tiny_onnx_dir, **options):
    return make_engine(tiny_onnx_dir if backend == "onnx" else tiny_gpt2_dir, backend=backend, **options)


def prompts(tokenizer, lengths=LENGTHS) -> list[list[int]]:
    ids = tokenizer(TEXT).input_ids
    return [ids[i : i + n] for i, n in zip(range(0, 50, 7), lengths)]


def outputs(engine, prompt_ids, new_tokens=12, scheduler=None) -> list[list[int]]:
    if scheduler is not None:
        engine.scheduler = scheduler
    reqs = [greedy_request(ids, new_tokens + i) for i, ids in enumerate(prompt_ids)]
    run_until_finished(engine, reqs)
    assert all(r.finish_reason == "length" for r in reqs)
    assert engine.kv.used(engine.live, "device") == 0
    return [r.output_ids for r in reqs]


def one_at_a_time(engine, prompt_ids, new_tokens=12) -> list[list[int]]:
    """The reference: every request alone in its own engine run (its prefill one forward of its own)."""
    return [outputs(engine, [ids], new_tokens + i)[0] for i, ids in enumerate(prompt_ids)]


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_batched_prefill_equals_one_at_a_time(backend, tiny_gpt2_dir, tiny_onnx_dir):
    """Five newcomers of 3..60 tokens are prefilled in one forward; logits and greedy outputs equal
    prefilling each alone."""
    import torch

    engine = engine_for(backend, tiny_gpt2_dir, tiny_onnx_dir, max_batch_size=8)
    ids = prompts(engine.tokenizer)
    be = engine.backend
    alone = []
    for p in ids:
        req = greedy_request(p, 1)
        alone.append(be.prefill(req)[0])
        be.release(req)
    reqs = [greedy_request(p, 1) for p in ids]
    batched = be.prefill_batch(reqs)
    assert [r.kv_tokens for r in reqs] == [len(p) for p in ids]
    assert all(r.kv[0][0].shape[2] == len(p) for r, p in zip(reqs, ids))
    torch.testing.assert_close(batched, torch.stack(alone), atol=2e-4, rtol=1e-4)
    for r in reqs:
        be.release(r)
    calls = _count_prefill_calls(be)
    together = outputs(engine, ids)
    assert calls == [5]  # one prefill forward for the five newcomers
    assert together == one_at_a_time(engine, ids)


def _count_prefill_calls(backend) -> list[int]:
    """Record the batch size of every prefill_batch call on `backend` from now on."""
    calls: list[int] = []
    original = backend.prefill_batch

    def counting(reqs, counts=None):
        calls.append(len(reqs))
        return original(reqs, counts)

    backend.prefill_batch = counting
    return calls


@pytest.mark.parametrize("backend", ["torch", "onnx"])
@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_chunked_prefill_equals_whole(backend, chunk, tiny_gpt2_dir, tiny_onnx_dir):
    """Prompts prefilled `chunk` tokens per iteration (several requests' chunks batched, each continuing
    from its own partial KV) give the greedy outputs of whole prefill."""
    whole = outputs(engine_for(backend, tiny_gpt2_dir, tiny_onnx_dir, max_batch_size=3), prompts_for(tiny_gpt2_dir))
    engine = engine_for(backend, tiny_gpt2_dir, tiny_onnx_dir, max_batch_size=3, prefill_chunk_tokens=chunk)
    engine.chunk_when_idle = True  # chunk from the first iteration on, not only once someone decodes
    assert outputs(engine, prompts_for(tiny_gpt2_dir)) == whole


def prompts_for(model_dir):
    from transformers import AutoTokenizer

    return prompts(AutoTokenizer.from_pretrained(model_dir))


def test_chunks_interleave_with_decodes_and_first_token_waits_for_the_last_chunk(tiny_gpt2_dir):
    """A long prompt arriving while a stream decodes is prefilled a chunk per iteration while that stream keeps
    getting a token every iteration; its first token comes only after its last chunk."""
    engine = make_engine(tiny_gpt2_dir, max_batch_size=4, prefill_chunk_tokens=8)
    ids = prompts(engine.tokenizer, (5, 60))
    running = greedy_request(ids[0], 40)
    engine.submit([running])
    for _ in range(3):
        engine.step()
    long = greedy_request(ids[1], 4)
    engine.submit([long])
    seen = []
    while not long.output_ids:
        before = running.num_generated
        engine.step()
        assert running.num_generated == before + 1  # the running stream never stalls
        seen.append(long.kv_tokens)
    assert seen == [8, 16, 24, 32, 40, 48, 56, 60]
    assert long.first_token_time is not None and len(long.output_ids) == 1
    while not (running.finished and long.finished):
        engine.step()
    alone = make_engine(tiny_gpt2_dir)
    assert running.output_ids == outputs(alone, ids[:1], 40)[0]
    assert long.output_ids == outputs(alone, ids[1:], 4)[0]


class RotatingWindow(RoundRobin):
    """Runs a rotating window of live requests, so every iteration moves other requests' caches."""

    def __init__(self) -> None:
        super().__init__()
        self.turn = 0

    def schedule(self, now, max_batch_size, token_budget):
        if not self.queue:
            return []
        self.turn += 1
        rotated = self.queue[self.turn % len(self.queue) :] + self.queue[: self.turn % len(self.queue)]
        return rotated[:max_batch_size]


@pytest.mark.parametrize("backend", ["torch", "onnx"])
@pytest.mark.parametrize("host_tokens, expect", [(100_000, "offloads"), (0, "recompute_preemptions")])
def test_chunked_prefill_under_kv_pressure(backend, host_tokens, expect, tiny_gpt2_dir, tiny_onnx_dir):
    """A device budget below the batch's KV offloads (or, without a host pool, drops and recomputes) requests
    in the middle of their chunked prefill; greedy outputs still equal whole prefill with room to spare."""
    ids = prompts_for(tiny_gpt2_dir)
    whole = outputs(engine_for(backend, tiny_gpt2_dir, tiny_onnx_dir), ids)
    engine = engine_for(
        backend,
        tiny_gpt2_dir,
        tiny_onnx_dir,
        device_tokens=90,
        host_tokens=host_tokens,
        max_batch_size=3,
        prefill_chunk_tokens=8,
    )
    engine.chunk_when_idle = True
    partial = []
    original = engine.kv.backend.release if host_tokens == 0 else engine.kv.backend.to_host

    def moved(req):
        partial.append(not req.is_prefilled)
        return original(req)

    if host_tokens == 0:
        engine.kv.backend.release = moved
    else:
        engine.kv.backend.to_host = moved
    assert outputs(engine, ids, scheduler=RotatingWindow()) == whole
    assert getattr(engine.kv, expect) > 0
    assert any(partial)  # some request was moved out with its prefill half done


def test_token_budget_bounds_chunks(tiny_gpt2_dir):
    """A chunk never exceeds the iteration's token budget, and the batch's prefill tokens stay within it."""
    engine = make_engine(tiny_gpt2_dir, max_batch_size=4, token_budget=20, prefill_chunk_tokens=64)
    assert engine.prefill_chunk_tokens == 20
    engine.chunk_when_idle = True
    reqs = [greedy_request(p, 3) for p in prompts(engine.tokenizer, (50, 45, 30))]
    original = engine.backend.prefill_batch
    sizes = []

    def spy(batch, counts=None):
        sizes.append(sum(counts))
        return original(batch, counts)

    engine.backend.prefill_batch = spy
    run_until_finished(engine, reqs)
    assert max(sizes) <= 20 and sum(sizes) == 125


def test_mlfq_skip_join_uses_the_first_chunk(tiny_gpt2_dir):
    """Skip-join places a request by its first iteration: with chunking, a long prompt's first chunk."""
    from fastserve_cli.serve.mlfq import SkipJoinMLFQ

    def make(chunk):
        sched = SkipJoinMLFQ(base_quantum_s=1.0, estimate_prefill_s=lambda n: n / 10)
        engine = make_engine(tiny_gpt2_dir, scheduler=sched, prefill_chunk_tokens=chunk)
        engine.chunk_when_idle = True
        req = Request(list(range(1, 81)), SamplingParams(max_new_tokens=2, temperature=0), time.perf_counter())
        engine.submit([req])
        engine.step()
        return req.sched_state.history[0][1], req

    assert make(None)[0] == 3  # 80 tokens: 8 s, the level whose quantum (2**3) covers it
    level, req = make(10)
    assert level == 0 and req.kv_tokens == 10 and req.is_started and not req.is_prefilled
    assert req.prefill_remaining == 70


@pytest.mark.parametrize("value", [-1, "-1", "many", 1.5, True])
def test_recipe_key_bad_value_is_one_line_user_error(value):
    from fastserve_cli.core.errors import UserError
    from fastserve_cli.core.recipe import validate_recipe
    from fastserve_cli.serve import serve_config

    with pytest.raises(UserError, match=r"serve\.prefill_chunk_tokens") as err:
        validate_recipe({"serve": {"prefill_chunk_tokens": value}}, "recipe.yaml")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"prefill_chunk_tokens") as err:  # the --prefill-chunk-tokens flag
        serve_config(None, [], {"prefill_chunk_tokens": value})
    assert "\n" not in str(err.value)


def test_recipe_key_zero_or_null_turns_chunking_off(tiny_gpt2_dir):
    from fastserve_cli.core.recipe import validate_recipe
    from fastserve_cli.serve import serve_config

    assert validate_recipe({}, "r").serve.prefill_chunk_tokens == 0
    assert serve_config(None, [], {"prefill_chunk_tokens": "64"}).prefill_chunk_tokens == 64  # the flag's string
    for value in (0, None):
        chunk = validate_recipe({"serve": {"prefill_chunk_tokens": value}}, "r").serve.prefill_chunk_tokens
        assert make_engine(tiny_gpt2_dir, prefill_chunk_tokens=chunk).prefill_chunk_tokens is None


def test_lone_prompt_prefills_whole_and_chunks_start_when_someone_decodes(tiny_gpt2_dir):
    """Chunks protect running streams: with nobody decoding a prompt runs in one forward (shortest time to
    first token); a prompt arriving while a stream decodes is chunked."""
    engine = make_engine(tiny_gpt2_dir, prefill_chunk_tokens=8)
    first, second = (greedy_request(p, 20) for p in prompts(engine.tokenizer, (40, 30)))
    engine.submit([first])
    engine.step()
    assert first.output_ids and first.kv_tokens == 40
    engine.submit([second])
    engine.step()
    assert second.kv_tokens == 8 and not second.output_ids


def test_auto_chunk_from_profile():
    """auto: the most tokens whose marginal prefill cost (over a one-token forward) fits a quarter of a decode
    iteration, a multiple of 8, within budget."""
    from fastserve_cli.serve.profile import PrefillProfile

    profile = PrefillProfile(lengths=[1, 64, 256, 1024], prefill_times=[0.001, 0.01, 0.04, 0.16], decode_s=0.04)
    assert profile.chunk_tokens(2048) == 64  # 0.01 s over the 1-token forward: 64 tokens (0.001 + 0.009 at 64)
    assert profile.chunk_tokens(60) == 60  # the whole budget fits
    assert profile.chunk_tokens(2048, floor=16, share=0.5) == 128  # 0.02 s: 128 tokens (linear from 64 to 256)
    fast = PrefillProfile(lengths=[1, 1024], prefill_times=[0.001, 0.002], decode_s=0.02)
    assert fast.chunk_tokens(2048) == 2048  # a GPU-like profile: chunks as large as the budget
    slow = PrefillProfile(lengths=[1, 8], prefill_times=[0.05, 0.4], decode_s=0.02)
    assert slow.chunk_tokens(2048) == 8  # never below the floor
