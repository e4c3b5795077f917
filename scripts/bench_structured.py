"""Structured-outputs benchmark: grammar engines (xgrammar vs llguidance) and the served cost of a JSON schema.

Part 1, in this process, per tokenizer (the 512-token test BPE and the 50k BPE of the 124M model): tokenizer
set-up, compile of a JSON schema (cold: a new schema), and the per-token mask time along random walks through
the grammar (a uniformly random allowed token each step, restarting when the grammar ends). llguidance is
measured when importable (`pip install llguidance`; it is not a dependency of fastserve).

Part 2, a real `fastserve serve` process on the 124M GPT-2 shape (random weights, fcfs scheduler, as
bench_serve): batch 1 and 16 concurrent streamed chat requests, each `--tokens` long, unconstrained vs
constrained by a JSON schema whose instances are long (an array of at least 1000 strings, so every request
runs to max_tokens). Rounds interleave the modes; reported: aggregate throughput (completion tokens /
makespan), mean inter-token latency, their spread over rounds, and the constrained/unconstrained ratio. Also
the server-side cost of a cold vs cached schema (latency of a 1-token request, new schema vs the same one).

    flock /tmp/fastserve-bench.lock .venv/bin/python scripts/bench_structured.py --model-dir /tmp/bench/gpt2-124m
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from pathlib import Path

from fastserve_cli.testing.models import gpt2_small_dir, tiny_tokenizer
from fastserve_cli.testing.server import running_server

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city"],
        },
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
# minItems keeps the grammar open, so constrained requests run to max_tokens exactly like ignore_eos ones.
LONG_SCHEMA = {
    "type": "object",
    "properties": {"lines": {"type": "array", "items": {"type": "string"}, "minItems": 1000}},
    "required": ["lines"],
    "additionalProperties": False,
}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# ------------------------------------------------------------------ part 1: engines


def _walk(fill, accept, allowed, restart, steps: int, seed: int) -> list[float]:
    """Per-token mask times (ms) along a random walk of `steps` tokens."""
    rng, times = random.Random(seed), []
    for _ in range(steps):
        t0 = time.perf_counter()
        fill()
        times.append((time.perf_counter() - t0) * 1e3)
        ids = allowed()
        if not ids:
            restart()
            continue
        token = rng.choice(ids)
        if not accept(token):
            restart()
    return times


def _allowed_ids(bitmask_row, vocab: int) -> list[int]:
    import torch

    bits = bitmask_row.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(32, dtype=torch.int64)
    flags = ((bits.unsqueeze(-1) >> shifts) & 1).flatten()[:vocab]
    return flags.nonzero().flatten().tolist()


def bench_xgrammar(tok, vocab: int, eos: int, steps: int, seed: int) -> dict:
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiler.compile_json_schema(json.dumps({**SCHEMA, "title": "another"}), any_whitespace=False)
    compile2_s = time.perf_counter() - t0
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    times = _walk(
        lambda: matcher.fill_next_token_bitmask(bitmask, 0),
        lambda t: matcher.accept_token(t),
        lambda: [t for t in _allowed_ids(bitmask[0], vocab) if t != eos] or [],
        matcher.reset,
        steps,
        seed,
    )
    return {"setup_s": setup, "compile_s": compile_s, "compile_new_schema_s": compile2_s, "mask_ms": times}


def bench_llguidance(tok, vocab: int, eos: int, steps: int, seed: int) -> dict | None:
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch as llt
    except ImportError:
        return None
    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab, eos_token=eos)
    setup = time.perf_counter() - t0
    options = {"whitespace_flexible": False}
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=options)
    matcher = llguidance.LLMatcher(lltok, grammar)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    llguidance.LLMatcher(
        lltok, llguidance.LLMatcher.grammar_from_json_schema({**SCHEMA, "title": "another"}, defaults=options)
    )
    compile2_s = time.perf_counter() - t0
    bitmask = llt.allocate_token_bitmask(1, vocab)
    times = _walk(
        lambda: llt.fill_next_token_bitmask(matcher, bitmask, 0),
        lambda t: matcher.consume_token(t),
        lambda: [t for t in _allowed_ids(bitmask[0], vocab) if t != eos] or [],
        matcher.reset,
        steps,
        seed,
    )
    assert not matcher.is_error(), matcher.get_error()
    return {"setup_s": setup, "compile_s": compile_s, "compile_new_schema_s": compile2_s, "mask_ms": times}


def part_engines(model_dir: Path, steps: int, walks: int) -> dict:
    from transformers import AutoTokenizer

    report = {}
    for label, path in (
        ("bpe-512 (tests)", tiny_tokenizer(model_dir.parent / "tokenizer-512")),
        ("bpe-50k (124M)", model_dir),
    ):
        tok = AutoTokenizer.from_pretrained(path)
        vocab, eos = len(tok), tok.eos_token_id
        runs: dict[str, list] = {"xgrammar": [], "llguidance": []}
        for walk in range(walks):  # interleaved: machine load drifts
            runs["xgrammar"].append(bench_xgrammar(tok, vocab, eos, steps, walk))
            runs["llguidance"].append(bench_llguidance(tok, vocab, eos, steps, walk))
        report[label] = {
            name: None
            if None in rs
            else {
                "setup_s": [r["setup_s"] for r in rs],
                "compile_s": [r["compile_s"] for r in rs],
                "compile_new_schema_s": [r["compile_new_schema_s"] for r in rs],
                "mask_ms": [t for r in rs for t in r["mask_ms"]],
                "walk_p99_ms": [pct(r["mask_ms"], 0.99) for r in rs],
            }
            for name, rs in runs.items()
        }
    return report


# ------------------------------------------------------------------ part 2: serving


async def run_batch(url: str, batch: int, tokens: int, fmt: dict | None) -> dict:
    import httpx

    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "Write JSON."}],
        "max_tokens": tokens,
        "temperature": 1.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if fmt is None:
        body["ignore_eos"] = True
    else:
        body["response_format"] = fmt

    async def one(client, seed: int) -> tuple[int, float, float]:
        stamps, used = [], 0
        async with client.stream("POST", f"{url}/v1/chat/completions", json={**body, "seed": seed}) as r:
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    used = chunk["usage"]["completion_tokens"]
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    stamps.append(time.perf_counter())
        return used, stamps[0], stamps[-1]

    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(client, s) for s in range(batch)))
        makespan = time.perf_counter() - t0
    total = sum(u for u, _, _ in results)
    itl = statistics.mean((last - first) / max(1, u - 1) for u, first, last in results)
    return {"tokens": total, "throughput": total / makespan, "itl_ms": itl * 1e3}


def cold_vs_cached(url: str, rounds: int) -> dict:
    import httpx

    def latency(schema: dict) -> float:
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 1,
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
        }
        t0 = time.perf_counter()
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600).raise_for_status()
        return time.perf_counter() - t0

    cold, cached = [], []
    for i in range(rounds):
        schema = {**SCHEMA, "title": f"schema-{i}-{random.random()}"}
        cold.append(latency(schema))
        cached.append(latency(schema))
    return {"cold_s": cold, "cached_s": cached}


def part_serve(model_dir: Path, rounds: int, tokens: int, batches: list[int]) -> dict:
    fmt = {"type": "json_schema", "json_schema": {"name": "lines", "schema": LONG_SCHEMA}}
    results: dict = {}
    args = ["--model-name", "m", "--scheduler", "fcfs", "--max-batch-size", str(max(batches))]
    with running_server(model_dir, *args, log_path=Path("/tmp/bench_structured_server.log")) as (url, _):
        asyncio.run(run_batch(url, 2, 8, fmt))  # warm-up (compiles the schema, touches the model)
        asyncio.run(run_batch(url, 2, 8, None))
        for r in range(rounds):
            for batch in batches:
                for mode in ("plain", "json") if r % 2 == 0 else ("json", "plain"):
                    out = asyncio.run(run_batch(url, batch, tokens, fmt if mode == "json" else None))
                    results.setdefault(f"{mode} b{batch}", []).append(out)
                    print(
                        f"round {r} batch {batch} {mode}: {out['throughput']:.1f} tok/s, ITL {out['itl_ms']:.1f} ms"
                        f" ({out['tokens']} tokens)",
                        flush=True,
                    )
        results["compile"] = cold_vs_cached(url, 3)
    return results


# ------------------------------------------------------------------ part 3: grammar share of the step time


def part_overhead(model_dir: Path, batch: int, tokens: int, rounds: int) -> dict:
    """In-process engine, `batch` constrained requests: time inside mask_logits + accept_tokens vs the whole
    iteration, measured in the same steps (so machine-load drift hits both alike) -> the throughput cost."""
    from transformers import AutoTokenizer

    import fastserve_cli.serve.grammar as grammar
    import fastserve_cli.serve.sampling as sampling
    from fastserve_cli.serve.backends import load_backend
    from fastserve_cli.serve.engine import Engine
    from fastserve_cli.serve.kv_cache import KVCacheManager
    from fastserve_cli.serve.metrics import Metrics
    from fastserve_cli.serve.request import Request, SamplingParams
    from fastserve_cli.serve.scheduler import make_scheduler

    spent = [0.0]

    def timed(fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[0] += time.perf_counter() - t0

        return wrapper

    grammar.mask_logits, grammar.accept_tokens = timed(grammar.mask_logits), timed(grammar.accept_tokens)
    backend = load_backend("torch", model_dir)
    kv = KVCacheManager(backend, 1 << 34, 0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    engine = Engine(backend, make_scheduler("fcfs"), kv, tok, Metrics("bench"), max_batch_size=batch, token_budget=8192)
    cache = grammar.GrammarCache(tok, backend.config["vocab_size"], sorted(backend.eos_token_ids))
    compiled = cache.get(grammar.GrammarSpec.json_schema(LONG_SCHEMA))
    prompt = tok("Write JSON.").input_ids
    shares = []
    for r in range(rounds):
        reqs = []
        for i in range(batch):
            req = Request(prompt, SamplingParams(max_new_tokens=tokens, temperature=1.0, seed=i), time.perf_counter())
            req.generator, req.grammar = sampling.make_generator(i), compiled.new_state()
            reqs.append(req)
        engine.submit(reqs)
        spent[0], total = 0.0, 0.0
        while not all(q.finished for q in reqs):
            t0 = time.perf_counter()
            engine.step()
            total += time.perf_counter() - t0
        shares.append(spent[0] / total)
        print(
            f"overhead round {r}: grammar {spent[0] * 1e3:.0f} ms of {total * 1e3:.0f} ms ({100 * shares[-1]:.1f}%)",
            flush=True,
        )
    return {"batch": batch, "share": shares}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/bench/gpt2-124m"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--mask-steps", type=int, default=500)
    ap.add_argument("--walks", type=int, default=4, help="random walks per engine (interleaved), mask-steps each")
    ap.add_argument("--skip-serve", action="store_true")
    ap.add_argument("--skip-engines", action="store_true")
    ap.add_argument("--overhead-only", action="store_true", help="only part 3 (grammar share of step time)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_structured.json"))
    args = ap.parse_args()
    model_dir = gpt2_small_dir(args.model_dir)
    report: dict = {}
    if args.overhead_only:
        report["overhead"] = [
            part_overhead(model_dir, b, args.tokens, args.rounds) for b in (int(x) for x in args.batches.split(","))
        ]
        args.out.write_text(json.dumps(report, indent=1))
        return
    if not args.skip_engines:
        report["engines"] = part_engines(model_dir, args.mask_steps, args.walks)
        print_engines(report["engines"])
    if not args.skip_serve:
        report["serve"] = part_serve(model_dir, args.rounds, args.tokens, [int(b) for b in args.batches.split(",")])
        print_serve(report["serve"], [int(b) for b in args.batches.split(",")])
    args.out.write_text(json.dumps(report, indent=1))


def print_engines(engines: dict) -> None:
    print(
        "\n| tokenizer | engine | tokenizer set-up s | compile s (first / new schema) | mask ms/token p50 / mean / p99 "
        "| p99 per walk |"
    )
    print("|---|---|---|---|---|---|")
    for label, per in engines.items():
        for name, r in per.items():
            if r is None:
                print(f"| {label} | {name} | not installed | | |")
                continue
            m, med = r["mask_ms"], statistics.median
            print(
                f"| {label} | {name} | {med(r['setup_s']):.3f} | {med(r['compile_s']):.3f} / "
                f"{med(r['compile_new_schema_s']):.3f} | {pct(m, 0.5):.4f} / {statistics.mean(m):.4f} / "
                f"{pct(m, 0.99):.4f} | {', '.join(f'{x:.2f}' for x in r['walk_p99_ms'])} |"
            )


def print_serve(serve: dict, batches: list[int]) -> None:
    print("\n| batch | mode | throughput tok/s (min..max) | mean ITL ms (min..max) | json/plain throughput |")
    print("|---|---|---|---|---|")
    for b in batches:
        plain = statistics.mean(x["throughput"] for x in serve[f"plain b{b}"])
        for mode in ("plain", "json"):
            runs = serve[f"{mode} b{b}"]
            tp, itl = [x["throughput"] for x in runs], [x["itl_ms"] for x in runs]
            ratio = statistics.mean(tp) / plain
            print(
                f"| {b} | {mode} | {statistics.mean(tp):.1f} ({min(tp):.1f}..{max(tp):.1f}) | "
                f"{statistics.mean(itl):.1f} ({min(itl):.1f}..{max(itl):.1f}) | {ratio:.3f} |"
            )
        pairs = [j["throughput"] / p["throughput"] for j, p in zip(serve[f"json b{b}"], serve[f"plain b{b}"])]
        print(f"|   | per-round ratio | {', '.join(f'{x:.3f}' for x in pairs)} | | |")
    c = serve["compile"]
    print(
        f"\nschema cold vs cached (1-token request latency, s): cold {', '.join(f'{x:.3f}' for x in c['cold_s'])}; "
        f"cached {', '.join(f'{x:.3f}' for x in c['cached_s'])}"
    )


if __name__ == "__main__":
    main()
