#!/usr/bin/env python
"""Scheduling benchmark: fcfs vs skip-join-mlfq vs oracle SRPT on the real server, same seeded traces.

For each policy a real `fastserve serve` process is started on 127.0.0.1 and the same trace is replayed to
one policy at a time (or to each policy beside an fcfs server at the same moments with --together, every
ratio then against the fcfs run beside it), with an async HTTP client (streaming completions, `max_tokens`
+ `ignore_eos` fix each output length, as FastServe's own client does).
Capacity is measured right before each replay, on the trace itself and with the same servers busy as in
the replay: a saturated window (twice the batch size in flight, so the batch stays full; the trace's
requests in a seeded random order) counting output tokens/s. Each replay is then a Poisson process at rho x that capacity.
Capacity is measured again after the replay, and the table's "effective rho" is the offered load over the
mean of the two: how loaded the machine really was, which on this VM can differ from the label by +-20%.
Output lengths are heavy-tailed: 85% in [8, 32] tokens, 15% in [256, 512]. Reported per policy and load:
mean, P50 and P99 job completion time (JCT), mean per-token
latency (JCT / output tokens, the paper's metric), mean time to first token, throughput, fcfs / policy
ratios, and the fraction of the fcfs run during which its batch was full; plus a PNG of per-token latency
against load.

    .venv/bin/python scripts/bench_scheduling.py [--requests 1000] [--loads 0.5 0.8 0.9] [--seed 0]

The model is a random-init GPT-2 shape (default 4 layers, 256 wide) with a BPE trained on stdlib sources,
built into the output directory. Server processes run torch with one thread (--threads), so timings on a
shared 2-core machine stay stable; all policies get the same setting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen
from typing import Sequence

from fastserve_cli.serve.simulate import summarize
from fastserve_cli.testing.replay import Job, checked, completion_body, http_client, replay, stream_completion
from fastserve_cli.testing.server import cpu_seconds, fastserve_counters, running_server, wait_ready
from fastserve_cli.testing.workload import bench_model_dir, heavy_tailed_jobs

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ("fcfs", "skip-join-mlfq", "srpt-oracle")


# ---------------------------------------------------------------- servers and client


@dataclass
class Server:
    """A `fastserve serve` process on 127.0.0.1 with one scheduler."""

    url: str
    proc: Popen
    log: Path

    def metrics(self) -> dict[str, float]:
        import httpx

        return fastserve_counters(httpx.get(self.url + "/metrics", timeout=10).text)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)


def start_servers(stack: contextlib.ExitStack, model_dir: Path, args) -> dict[str, Server]:
    """One server per policy, all started at once, then waited for; `stack` stops them (SIGTERM)."""
    env = {"OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    servers = {}
    for policy in args.policies:
        log = args.out / f"server-{policy}.log"
        url, proc = stack.enter_context(
            running_server(
                model_dir,
                "--set",
                f"serve.scheduler={policy}",
                "--set",
                f"serve.max_batch_size={args.batch_size}",
                "--set",
                "serve.model_name=bench",
                "--set",
                "serve.max_queue=100000",
                env=env,
                log_path=log,
                ready=False,
            )
        )
        servers[policy] = Server(url, proc, log)
    for server in servers.values():
        wait_ready(server.url, server.proc, 300.0, server.log)
    return servers


async def replay_records(url: str, jobs: Sequence[Job], rate: float) -> list[tuple[float, float, float, int]]:
    """The trace sent open-loop at `rate` x its unit rate; one checked record per request."""
    streams = await replay(url, "bench", jobs, rate, ignore_eos=True)
    return [checked(stream, job.max_tokens) for stream, job in zip(streams, jobs)]


async def generation_tokens(client, server: Server) -> float:
    """The server's generation-token counter, read without blocking the event loop."""
    return fastserve_counters((await client.get(server.url + "/metrics")).text)["fastserve:generation_tokens_total"]


async def measure_capacity(
    server: Server, jobs: Sequence[Job], concurrency: int, seconds: float, warmup: float = 5.0, seed: int = 0
) -> tuple[float, int]:
    """Output tokens/s of this trace at saturation: its requests in a seeded random order (so any window has
    the trace's long/short mix and prompt lengths), `concurrency` always in flight (the batch stays full).
    Returns (tokens/s, requests issued inside the window).

    Counted on the server's generation-token counter over `seconds` after a warm-up, so requests running at
    either edge count for the tokens they made inside it; the requests still in flight are then cancelled.
    """
    order = list(range(len(jobs)))
    random.Random(seed).shuffle(order)
    async with http_client() as client:
        t0, issued = time.perf_counter(), 0

        async def worker() -> None:
            nonlocal issued
            while True:
                job = jobs[order[issued % len(order)]]
                issued += 1
                body = completion_body("bench", job.prompt, job.max_tokens, ignore_eos=True)
                checked(await stream_completion(client, server.url, body, t0), job.max_tokens)

        tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        await asyncio.sleep(warmup)
        start, tokens0, issued0 = time.perf_counter(), await generation_tokens(client, server), issued
        await asyncio.sleep(seconds)
        elapsed, tokens1 = time.perf_counter() - start, await generation_tokens(client, server)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return (tokens1 - tokens0) / elapsed, issued - issued0


def batch_full_fraction(rows: list[tuple[float, float, float, int]], batch_size: int) -> float:
    """Fraction of the replay (first arrival to last finish) with at least `batch_size` requests between
    their first token and their finish: how loaded the run really was, whatever its label."""
    events = sorted([(first, 1) for _, first, _, _ in rows] + [(finish, -1) for _, _, finish, _ in rows])
    start, end = min(r[0] for r in rows), max(r[2] for r in rows)
    running, full, since = 0, 0.0, None
    for t, step in events:
        running += step
        if running >= batch_size and since is None:
            since = t
        elif running < batch_size and since is not None:
            full, since = full + t - since, None
    return full / (end - start) if end > start else 0.0


def measured_capacity(servers: dict, group: list[str], jobs: list[Job], args, label: str) -> float:
    """Requests/s of this trace at saturation on the group's servers, all busy at once (their mean)."""
    mean_output = sum(job.max_tokens for job in jobs) / len(jobs)
    rates = asyncio.run(
        gather(*(measure_capacity(servers[p], jobs, 2 * args.batch_size, args.capacity_seconds) for p in group))
    )
    capacity = sum(rate for rate, _ in rates) / len(rates) / mean_output
    print(
        f"{label} {'+'.join(group)}: capacity {capacity * mean_output:.0f} output tokens/s at {2 * args.batch_size} "
        f"in flight ({', '.join(f'{r:.0f} over {n} requests' for r, n in rates)}) -> {capacity:.2f} requests/s",
        flush=True,
    )
    return capacity


def replay_groups(policies: list[str], together: bool) -> list[list[str]]:
    """Which servers replay a trace at the same moments: with `together`, each policy beside an fcfs server
    (its own baseline on the same machine, minute for minute); otherwise one policy at a time.

    Pairs, not all three at once: three one-thread servers and the client on two cores did not share them
    evenly (in two runs at rho=0.5 the MLFQ server's long requests decoded 25-40% slower than fcfs's beside
    it, where alone both ran at 4.9 ms per token), and two servers did (within +-10% at rho=0.5).
    """
    if not together or "fcfs" not in policies or len(policies) == 1:
        return [[policy] for policy in policies]
    return [["fcfs", policy] for policy in policies if policy != "fcfs"]


async def gather(*aws):
    return await asyncio.gather(*aws)


# ---------------------------------------------------------------- report


def table(results: dict, loads: list[float]) -> str:
    head = (
        "| rho | effective rho | policy | mean JCT s | P50 JCT s | P99 JCT s | per-token ms | TTFT s | tokens/s | "
        "per-token x | mean JCT x | P99 JCT x |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for rho in loads:
        for policy, s in results[str(rho)].items():
            base = s.get("paired_fcfs") or results[str(rho)].get("fcfs")
            ratios = [
                f"{base[k] / s[k]:.2f}" if base else "-" for k in ("mean_per_token_latency", "mean_jct", "p99_jct")
            ]
            lines.append(
                f"| {rho} | {s.get('effective_rho', rho):.2f} | {policy} | {s['mean_jct']:.2f} | {s['p50_jct']:.2f} | {s['p99_jct']:.2f} | "
                f"{1000 * s['mean_per_token_latency']:.1f} | {s['mean_ttft']:.2f} | {s['throughput_tokens']:.0f} | "
                + " | ".join(ratios)
                + " |"
            )
    return "\n".join(lines)


def targets(results: dict, loads: list[float]) -> list[str]:
    """The issue's targets: at the highest load per-token >= 2.5x and mean JCT >= 1.2x better than fcfs,
    P99 JCT no worse than 2x fcfs; at the lowest load within +-10% of fcfs."""
    high, low = str(max(loads)), str(min(loads))
    m = results[high]["skip-join-mlfq"]
    f = m.get("paired_fcfs") or results[high]["fcfs"]
    checks = [
        (
            f"rho={high}: per-token latency fcfs/mlfq",
            f["mean_per_token_latency"] / m["mean_per_token_latency"],
            ">= 2.5",
        ),
        (f"rho={high}: mean JCT fcfs/mlfq", f["mean_jct"] / m["mean_jct"], ">= 1.2"),
        (f"rho={high}: P99 JCT mlfq/fcfs", m["p99_jct"] / f["p99_jct"], "<= 2.0"),
    ]
    m = results[low]["skip-join-mlfq"]
    f = m.get("paired_fcfs") or results[low]["fcfs"]
    checks += [
        (f"rho={low}: {name} mlfq/fcfs", m[name] / f[name], "0.9..1.1")
        for name in ("mean_jct", "mean_per_token_latency")
    ]
    lines = []
    for name, value, bound in checks:
        if ".." in bound:
            lo, hi = (float(x) for x in bound.split(".."))
            ok = lo <= value <= hi
        else:
            ok = value >= float(bound[3:]) if bound.startswith(">=") else value <= float(bound[3:])
        lines.append(f"{name} = {value:.2f} (target {bound}): {'met' if ok else 'NOT met'}")
    return lines


def plot(results: dict, loads: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for policy in POLICIES:
        ys = [
            1000 * results[str(rho)][policy]["mean_per_token_latency"] for rho in loads if policy in results[str(rho)]
        ]
        ax.plot(loads[: len(ys)], ys, marker="o", label=policy)
    ax.set_xlabel("load (fraction of measured capacity)")
    ax.set_ylabel("mean per-token latency (ms) = JCT / output tokens")
    ax.set_ylim(bottom=0)
    ax.set_title("fastserve scheduling: heavy-tailed outputs, Poisson arrivals")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_group(servers: dict[str, Server], group: list[str], jobs: list[Job], rho: float, args) -> tuple:
    """Replay the trace to the group's servers at the same moments, at rho x the capacity measured just before;
    returns (capacities and effective rho, summary per policy, records per policy)."""
    before = args.capacity or measured_capacity(servers, group, jobs, args, f"rho={rho} before")
    started, cpu = time.perf_counter(), {p: servers[p].cpu_seconds() for p in group}
    runs = asyncio.run(gather(*(replay_records(servers[p].url, jobs, rho * before) for p in group)))
    # Measured again after the replay: the load this replay really ran at is its offered load over
    # the machine's capacity around it (the mean of both), printed as the effective rho.
    after = args.capacity or measured_capacity(servers, group, jobs, args, f"rho={rho} after")
    effective = rho * before / ((before + after) / 2)
    summaries = {}
    for policy, rows in zip(group, runs):
        summaries[policy] = summary = summarize(rows)
        summary["batch_full_fraction"] = batch_full_fraction(rows, args.batch_size)
        summary["server_cpu_s"] = servers[policy].cpu_seconds() - cpu[policy]
        summary["effective_rho"] = effective
        print(
            f"rho={rho} {policy}{'' if len(group) < 2 else ' (with ' + ', '.join(set(group) - {policy}) + ')'}: "
            f"{time.perf_counter() - started:.0f} s, mean JCT {summary['mean_jct']:.2f} s, "
            f"per-token {1000 * summary['mean_per_token_latency']:.1f} ms, "
            f"batch full {100 * summary['batch_full_fraction']:.0f}% of the time, "
            f"server CPU {summary['server_cpu_s']:.0f} s",
            flush=True,
        )
    return {"before_rps": before, "after_rps": after, "effective_rho": effective}, summaries, runs


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--requests",
        type=int,
        default=1000,
        help="requests per trace; shorter traces do not reach steady state at rho=0.9 (heavy tail)",
    )
    parser.add_argument("--loads", type=float, nargs="+", default=[0.5, 0.8, 0.9])
    parser.add_argument("--policies", nargs="+", default=list(POLICIES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server process")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--capacity", type=float, default=None, help="requests/s; skips the capacity measurements")
    parser.add_argument(
        "--capacity-seconds",
        type=float,
        default=30.0,
        help="length of the saturated window measured before each replay",
    )
    parser.add_argument(
        "--together",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="replay each trace to every policy beside an fcfs server at the same moments (default: "
        "each comparison sees the same machine, drift included) or --no-together: policy after policy",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-scheduling")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    model_dir = bench_model_dir(args.out, args.layers, args.width)
    jobs = heavy_tailed_jobs(model_dir, args.seed, args.requests)
    mean_output = sum(job.max_tokens for job in jobs) / len(jobs)
    print(
        f"model {model_dir.name}; {len(jobs)} requests, mean output {mean_output:.1f} tokens, "
        f"{sum(1 for job in jobs if job.max_tokens >= 256)} long ones",
        flush=True,
    )

    # One server per policy, all up from the start. By default (--together) each policy replays the trace beside
    # an fcfs server at the same moments, so each comparison sees the same machine. This VM's cores flip between
    # two speeds (~2x apart) every few seconds and its throughput drifts by +-20% over minutes: policy after
    # policy, one seed's fcfs turn at rho=0.5 ran 36% slower than the MLFQ turn after it. Side by side, two
    # servers still share the cores unevenly over short windows (two identical fcfs servers measured 601 and
    # 705 tokens/s in the same 25 s), which a replay of a minute or more mostly averages out.
    results: dict = {str(rho): {} for rho in args.loads}
    records: dict = {str(rho): {} for rho in args.loads}
    capacities: dict = {str(rho): {} for rho in args.loads}
    with contextlib.ExitStack() as stack:
        servers = start_servers(stack, model_dir, args)
        for rho in args.loads:
            for group in replay_groups(list(servers), args.together):
                capacities[str(rho)]["+".join(group)], summaries, runs = run_group(servers, group, jobs, rho, args)
                for policy, rows in zip(group, runs):
                    if policy == "fcfs" and "fcfs" in results[str(rho)]:  # a later pair's own baseline
                        continue
                    records[str(rho)][policy] = rows
                    results[str(rho)][policy] = summaries[policy]
                    if policy != "fcfs" and "fcfs" in summaries:
                        summaries[policy]["paired_fcfs"] = summaries["fcfs"]
        counters = {policy: server.metrics() for policy, server in servers.items()}

    report = {
        "model": model_dir.name,
        "requests": args.requests,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "together": args.together,
        "capacity_rps": capacities,
        "mean_output_tokens": mean_output,
        "results": results,
        "server_counters": counters,
        "records": {"columns": ["arrival_s", "first_token_s", "finish_s", "output_tokens"], **records},
    }
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    print("\n" + table(results, args.loads))
    if "fcfs" in args.policies and "skip-join-mlfq" in args.policies:
        print("\n" + "\n".join(targets(results, args.loads)))
    plot(results, args.loads, args.out / "per_token_latency.png")
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'per_token_latency.png'}")


if __name__ == "__main__":
    main()
