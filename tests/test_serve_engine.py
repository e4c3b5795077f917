"""Engine, KV manager, sampling and detokenizer, without HTTP: real tiny models, real backends."""

from __future__ import annotations

import functools
import threading
import time

import pytest

from fastserve_cli.core.errors import UserError
from fastserve_cli.serve.kv_cache import parse_bytes
from fastserve_cli.serve.request import Request, SamplingParams
from fastserve_cli.serve.scheduler import make_scheduler, take_in_order
from fastserve_cli.testing.engine import RoundRobin, greedy_request, make_engine, run_until_finished

PROMPTS = ["def foo(x):\n    return", "import os\nimport", "class A:\n", "x = [1, 2,", "for i in range(10):\n"]


def greedy_requests(tokenizer, lengths) -> list[Request]:
    return [greedy_request(tokenizer(p).input_ids, n) for p, n in zip(PROMPTS, lengths)]


@functools.lru_cache(maxsize=4)
def reference_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def reference_greedy(model_dir, prompt_ids: list[int], n: int) -> list[int]:
    """`model.generate()` greedy, ignoring EOS (as the engine does with ignore_eos)."""
    import torch

    model = reference_model(model_dir)
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, eos_token_id=None)
    return out[0, ids.shape[1] :].tolist()


def assert_matches_generate(model_dir, reqs):
    for r in reqs:
        assert r.finish_reason == "length"
        assert r.output_ids == reference_greedy(model_dir, r.prompt_ids, r.params.max_new_tokens), r.request_id


def test_torch_greedy_batched_equals_generate(tiny_model_dir):
    """Five requests of different lengths join and leave a batch of 4; each equals generate() greedy."""
    engine = make_engine(tiny_model_dir)
    reqs = greedy_requests(engine.tokenizer, [8, 16, 5, 12, 10])
    run_until_finished(engine, reqs)
    assert_matches_generate(tiny_model_dir, reqs)
    assert engine.backend.packed is not None and engine.iterations < sum(r.params.max_new_tokens for r in reqs)


@pytest.mark.parametrize("host_tokens, expect", [(100_000, "offloads"), (0, "recompute_preemptions")])
def test_kv_pressure_offload_or_recompute_keeps_outputs(tiny_gpt2_dir, host_tokens, expect):
    """A device budget smaller than the batch forces offload to the host pool (or recompute without one)."""
    engine = make_engine(tiny_gpt2_dir, device_tokens=40, host_tokens=host_tokens, max_batch_size=3)
    reqs = greedy_requests(engine.tokenizer, [10, 14, 8, 12])
    # a round-robin scheduler makes every iteration touch other requests' caches
    engine.scheduler = RoundRobin()
    run_until_finished(engine, reqs)
    assert getattr(engine.kv, expect) > 0
    assert_matches_generate(tiny_gpt2_dir, reqs)
    assert engine.kv.used(engine.live, "device") == 0  # everything freed


def test_priority_order_is_asked_only_when_caches_must_move(tiny_gpt2_dir):
    """Ranking every live request costs most of an MLFQ step; with room to spare nobody is ranked."""
    calls = {"roomy": 0, "tight": 0}
    for budget in ("roomy", "tight"):
        engine = make_engine(
            tiny_gpt2_dir, device_tokens=100_000 if budget == "roomy" else 40, host_tokens=100_000, max_batch_size=3
        )
        engine.scheduler = RoundRobin()
        order = engine.scheduler.priority_order

        def counted(budget=budget, order=order):
            calls[budget] += 1
            return order()

        engine.scheduler.priority_order = counted
        run_until_finished(engine, greedy_requests(engine.tokenizer, [10, 14, 8, 12]))
    assert calls["roomy"] == 0
    assert calls["tight"] > 0


class RotatingPair(RoundRobin):
    """Test scheduler: two requests per iteration, rotating by one, so every iteration swaps one row."""

    def schedule(self, now, max_batch_size, token_budget):
        if len(self.queue) > 1:
            self.queue.append(self.queue.pop(0))
        return self.queue[:2]


class RandomSubset(RoundRobin):
    """Test scheduler: a seeded random subset of the live requests each iteration (joins, leaves, growth,
    shrinking and newcomers longer than the pack, in every order)."""

    def __init__(self, seed: int = 0):
        import random

        super().__init__()
        self.rng = random.Random(seed)

    def schedule(self, now, max_batch_size, token_budget):
        if not self.queue:
            return []
        size = self.rng.randint(1, min(max_batch_size, len(self.queue)))
        return self.rng.sample(self.queue, size)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_pack_survives_random_membership_changes(tiny_gpt2_dir, tmp_path, backend):
    """Rows join, leave, grow and shrink the pack at random (prompts of 3 to 60 tokens, so newcomers are often
    longer than the pack); every output still equals generate() greedy, and the torch pack is rarely rebuilt."""
    model_dir = tiny_gpt2_dir
    if backend == "onnx":
        from fastserve_cli.export.onnx_graph import export_onnx

        export_onnx(tiny_gpt2_dir, tmp_path / "onnx", parity_steps=2)
        model_dir = tmp_path / "onnx"
    engine = make_engine(model_dir, backend=backend, max_batch_size=4)
    engine.scheduler = RandomSubset(seed=3)
    tok = engine.tokenizer
    text = " ".join(PROMPTS * 8)
    prompts = [tok(text).input_ids[:n] for n in (3, 60, 12, 40, 7, 25)]
    reqs = [
        Request(ids, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True), time.perf_counter())
        for ids, n in zip(prompts, (30, 12, 45, 20, 38, 16))
    ]
    run_until_finished(engine, reqs)
    assert_matches_generate(tiny_gpt2_dir, reqs)
    if backend == "torch":
        assert engine.backend.repacks * 4 < engine.backend.swaps, (engine.backend.repacks, engine.backend.swaps)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_swapping_rows_in_the_pack_keeps_outputs(tiny_gpt2_dir, tmp_path, backend):
    """Preempted and resumed requests trade rows of the pack (no whole-batch copy); greedy outputs are unchanged."""
    model_dir = tiny_gpt2_dir
    if backend == "onnx":
        from fastserve_cli.export.onnx_graph import export_onnx

        export_onnx(tiny_gpt2_dir, tmp_path / "onnx", parity_steps=2)
        model_dir = tmp_path / "onnx"
    engine = make_engine(model_dir, backend=backend, max_batch_size=2)
    engine.scheduler = RotatingPair()
    reqs = greedy_requests(engine.tokenizer, [9, 7, 11])
    run_until_finished(engine, reqs)
    assert_matches_generate(tiny_gpt2_dir, reqs)
    assert engine.backend.swaps > engine.backend.repacks  # 8 and 3 here: a newcomer longer than the pack repacks


def test_onnx_backend_greedy_equals_generate(tiny_gpt2_dir, tmp_path):
    from fastserve_cli.export.onnx_graph import export_onnx

    export_onnx(tiny_gpt2_dir, tmp_path / "onnx", parity_steps=2)
    engine = make_engine(tmp_path / "onnx", backend="onnx")
    reqs = greedy_requests(engine.tokenizer, [6, 12, 4, 9])
    run_until_finished(engine, reqs)
    assert_matches_generate(tiny_gpt2_dir, reqs)


def test_engine_thread_abort_frees_kv(tiny_gpt2_dir):
    engine = make_engine(tiny_gpt2_dir)
    done = threading.Event()
    outputs = []

    def on_output(out):
        outputs.append(out)
        if out.finished:
            done.set()

    req = Request(
        engine.tokenizer("x = 1").input_ids, SamplingParams(max_new_tokens=400, ignore_eos=True), time.perf_counter()
    )
    req.on_output = on_output
    engine.start()
    try:
        engine.submit([req])
        while len(outputs) < 3:
            time.sleep(0.01)
        engine.abort([req])
        assert done.wait(10)
    finally:
        engine.shutdown(timeout=1)
    assert req.finish_reason == "abort" and req.kv is None and req.num_generated < 400
    assert engine.live == [] and engine.kv.used([req], "device") == 0


def test_seeded_sampling_reproducible_and_top_k_1_is_greedy(tiny_gpt2_dir):
    from fastserve_cli.serve.sampling import make_generator

    engine = make_engine(tiny_gpt2_dir)
    ids = engine.tokenizer("def f(").input_ids

    def sampled(seed, **kw):
        req = Request(ids, SamplingParams(max_new_tokens=12, temperature=1.5, seed=seed, ignore_eos=True, **kw), 0.0)
        req.generator = make_generator(seed)
        return req

    a, b, c = sampled(7), sampled(7), sampled(8)
    k1 = sampled(1, top_k=1)
    greedy = Request(ids, SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True), 0.0)
    run_until_finished(engine, [a, b, c, k1, greedy])
    assert a.output_ids == b.output_ids != c.output_ids
    assert k1.output_ids == greedy.output_ids


def test_detokenizer_stop_strings_and_holdback(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from fastserve_cli.serve.engine import Detokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    text = "def foo(x):\n    return x + 1\n"
    detok = Detokenizer(tok, ["return"])
    streamed, stopped = [], False
    for t in tok(text).input_ids:
        if detok.add(t):
            stopped = True
            break
        streamed.append(detok.take(final=False))
    streamed.append(detok.take(final=True))
    assert stopped and "".join(streamed) == "def foo(x):\n    "


def test_fcfs_budgets_and_registry():
    reqs = [Request([1] * n, SamplingParams(), float(i)) for i, n in enumerate([5, 300, 3])]
    assert take_in_order(reqs, 8, 100) == reqs[:1]  # strict order: the 300-token prefill blocks the 3
    assert take_in_order(reqs, 8, 100, skip=True) == [reqs[0], reqs[2]]
    assert take_in_order(reqs[1:], 8, 100) == [reqs[1]]  # a lone oversized prefill still runs
    with pytest.raises(UserError, match="--scheduler nope"):
        make_scheduler("nope")


def test_parse_bytes():
    assert parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("2GB") == 2 * 10**9 and parse_bytes("1024") == 1024
    with pytest.raises(UserError, match="--kv-cache-memory"):
        parse_bytes("lots")


def test_torch_backend_serves_int8_variant(tiny_gpt2_dir, tmp_path):
    """An optimize-stage dynamic int8 variant loads through quantization.load_causal_lm and decodes batched
    exactly like its own generate()."""
    import torch

    from fastserve_cli.models.loader import load_causal_lm
    from fastserve_cli.models.quantized import quantize_model, save_quantized

    out = tmp_path / "int8"
    out.mkdir()
    model = load_causal_lm(tiny_gpt2_dir)
    save_quantized(model, "dynamic_int8", quantize_model(model, "dynamic_int8"), tiny_gpt2_dir, out)
    engine = make_engine(out)
    reqs = greedy_requests(engine.tokenizer, [8, 12, 5])
    run_until_finished(engine, reqs)
    reference = load_causal_lm(out)
    for r in reqs:
        ids = torch.tensor([r.prompt_ids])
        ref = reference.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=r.params.max_new_tokens,
            do_sample=False,
            eos_token_id=None,
        )
        assert r.output_ids == ref[0, ids.shape[1] :].tolist()
