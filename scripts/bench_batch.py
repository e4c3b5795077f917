"""Batch inference benchmark: `fastserve batch` vs the same requests through `fastserve serve`, and vs HF generate().

One seeded request file (completions; prompts of 16-128 tokens cut from stdlib sources; max_tokens uniform in
[16, 64] with ignore_eos, so every system generates exactly the same number of tokens) is answered by:
  1. `fastserve batch` (a real process; its own timer: first line read to last record fsynced, model load excluded);
  2. `fastserve serve` with the same engine settings (a real process, loaded first), every request sent at once
     by an async HTTP client (non-streaming), timed from the first send to the last response;
  3. HF `generate()` in static left-padded batches of --max-batch-size in file order (in this process): each batch
     runs to its longest max_tokens, so only requested tokens count.
Systems are interleaved for --rounds rounds; reported per system: median throughput (requested tokens / wall)
with the min-max spread, and the ratios. Run it under the shared lock:

    flock /tmp/fastserve-bench.lock .venv/bin/python scripts/bench_batch.py --requests 96 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from fastserve_cli.testing.server import running_server

NAME = "bench"


def ensure_model(model_dir: Path) -> Path:
    """A small GPT-2 (4 layers, 256 wide, 8k BPE vocab from stdlib sources), random init, fp32; built once."""
    from fastserve_cli.testing.corpus import stdlib_sources
    from fastserve_cli.testing.models import GPT2Shape, gpt2_model_dir, train_tokenizer

    def tokenizer():
        return train_tokenizer(stdlib_sources(errors="ignore"), 8192, chat_tokens=True)

    return gpt2_model_dir(model_dir, GPT2Shape(layers=4, width=256, heads=4), tokenizer)


def make_requests(tokenizer, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = tokenizer("\n".join((stdlib / m).read_text(encoding="utf-8") for m in ("textwrap.py", "argparse.py")))[
        "input_ids"
    ]
    requests = []
    for i in range(n):
        length = rng.randint(16, 128)
        start = rng.randrange(len(corpus) - length)
        prompt = tokenizer.decode(corpus[start : start + length])
        requests.append(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/completions",
                "body": {
                    "model": NAME,
                    "prompt": prompt,
                    "max_tokens": rng.randint(16, 64),
                    "temperature": 0,
                    "ignore_eos": True,
                },
            }
        )
    return requests


def engine_flags(args) -> list[str]:
    threads = ["--threads", str(args.threads)] if args.threads else []
    return ["--model-name", NAME, "--max-batch-size", str(args.max_batch_size), "--kv-cache-memory", "2GiB", *threads]


def bench_batch(model_dir: Path, requests_path: Path, work: Path, args) -> float:
    out = work / f"out-{time.time_ns()}.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "fastserve_cli",
        "batch",
        str(model_dir),
        str(requests_path),
        "-o",
        str(out),
        "--json",
        *engine_flags(args),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    metrics = json.loads(proc.stdout)["metrics"]
    assert metrics["succeeded"] == args.requests, metrics
    return metrics["completion_tokens"] / metrics["elapsed_s"]


async def send_all(url: str, requests: list[dict]) -> tuple[int, float]:
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(3600), limits=httpx.Limits(max_connections=1000)) as http:
        start = time.perf_counter()
        responses = await asyncio.gather(*[http.post(f"{url}{r['url']}", json=r["body"]) for r in requests])
        wall = time.perf_counter() - start
    assert all(r.status_code == 200 for r in responses), [r.text[:200] for r in responses if r.status_code != 200][:1]
    return sum(r.json()["usage"]["completion_tokens"] for r in responses), wall


def bench_server(model_dir: Path, requests: list[dict], args) -> float:
    with running_server(model_dir, "--scheduler", "fcfs", "--max-queue", "100000", *engine_flags(args)) as (url, _):
        asyncio.run(send_all(url, requests[:2]))  # warm-up
        tokens, wall = asyncio.run(send_all(url, requests))
    return tokens / wall


def bench_hf(model_dir: Path, requests: list[dict], args) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    start = time.perf_counter()
    for i in range(0, len(requests), args.max_batch_size):
        batch = requests[i : i + args.max_batch_size]
        enc = tokenizer([r["body"]["prompt"] for r in batch], return_tensors="pt", padding=True)
        longest = max(r["body"]["max_tokens"] for r in batch)
        with torch.inference_mode():
            model.generate(
                **enc,
                max_new_tokens=longest,
                min_new_tokens=longest,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
    wall = time.perf_counter() - start
    return sum(r["body"]["max_tokens"] for r in requests) / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="/tmp/fastserve-bench/batch-gpt2-mini")
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    model_dir = ensure_model(Path(args.model_dir))
    requests = make_requests(AutoTokenizer.from_pretrained(model_dir), args.requests, args.seed)
    results: dict[str, list[float]] = {
        "fastserve batch": [],
        "fastserve serve (HTTP)": [],
        "HF generate, static batches": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        work = Path(tmp)
        requests_path = work / "requests.jsonl"
        requests_path.write_text("".join(json.dumps(r) + "\n" for r in requests))
        for round_ in range(args.rounds):  # interleaved: drift on this VM hits every system alike
            results["fastserve batch"].append(bench_batch(model_dir, requests_path, work, args))
            results["fastserve serve (HTTP)"].append(bench_server(model_dir, requests, args))
            results["HF generate, static batches"].append(bench_hf(model_dir, requests, args))
            print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.0f} tok/s" for k, v in results.items()), flush=True)
    tokens = sum(r["body"]["max_tokens"] for r in requests)
    print(
        f"\n{args.requests} requests, {tokens} generated tokens, max batch {args.max_batch_size}, {args.rounds} rounds"
    )
    median = {k: statistics.median(v) for k, v in results.items()}
    for name, values in results.items():
        print(f"  {name:30s} {median[name]:8.0f} tok/s  (min {min(values):.0f}, max {max(values):.0f})")
    batch = results["fastserve batch"]
    for other in ("fastserve serve (HTTP)", "HF generate, static batches"):
        ratios = [b / o for b, o in zip(batch, results[other])]
        print(
            f"  batch / {other}: {statistics.median(ratios):.2f}x  (per round: {', '.join(f'{r:.2f}' for r in ratios)})"
        )


if __name__ == "__main__":
    main()
