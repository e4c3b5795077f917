"""Decode rows and a prefill chunk in one forward (serve/mixed_forward.py): the same logits, KV and greedy
outputs as the two separate calls, on a real tiny GPT-2 through the torch backend."""

from __future__ import annotations

import pytest

from fastserve_cli.testing.engine import greedy_request, make_engine

TEXT = "def foo(x):\n    return x + 1\nimport os\nclass A:\n    pass\nfor i in range(10):\n    print(i)\n" * 6


def workload(tokenizer):
    ids = tokenizer(TEXT).input_ids
    return [ids[3:8], ids[10:19], ids[20:23]], ids[:70]


def run_streams_and_long_prompt(engine, mixed: bool, chunk_steps: list[int] | None = None):
    """Three streams decode; a 70-token prompt arrives and is prefilled in chunks beside them."""
    engine.backend.mixed = mixed
    short, long_ids = workload(engine.tokenizer)
    streams = [greedy_request(p, 30) for p in short]
    engine.submit(streams)
    for _ in range(3):
        engine.step()
    long = greedy_request(long_ids, 8)
    engine.submit([long])
    while not all(r.finished for r in [*streams, long]):
        engine.step()
    return [r.output_ids for r in [*streams, long]]


@pytest.mark.parametrize("fast_kernels", [True, False])
def test_mixed_step_equals_two_calls(fast_kernels, tiny_gpt2_dir):
    """Step by step, the mixed forward's decode and chunk logits and the caches they leave equal the two
    separate calls (with fastserve's fp32 decode attention and with plain SDPA)."""
    import torch

    backends = []
    for mixed in (True, False):
        engine = make_engine(tiny_gpt2_dir, max_batch_size=4, prefill_chunk_tokens=16)
        if not fast_kernels:
            from fastserve_cli.serve.backends import TorchBackend

            engine.backend = TorchBackend(tiny_gpt2_dir, device="cpu", fast_kernels=False)
            engine.backend.max_rows = 4
        engine.backend.mixed = mixed
        backends.append(engine.backend)
    short, long_ids = workload(make_engine(tiny_gpt2_dir).tokenizer)
    logits = {}
    for be in backends:
        streams = [greedy_request(p, 10) for p in short]
        be.prefill_batch(streams)
        for r in streams:
            r.output_ids.append(1)
        long = greedy_request(long_ids, 1)
        steps = []
        for start in range(0, 64, 16):
            decoded, prefilled = be.step(streams, [long], [16])
            for r in streams:
                r.output_ids.append(2 + start % 7)
            steps.append((decoded, prefilled))
        logits[be.mixed] = (steps, [t.clone() for t in long.kv[0]], [t.clone() for t in be.packed.row_kv(0)[0]])
    assert backends[0].mixed_steps == 4 and backends[1].mixed_steps == 0
    (mixed_steps, mixed_long, mixed_row), (plain_steps, plain_long, plain_row) = logits[True], logits[False]
    for (d1, p1), (d2, p2) in zip(mixed_steps, plain_steps):
        torch.testing.assert_close(d1, d2, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(p1, p2, atol=2e-4, rtol=1e-4)
    for a, b in zip(mixed_long + mixed_row, plain_long + plain_row):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_chunked_prefill_beside_decodes_gives_the_same_greedy_outputs(tiny_gpt2_dir):
    """End to end through the engine: mixed forwards on and off give identical greedy outputs, and the
    chunk iterations did run as mixed forwards."""
    on = make_engine(tiny_gpt2_dir, max_batch_size=4, prefill_chunk_tokens=8)
    off = make_engine(tiny_gpt2_dir, max_batch_size=4, prefill_chunk_tokens=8)
    assert run_streams_and_long_prompt(on, True) == run_streams_and_long_prompt(off, False)
    assert on.backend.mixed_steps >= 8 and off.backend.mixed_steps == 0  # 70 tokens in chunks of 8
    assert on.kv.used(on.live, "device") == 0


def test_other_architectures_keep_two_calls(tmp_path, tiny_tokenizer_dir):
    from fastserve_cli.serve.mixed_forward import supports_mixed_forward
    from fastserve_cli.testing.models import make_tiny_model

    engine = make_engine(make_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "llama"), prefill_chunk_tokens=8)
    assert not supports_mixed_forward(engine.backend.model) and not engine.backend.mixed
    assert run_streams_and_long_prompt(engine, False)  # the engine's step still runs decode and prefill
