"""Prefix-cache benchmark: time to first token of a request repeating a 1,000-token system prompt.

Each round builds a fresh system prompt (1,000 tokens cut from stdlib sources at a seeded offset) and sends,
through the serving engine (scheduler, KV manager, backend; stepped on this thread, no HTTP):
  1. cache on, first request (system prompt + question A): a miss, it fills the cache;
  2. cache on, second request (system prompt + question B): a hit on the system prompt's full blocks;
  3. cache off, the same second request.
The order of (1-2) and (3) alternates between rounds; timings on a shared VM drift, so the per-round ratios
and their spread are printed. Greedy outputs of (2) and (3) are compared token for token.

    flock /tmp/fastserve-bench.lock .venv/bin/python scripts/bench_prefix_cache.py --rounds 5

The model (GPT-2 shape, 12 layers x 768, context 2,048, a 4,096-token BPE, random init, fp32) is built on first
use in --model-dir and reused.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

from fastserve_cli.testing.corpus import corpus_ids, stdlib_texts
from fastserve_cli.testing.engine import greedy_request, make_engine, run_until_finished
from fastserve_cli.testing.models import GPT2Shape, gpt2_config, save_random_model, train_tokenizer
from fastserve_cli.testing.workload import BENCH_CORPUS


def model_dir(out: Path, layers: int, width: int) -> Path:
    """A GPT-2 of layers x width with a 2,048-token context (built once, then reused)."""
    path = out / f"gpt2-{layers}x{width}-ctx2048"
    if not (path / "config.json").is_file():
        tokenizer = train_tokenizer(stdlib_texts(BENCH_CORPUS), vocab_size=4096)
        save_random_model(gpt2_config(GPT2Shape(layers, width), tokenizer, positions=2048), path, tokenizer)
    return path


def ttft(engine, ids: list[int], new_tokens: int):
    """Time to first token (arrival to first sampled token) and the greedy output."""
    req = greedy_request(ids, new_tokens)
    run_until_finished(engine, [req])
    return req.first_token_time - req.arrival_time, req.output_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/bench"))
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="Also write the results as JSON here.")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    path = model_dir(args.model_dir, args.layers, args.width)
    on = make_engine(path, device_tokens=64_000, prefix_cache_tokens=64_000, block_size=args.block_size)
    off = make_engine(path, device_tokens=64_000)
    tok = on.tokenizer
    stream = corpus_ids(tok, BENCH_CORPUS)
    rng = random.Random(0)
    questions = [tok(q).input_ids for q in ("\n# Q: what does this do?\n", "\n# Q: find the bug here.\n")]
    for ids in (stream[:64], stream[:80]):  # warm-up: first calls, the miss and the hit path
        ttft(on, ids, 2), ttft(off, ids, 2)
    rows = []
    for r in range(args.rounds):
        start = rng.randrange(0, len(stream) - args.system_tokens)
        system = stream[start : start + args.system_tokens]
        on.kv.prefix.clear()
        row = {}

        def cached(row=row, system=system):
            row["miss_s"], _ = ttft(on, system + questions[0], args.new_tokens)
            row["hit_s"], row["hit_out"] = ttft(on, system + questions[1], args.new_tokens)

        def uncached(row=row, system=system):
            row["off_s"], row["off_out"] = ttft(off, system + questions[1], args.new_tokens)

        for run in (cached, uncached) if r % 2 == 0 else (uncached, cached):
            run()
        row["same_output"] = row.pop("hit_out") == row.pop("off_out")
        row["vs_first"] = row["miss_s"] / row["hit_s"]
        row["vs_off"] = row["off_s"] / row["hit_s"]
        rows.append(row)
        print(
            f"round {r}: first {row['miss_s'] * 1e3:7.1f} ms  second {row['hit_s'] * 1e3:6.1f} ms  "
            f"cache off {row['off_s'] * 1e3:7.1f} ms  -> {row['vs_first']:5.1f}x vs first, "
            f"{row['vs_off']:5.1f}x vs off, same greedy output: {row['same_output']}",
            flush=True,
        )
    stats = on.kv.prefix.stats
    report = {
        "model": path.name,
        "system_tokens": args.system_tokens,
        "block_size": args.block_size,
        "threads": torch.get_num_threads(),
        "rounds": rows,
        "hit_rate": stats.hit_rate,
    }
    for key in ("vs_first", "vs_off"):
        values = [row[key] for row in rows]
        report[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    print(
        f"\nTTFT speed-up of the second request ({args.system_tokens}-token system prompt, {args.rounds} rounds, "
        f"{report['threads']} threads, {path.name}):\n"
        f"  vs the first request: median {report['vs_first']['median']:.1f}x "
        f"(min {report['vs_first']['min']:.1f}x, max {report['vs_first']['max']:.1f}x)\n"
        f"  vs cache off:         median {report['vs_off']['median']:.1f}x "
        f"(min {report['vs_off']['min']:.1f}x, max {report['vs_off']['max']:.1f}x)\n"
        f"  greedy outputs equal in every round: {all(row['same_output'] for row in rows)}; "
        f"token hit rate {stats.hit_rate:.2f}"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
