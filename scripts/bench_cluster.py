#!/usr/bin/env python
"""Cluster benchmark: what Ray Serve replicas cost and gain on this machine, and routing beyond it.

Measured (one Ray instance started here; ingress processes join it):
  (a) today's single process, 2 threads;  (b) 1 replica behind Ray (2 threads);  (c) 2 replicas x 1 thread.
  - the same seeded trace (heavy-tailed outputs) sent closed-loop with a fixed concurrency to each, rounds
    interleaved a, b, c, a, b, c: output tokens/s, mean JCT; ratios b/a and c/a;
  - Ray's added latency: median of a 1-token completion through (b)'s ingress minus direct to (a).
Simulated (fastserve_cli/serve/cluster/sim.py, the real policies and skip-join MLFQ over a linear iteration
cost fitted to this model's measured decode/prefill times with 1 thread): 8 and 64 replicas, routers
round-robin / least-loaded / prefix, rho 0.5 / 0.8 / 0.9; mean and P99 JCT, per-token latency; a PNG.

    flock /tmp/fastserve-bench.lock .venv/bin/python scripts/bench_cluster.py [--out runs/bench-cluster]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import time
from pathlib import Path
from typing import Sequence

from fastserve_cli.testing.replay import Job, checked, completion_body, http_client, stream_completion
from fastserve_cli.testing.server import running_server
from fastserve_cli.testing.workload import bench_model_dir, heavy_tailed_jobs

ROOT = Path(__file__).resolve().parent.parent

ROUTERS = ("round-robin", "least-loaded", "prefix")


def server_args(kind: str, address: str, batch: int) -> list[str]:
    common = ["--model-name", "bench", "--max-batch-size", str(batch), "--set", "serve.max_queue=100000"]
    if kind == "a":  # OMP_NUM_THREADS is set in env_for("a"), as Ray sets it for (b)'s replica
        return [*common, "--threads", "2"]
    if kind in "bost":  # o: (b) over Ray's object-ref transport; s: 4 tokens an item; t: 1 intra-op thread
        transport = "object-ref" if kind == "o" else "grpc"
        threads = "1" if kind == "t" else "2"
        return [
            *common,
            *("--replicas", "1", "--ray-address", address, "--threads", threads, "--set", "serve.replica_cpus=2"),
            *("--set", f"serve.ray_transport={transport}"),
            *("--set", f"serve.replica_stream_interval={4 if kind == 's' else 1}"),
        ]
    return [*common, "--replicas", "2", "--ray-address", address, "--threads", "1", "--set", "serve.replica_cpus=1"]


def env_for(kind: str) -> dict[str, str]:
    """Ray sets OMP_NUM_THREADS to a replica's CPUs; (a) gets the same, or its 2 OpenMP threads spin-wait
    for descheduled peers on a busy VM (measured 7x slower per iteration without it)."""
    env = {"HF_HUB_OFFLINE": "1"}
    return {**env, "OMP_NUM_THREADS": "2"} if kind == "a" else env


async def closed_loop(url: str, jobs: Sequence[Job], concurrency: int) -> dict[str, float]:
    """The trace's requests in order (arrival times ignored), `concurrency` in flight: tokens/s and mean JCT."""
    queue, rows = list(jobs), []
    async with http_client() as client:
        t0 = time.perf_counter()

        async def worker() -> None:
            while queue:
                job = queue.pop(0)
                body = completion_body("bench", job.prompt, job.max_tokens, ignore_eos=True)
                rows.append(checked(await stream_completion(client, url, body, t0), job.max_tokens))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        span = time.perf_counter() - t0
    return {"tokens_s": sum(r[3] for r in rows) / span, "mean_jct": statistics.mean(r[2] - r[0] for r in rows)}


def one_token_latency(url: str, count: int) -> list[float]:
    import httpx

    body = {"model": "bench", "prompt": "def f(", "max_tokens": 1, "temperature": 0}
    out = []
    with httpx.Client(timeout=30) as client:
        for _ in range(count):
            t = time.perf_counter()
            client.post(f"{url}/v1/completions", json=body).raise_for_status()
            out.append(time.perf_counter() - t)
    return out


def measured(model_dir: Path, out: Path, args) -> dict[str, dict]:
    import ray
    from ray import serve

    from fastserve_cli.serve.cluster.deploy import LOCAL_SYSTEM_CONFIG

    # address="local": a Ray instance of our own, never another user's `ray start` one (shut down below)
    ray.init(
        address="local",
        num_cpus=6,
        include_dashboard=False,
        logging_level="WARNING",
        _system_config=LOCAL_SYSTEM_CONFIG,
    )
    address = ray.get_runtime_context().gcs_address
    jobs = heavy_tailed_jobs(model_dir, args.seed, args.requests)
    kinds = args.kinds
    results: dict[str, dict] = {k: {"tokens_s": [], "mean_jct": [], "latency": []} for k in kinds}
    try:
        with contextlib.ExitStack() as stack:
            urls = {}
            for kind in kinds:
                urls[kind] = stack.enter_context(
                    running_server(
                        model_dir,
                        *server_args(kind, address, args.batch),
                        log_path=out / f"server-{kind}.log",
                        env=env_for(kind),
                    )
                )[0]
            for kind in kinds:  # warm-up
                one_token_latency(urls[kind], 5)
            for rnd in range(args.rounds):
                for kind in kinds:
                    r = asyncio.run(closed_loop(urls[kind], jobs, args.concurrency))
                    results[kind]["tokens_s"].append(r["tokens_s"])
                    results[kind]["mean_jct"].append(r["mean_jct"])
                    print(
                        f"round {rnd} ({kind}): {r['tokens_s']:.0f} tok/s, mean JCT {r['mean_jct']:.2f} s", flush=True
                    )
                for kind in kinds.replace("c", ""):
                    results[kind]["latency"] += one_token_latency(urls[kind], args.latency_requests)
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
    return results


def profile_cost(model_dir: Path, batch: int):
    """This model's iteration cost with 1 thread (a (c)-style replica), fitted to simulate.py's linear form."""
    import torch

    from fastserve_cli.serve.backends import load_backend
    from fastserve_cli.serve.cluster.sim import fit_cost
    from fastserve_cli.serve.profile import measure_backend

    torch.set_num_threads(1)
    backend = load_backend("torch", model_dir, 1, True)
    backend.max_rows = batch
    full = measure_backend(backend, batch, repeats=5)
    backend.max_rows = 1
    one = measure_backend(backend, 1, repeats=5)
    return fit_cost(one.decode_s, full.decode_s, batch, (8, full.prefill_s(8)), (256, full.prefill_s(256)))


def simulated(cost, args) -> list[dict]:
    from fastserve_cli.serve.cluster.sim import run_grid

    return run_grid(cost, args.batch, args.sizes, ROUTERS, args.loads, seed=args.seed, per_replica=args.per_replica)


def report_measured(res: dict) -> list[str]:
    med = {k: statistics.median(v["tokens_s"]) for k, v in res.items()}
    spread = {k: (min(v["tokens_s"]), max(v["tokens_s"])) for k, v in res.items()}
    lat = {k: statistics.median(res[k]["latency"]) * 1000 for k in res if k != "c"}
    lines = ["| setup | tokens/s (median, min-max) | mean JCT s | ratio to (a) |", "|---|---|---|---|"]
    names = {
        "a": "(a) single process, 2 threads",
        "b": "(b) 1 replica behind Ray",
        "o": "(b) with ray_transport object-ref",
        "s": "(b) with replica_stream_interval 4",
        "t": "(b) with 1 intra-op thread (a core left to the ingress)",
        "c": "(c) 2 replicas x 1 thread",
    }
    for k in res:
        lines.append(
            f"| {names[k]} | {med[k]:.0f} ({spread[k][0]:.0f}-{spread[k][1]:.0f}) | "
            f"{statistics.median(res[k]['mean_jct']):.2f} | {med[k] / med['a']:.2f}x |"
        )
    added = lat["b"] - lat["a"]
    lines += [
        "",
        f"1-token completion median: direct {lat['a']:.1f} ms, through the Ray ingress {lat['b']:.1f} ms: "
        f"added {added:.1f} ms (target <= 5 ms: {'met' if added <= 5 else 'NOT met'})",
        f"(b) throughput / (a) = {med['b'] / med['a']:.3f} (target >= 0.95: "
        f"{'met' if med['b'] / med['a'] >= 0.95 else 'NOT met'})",
    ]
    for k, what in (("o", "object-ref transport"), ("s", "replica_stream_interval 4"), ("t", "1 replica thread")):
        if k in res:
            lines.append(f"{what}: {med[k] / med['a']:.3f}x (a)'s throughput, added latency {lat[k] - lat['a']:.1f} ms")
    return lines


def report_simulated(rows: list[dict]) -> list[str]:
    lines = [
        "| replicas | rho | router | mean JCT s | P99 JCT s | per-token ms | P99 vs round-robin |",
        "|---|---|---|---|---|---|---|",
    ]
    base = {(r["replicas"], r["rho"]): r for r in rows if r["router"] == "round-robin"}
    for r in rows:
        b = base[(r["replicas"], r["rho"])]
        lines.append(
            f"| {r['replicas']} | {r['rho']} | {r['router']} | {r['mean_jct']:.3f} | {r['p99_jct']:.3f} | "
            f"{r['mean_per_token_latency'] * 1000:.2f} | {b['p99_jct'] / r['p99_jct']:.2f}x |"
        )
    for n in sorted({r["replicas"] for r in rows}):
        ll = next((r for r in rows if r["replicas"] == n and r["rho"] == 0.9 and r["router"] == "least-loaded"), None)
        if ll:
            rr = base[(n, 0.9)]["p99_jct"]
            lines.append(
                f"\n{n} replicas, rho 0.9: least-loaded P99 JCT {rr / ll['p99_jct']:.2f}x better than round-robin "
                f"(target >= 1.5x: {'met' if rr / ll['p99_jct'] >= 1.5 else 'NOT met'}); no router can beat "
                f"~{rr / ll['p99_floor']:.2f}x: P99 JCT with no queueing at all, every iteration a full batch, is "
                f"{ll['p99_floor']:.3f} s"
            )
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["replicas"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        for router in ROUTERS:
            pts = sorted((r["rho"], r["p99_jct"]) for r in rows if r["replicas"] == n and r["router"] == router)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=router)
        ax.set(title=f"{n} replicas (simulated)", xlabel="load rho", ylabel="P99 JCT (s)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def simulated_section(model_dir: Path, args) -> list[str]:
    if args.cost:
        from fastserve_cli.serve.simulate import LinearCost

        cost = LinearCost(*args.cost)
    else:
        cost = profile_cost(model_dir, args.batch)
    lines = [
        "## Simulated",
        "",
        f"iteration cost fitted to this model (1 thread): t0 {cost.t0 * 1000:.2f} ms + "
        f"{cost.td * 1000:.3f} ms per decode row + {cost.tp * 1e6:.1f} us per prefill token",
        "",
    ]
    rows = simulated(cost, args)
    lines += report_simulated(rows)
    (args.out / "simulated.json").write_text(json.dumps(rows))
    plot(rows, args.out / "cluster_sim.png")
    lines.append(f"\nplot: {args.out / 'cluster_sim.png'}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-cluster")
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--latency-requests", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 64])
    p.add_argument("--loads", type=float, nargs="+", default=[0.5, 0.8, 0.9])
    p.add_argument("--per-replica", type=int, default=300)
    p.add_argument(
        "--shape",
        default="4x256",
        help="Benchmark model LAYERSxWIDTH (GPT-2 blocks, 4,096-token vocabulary); 12x768 is GPT-2-small's body. "
        "Ray's cost per token is fixed, so its share shrinks as the model grows.",
    )
    p.add_argument(
        "--kinds",
        default="abc",
        help="Setups to measure, in round order: a, b, c as above; o = (b) with serve.ray_transport object-ref; "
        "s = (b) with serve.replica_stream_interval 4; t = (b) with --threads 1.",
    )
    p.add_argument("--skip-measured", action="store_true", help="Only the simulation.")
    p.add_argument("--skip-simulated", action="store_true", help="Only the measured part.")
    p.add_argument(
        "--cost",
        type=float,
        nargs=3,
        metavar=("T0", "TD", "TP"),
        help="Simulate with this iteration cost (seconds) instead of profiling the model now "
        "(the simulation is deterministic; only the profile is a timing).",
    )
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    layers, width = (int(v) for v in args.shape.lower().split("x"))
    model_dir = bench_model_dir(args.out, layers, width)
    lines: list[str] = []
    if not args.skip_measured:
        res = measured(model_dir, args.out, args)
        lines += ["## Measured on this machine", "", *report_measured(res), ""]
        (args.out / "measured.json").write_text(json.dumps(res))
    if not args.skip_simulated:
        lines += simulated_section(model_dir, args)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
