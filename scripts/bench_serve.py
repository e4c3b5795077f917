"""Serving benchmark: `fastserve serve` against HF generate() and `transformers serve --continuous-batching`.

One seeded workload -- Poisson arrivals, prompts of 16-256 tokens cut from stdlib sources, heavy-tailed
(Pareto) output lengths fixed by max_tokens + ignore_eos -- is replayed against:
  1. fastserve serve (torch backend, and onnx when --onnx-dir is given), a real process, async HTTP client;
  2. HF `generate()` one request at a time (in this process; a virtual clock queues the requests);
  3. HF `generate()` in static left-padded batches of up to 8 (same virtual-clock queue);
  4. `transformers serve --continuous-batching` (a real process, same HTTP client).
Reported per system: throughput (generated tokens / makespan), time to first token, inter-token latency,
P50/mean/P99 job completion time, and throughput ratios. Also batch-1 decode speed vs the memory-bandwidth
bound (model bytes / measured read bandwidth).

    .venv/bin/python scripts/bench_serve.py --model-dir /tmp/bench/gpt2-124m --requests 48 --rate 4

The model (GPT-2-small shape, 124M, random init, fp32) and its tokenizer are built on first use.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from fastserve_cli.core.stats import percentile
from fastserve_cli.testing.corpus import corpus_ids, cut_prompt
from fastserve_cli.testing.models import gpt2_small_dir
from fastserve_cli.testing.replay import Job, Stream, replay_sync
from fastserve_cli.testing.server import free_port, running_process, running_server

# ------------------------------------------------------------------ model and workload


def make_workload(tokenizer, n: int, rate: float, seed: int, max_out: int) -> list[Job]:
    """Poisson arrivals at `rate`/s; prompts of 16-256 tokens; Pareto(1.5) output lengths from 16, capped."""
    rng = random.Random(seed)
    corpus = corpus_ids(tokenizer, ("textwrap.py", "argparse.py", "json/decoder.py"))
    jobs, t = [], 0.0
    for _ in range(n):
        t += rng.expovariate(rate)
        prompt = cut_prompt(tokenizer, corpus, rng.randint(16, 256), rng)
        out = min(max_out, int(16 * (1 - rng.random()) ** (-1 / 1.5)))
        jobs.append(Job(t, prompt, out, len(tokenizer(prompt)["input_ids"])))
    return jobs


# ------------------------------------------------------------------ results


def summarize(name: str, streams: list[Stream]) -> dict:
    """Throughput over the makespan, TTFT, inter-token latency and JCT percentiles (`core.stats.percentile`)."""
    ok = [t for t in streams if t.error is None and t.end is not None]
    makespan = max(t.end for t in ok) - min(t.sent for t in streams)
    jct = [t.end - t.sent for t in ok]
    ttft = [t.first_token - t.sent for t in ok if t.first_token is not None]
    itl = [b - a for t in ok for a, b in zip(t.token_times, t.token_times[1:])]
    return {
        "system": name,
        "requests": len(streams),
        "errors": len(streams) - len(ok),
        "generated_tokens": sum(t.tokens for t in ok),
        "makespan_s": makespan,
        "throughput_tok_s": sum(t.tokens for t in ok) / makespan,
        "ttft_mean_s": statistics.fmean(ttft) if ttft else None,
        "ttft_p99_s": percentile(ttft, 99) if ttft else None,
        "itl_mean_s": statistics.fmean(itl) if itl else None,
        "jct_p50_s": percentile(jct, 50),
        "jct_mean_s": statistics.fmean(jct),
        "jct_p99_s": percentile(jct, 99),
    }


# ------------------------------------------------------------------ HTTP replay (our server, transformers serve)


def bench_fastserve(model_dir: Path, jobs: list[Job], backend: str, args) -> dict:
    log = Path(args.out).with_suffix(f".{backend}.log")
    threads = ["--threads", str(args.threads)] if args.threads else []
    with running_server(
        model_dir,
        "--backend",
        backend,
        "--model-name",
        "bench",
        *threads,
        "--scheduler",
        args.scheduler,
        "--max-batch-size",
        str(args.max_batch_size),
        "--max-queue",
        "100000",
        "--kv-cache-memory",
        "4GiB",
        log_path=log,
    ) as (url, _):
        replay_sync(url, "bench", jobs[:2], ignore_eos=True)  # warm-up
        streams = replay_sync(url, "bench", jobs, ignore_eos=True)
        single = replay_sync(url, "bench", [Job(0.0, jobs[0].prompt, 128, jobs[0].prompt_len)], ignore_eos=True)[0]
    result = summarize(f"fastserve ({backend})", streams)
    result["batch1_decode_tok_s"] = (len(single.token_times) - 1) / (single.token_times[-1] - single.token_times[0])
    return result


def bench_transformers_serve(model_dir: Path, jobs: list[Job], args) -> dict:
    port = free_port()
    cmd = [
        str(Path(sys.executable).parent / "transformers"),
        "serve",
        str(model_dir),
        "--continuous-batching",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--dtype",
        "float32",
    ]
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    url = f"http://127.0.0.1:{port}"
    with running_process(cmd, url, env, Path(args.out).with_suffix(".transformers-serve.log"), ready_timeout=300):
        replay_sync(url, str(model_dir), jobs[:2])
        streams = replay_sync(url, str(model_dir), jobs)
    return summarize("transformers serve --continuous-batching", streams)


# ------------------------------------------------------------------ HF generate baselines (virtual clock)


class TimingStreamer:
    """generate() calls put() with the prompt first, then once per step with the new tokens."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_generate(model, tokenizer, batch: list[Job]):
    """One generate() over a left-padded batch; returns (duration, per-step offsets from the start)."""
    import torch

    tokenizer.padding_side = "left"
    enc = tokenizer([j.prompt for j in batch], return_tensors="pt", padding=True)
    streamer = TimingStreamer()
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            **enc,
            max_new_tokens=max(j.max_tokens for j in batch),
            min_new_tokens=max(j.max_tokens for j in batch),
            do_sample=False,
            streamer=streamer,
            pad_token_id=tokenizer.pad_token_id,
        )
    return time.perf_counter() - t0, [t - t0 for t in streamer.times[1:]]


def bench_hf(model, tokenizer, jobs: list[Job], batch_size: int) -> dict:
    """Requests queue in arrival order; each generate() takes up to `batch_size` requests already arrived."""
    clock, i, traces = 0.0, 0, []
    while i < len(jobs):
        clock = max(clock, jobs[i].arrival)
        batch = [jobs[i]]
        while len(batch) < batch_size and i + len(batch) < len(jobs) and jobs[i + len(batch)].arrival <= clock:
            batch.append(jobs[i + len(batch)])
        duration, steps = hf_generate(model, tokenizer, batch)
        for job in batch:
            mine = steps[: job.max_tokens]
            traces.append(
                Stream(
                    sent=job.arrival,
                    first_token=clock + mine[0],
                    end=clock + duration,
                    token_times=[clock + s for s in mine],
                    tokens=job.max_tokens,
                )
            )
        clock += duration
        i += len(batch)
    label = "HF generate, one at a time" if batch_size == 1 else f"HF generate, static batches of {batch_size}"
    return summarize(label, traces)


def read_bandwidth_gbs(seconds: float = 3.0) -> tuple[float, float]:
    """Read bandwidth of a 1 GiB sum: (bytes over time across `seconds` of back-to-back sums, best single sum).

    The bound uses the first. This VM's cores flip between two speeds about 2x apart every few seconds
    (a fixed Python loop took 19-23 or 36-41 ms, alternating), and single sums ranged 31-76 GB/s over the
    days: a best-of bound comes from the fast phase, while the batch-1 decode it bounds is timed over a
    128-token request (~2 s) that spans both. So both are averages over seconds.
    """
    import torch

    x = torch.ones(256 * 2**20, dtype=torch.float32)  # 1 GiB
    x.sum()
    best, count, start = float("inf"), 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        x.sum()
        best, count = min(best, time.perf_counter() - t0), count + 1
    nbytes = x.numel() * 4
    return nbytes * count / (time.perf_counter() - start) / 1e9, nbytes / best / 1e9


# ------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/bench/gpt2-124m"))
    parser.add_argument("--onnx-dir", type=Path, default=None, help="Also benchmark --backend onnx on this export.")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--rate", type=float, default=4.0, help="Poisson arrival rate (requests/s).")
    parser.add_argument("--max-out", type=int, default=256)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="Intra-op threads for every system (all cores when unset)."
    )
    parser.add_argument(
        "--scheduler",
        default="fcfs",
        help="fastserve's scheduler; fcfs by default, the order transformers serve and HF generate use",
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=["hf1", "hf8", "tserve", "torch"])
    parser.add_argument("--out", default="bench_serve.json")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = gpt2_small_dir(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    jobs = make_workload(tokenizer, args.requests, args.rate, args.seed, args.max_out)
    print(
        f"workload: {len(jobs)} requests over {jobs[-1].arrival:.1f} s, prompts "
        f"{min(j.prompt_len for j in jobs)}-{max(j.prompt_len for j in jobs)} tokens, outputs "
        f"mean {statistics.fmean(j.max_tokens for j in jobs):.0f} max {max(j.max_tokens for j in jobs)} tokens",
        flush=True,
    )
    results = []
    if "torch" not in args.skip:
        results.append(bench_fastserve(model_dir, jobs, "torch", args))
        print(json.dumps(results[-1]), flush=True)
    if args.onnx_dir:
        results.append(bench_fastserve(args.onnx_dir, jobs, "onnx", args))
        print(json.dumps(results[-1]), flush=True)
    if "tserve" not in args.skip:
        results.append(bench_transformers_serve(model_dir, jobs, args))
        print(json.dumps(results[-1]), flush=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for size, key in ((8, "hf8"), (1, "hf1")):
        if key not in args.skip:
            results.append(bench_hf(model, tokenizer, jobs, size))
            print(json.dumps(results[-1]), flush=True)
    bandwidth, best_bandwidth = read_bandwidth_gbs()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bound = bandwidth * 1e9 / model_bytes
    report = {
        "workload": {"requests": len(jobs), "rate": args.rate, "seed": args.seed},
        "read_bandwidth_gb_s": bandwidth,
        "best_read_bandwidth_gb_s": best_bandwidth,
        "model_bytes": model_bytes,
        "batch1_bound_tok_s": bound,
        "results": results,
    }
    atomic_dump(Path(args.out), report)
    print_table(report)


def atomic_dump(path: Path, obj) -> None:
    from fastserve_cli.core.rundir import atomic_write_json

    atomic_write_json(path, obj)


def print_table(report: dict) -> None:
    rows = report["results"]
    base = {r["system"]: r["throughput_tok_s"] for r in rows}
    print(f"\n{'system':44s} {'tok/s':>8s} {'TTFT':>7s} {'ITL':>7s} {'JCT p50':>8s} {'mean':>7s} {'p99':>7s} err")
    for r in rows:
        itl = f"{r['itl_mean_s']:7.3f}" if r["itl_mean_s"] is not None else "      -"
        print(
            f"{r['system']:44s} {r['throughput_tok_s']:8.1f} {r['ttft_mean_s']:7.2f} {itl} {r['jct_p50_s']:8.2f} "
            f"{r['jct_mean_s']:7.2f} {r['jct_p99_s']:7.2f} {r['errors']}"
        )
    for ours in (r for r in rows if r["system"].startswith("fastserve")):
        ratios = ", ".join(
            f"{ours['throughput_tok_s'] / v:.2f}x {k}" for k, v in base.items() if not k.startswith("fastserve")
        )
        print(
            f"{ours['system']}: {ratios}; batch-1 decode {ours['batch1_decode_tok_s']:.1f} tok/s = "
            f"{ours['batch1_decode_tok_s'] / report['batch1_bound_tok_s']:.0%} of the bandwidth bound "
            f"({report['batch1_bound_tok_s']:.0f} tok/s at {report['read_bandwidth_gb_s']:.0f} GB/s over 3 s of reads; "
            f"{ours['batch1_decode_tok_s'] * report['model_bytes'] / 1e9 / report['best_read_bandwidth_gb_s']:.0%} of "
            f"the best single read, {report['best_read_bandwidth_gb_s']:.0f} GB/s)"
        )


if __name__ == "__main__":
    main()
