#!/usr/bin/env python
"""Chunked vs whole prefill: what a long prompt arriving during decode does to the streams already running.

One engine (the server's Engine, KV manager and fcfs scheduler, stepped on this thread without HTTP) over a
random-init GPT-2 shape with a 2048-token context. Each round: `--streams` requests with short prompts decode
until their inter-token latency (ITL) is steady; their ITLs over `--steady-steps` iterations are the steady
value; then a `--prompt-tokens` prompt arrives and the streams' ITLs until its first token are the "during
prefill" sample. Rounds alternate chunked (`--chunk` tokens per iteration) and whole prefill, so drift on
this shared VM hits both alike. Printed per mode: steady P50/P99 ITL, P99 (and max) ITL during the prefill,
their ratio (the target: P99 during <= 2x steady P99 with chunking), the long prompt's time to first token,
and the spread of the ratio over rounds.

    flock /tmp/fastserve-bench.lock .venv/bin/python scripts/bench_prefill.py [--rounds 3] [--chunk 0 (auto)]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from fastserve_cli.core.stats import percentile
from fastserve_cli.serve.request import Request, SamplingParams


def model_dir(out: Path, layers: int, width: int) -> Path:
    """A GPT-2 of layers x width with n_positions 2048 (built once into `out`, then reused)."""
    from fastserve_cli.testing.models import GPT2Shape, gpt2_config, save_random_model, train_tokenizer
    from fastserve_cli.testing.workload import BENCH_CORPUS, stdlib_texts

    path = out / f"model-gpt2-{layers}x{width}-ctx2048"
    if (path / "config.json").is_file():
        return path
    tokenizer = train_tokenizer(stdlib_texts(BENCH_CORPUS), vocab_size=4096)
    return save_random_model(gpt2_config(GPT2Shape(layers, width), tokenizer, positions=2048), path, tokenizer)


def make_engine(path: Path, streams: int):
    from transformers import AutoTokenizer

    from fastserve_cli.serve.backends import TorchBackend
    from fastserve_cli.serve.engine import Engine
    from fastserve_cli.serve.kv_cache import KVCacheManager
    from fastserve_cli.serve.metrics import Metrics
    from fastserve_cli.serve.scheduler import make_scheduler

    backend = TorchBackend(path, device="cpu")
    kv = KVCacheManager(backend, 2**31, 2**31)
    tok = AutoTokenizer.from_pretrained(path)
    return Engine(backend, make_scheduler("fcfs"), kv, tok, Metrics("bench"), max_batch_size=streams + 1)


def request(rng: random.Random, length: int, new_tokens: int) -> Request:
    ids = [rng.randrange(10, 4000) for _ in range(length)]
    return Request(ids, SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True), time.perf_counter())


def one_round(engine, chunk: int | None, args, seed: int) -> dict:
    """Steady ITLs of the streams, then their ITLs while the long prompt prefills; everything freed after."""
    rng = random.Random(seed)
    engine.prefill_chunk_tokens = chunk
    running = [request(rng, args.stream_prompt, 100_000) for _ in range(args.streams)]
    engine.submit(running)
    while any(not r.output_ids for r in running):
        engine.step()
    for _ in range(args.warmup_steps):
        engine.step()

    def step_itls() -> list[float]:
        before = {id(r): r.last_token_time for r in running}
        engine.step()
        return [r.last_token_time - before[id(r)] for r in running]

    steady = [x for _ in range(args.steady_steps) for x in step_itls()]
    long = request(rng, args.prompt_tokens, 1)
    engine.submit([long])
    during, iterations = [], 0
    while not long.output_ids:
        during += step_itls()
        iterations += 1
    ttft = long.first_token_time - long.arrival_time
    engine.abort(running + [long])
    engine.step()
    assert not engine.live, "everything should be freed between rounds"
    engine.backend.packed = None
    return {
        "steady_p50_ms": 1e3 * percentile(steady, 50),
        "steady_p99_ms": 1e3 * percentile(steady, 99),
        "during_p99_ms": 1e3 * percentile(during, 99),
        "during_max_ms": 1e3 * max(during),
        "ratio_p99": percentile(during, 99) / percentile(steady, 99),
        "ttft_s": ttft,
        "prefill_iterations": iterations,
    }


def summary(rows: list[dict]) -> dict:
    keys = rows[0].keys()
    mid = {k: percentile([r[k] for r in rows], 50) for k in keys}
    ratios = [r["ratio_p99"] for r in rows]
    return {**mid, "ratio_min": min(ratios), "ratio_max": max(ratios)}


def main() -> None:
    from fastserve_cli.serve.profile import measure_backend

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench/prefill"))
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--stream-prompt", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument(
        "--chunk", type=int, default=0, help="chunked mode's tokens per chunk (0: auto, as the server's default)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds per mode, interleaved")
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--steady-steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    engine = make_engine(model_dir(args.out, args.layers, args.width), args.streams)
    if not args.chunk:  # serve.prefill_chunk_tokens: auto, from the profile the server measures at start-up
        profile = measure_backend(engine.backend, engine.max_batch_size)
        args.chunk = profile.chunk_tokens(engine.token_budget)
        print(f"auto chunk: {args.chunk} tokens (decode step {1e3 * profile.decode_s:.1f} ms)", flush=True)
    one_round(engine, args.chunk, args, seed=-1)  # warm-up: kernels, allocator
    rows: dict[str, list[dict]] = {"chunked": [], "whole": []}
    for i in range(args.rounds):
        for mode in ("chunked", "whole") if i % 2 == 0 else ("whole", "chunked"):
            rows[mode].append(one_round(engine, args.chunk if mode == "chunked" else None, args, seed=i))
            print(mode, json.dumps({k: round(v, 3) for k, v in rows[mode][-1].items()}), flush=True)
    report = {"args": {k: str(v) for k, v in vars(args).items()}, **{m: summary(r) for m, r in rows.items()}}
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(
        f"\n{args.layers}x{args.width} GPT-2 (ctx 2048), {args.streams} streams decoding, a {args.prompt_tokens}-token "
        f"prompt arrives; medians over {args.rounds} interleaved rounds per mode"
    )
    print(
        f"{'mode':<16}{'steady P50':>11}{'steady P99':>11}{'during P99':>11}{'max':>9}{'P99 ratio':>10}"
        f"{'(min-max)':>14}{'TTFT s':>8}{'iters':>6}"
    )
    for mode, label in (("chunked", f"chunk {args.chunk}"), ("whole", "whole")):
        s = report[mode]
        print(
            f"{label:<16}{s['steady_p50_ms']:>9.1f}ms{s['steady_p99_ms']:>9.1f}ms{s['during_p99_ms']:>9.1f}ms"
            f"{s['during_max_ms']:>7.0f}ms{s['ratio_p99']:>9.2f}x{s['ratio_min']:>7.2f}-{s['ratio_max']:<6.2f}"
            f"{s['ttft_s']:>8.2f}{s['prefill_iterations']:>6.0f}"
        )
    print(
        f"target: chunked P99 during prefill <= 2x steady P99: {'met' if report['chunked']['ratio_p99'] <= 2 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
