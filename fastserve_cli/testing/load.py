"""The load test: N concurrent streaming clients for D seconds against a real `fastserve serve` process.

Every stream must end with `data: [DONE]` and no request may fail; the server's resident memory after the
load (and a short idle) must stay within a tolerance of its memory halfway through the load. Why halfway and
not right after the warm-up: the server's bounded caches (oneDNN kernels per padded row count, the decode
pack's buffers) fill during the first ~20 s of this load (RSS 506 -> 545 MiB, then 526-550 MiB until 150 s),
so growth from a 3-s warm-up measures that fill, while growth over the second half is what a leak would show.
Used by scripts/load_serve.py (the 64 clients x 60 s acceptance run) and tests/test_serve_load.py (10 s).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastserve_cli.testing.replay import completion_body, http_client, stream_completion
from fastserve_cli.testing.server import rss_mib, running_server

WORDS = "def class return import for while if else with as yield lambda self print value result".split()


@dataclass
class LoadReport:
    clients: int
    duration_s: float
    requests: int = 0
    tokens: int = 0
    errors: list[str] = field(default_factory=list)
    missing_done: int = 0
    rss_warm_mib: float = 0.0
    rss_mid_mib: float = 0.0  # halfway through the load
    rss_after_mib: float = 0.0

    @property
    def rss_growth(self) -> float:
        """Growth over the second half of the load and the idle after it (a leak grows here)."""
        return (self.rss_after_mib - self.rss_mid_mib) / self.rss_mid_mib

    @property
    def rss_growth_since_warmup(self) -> float:
        return (self.rss_after_mib - self.rss_warm_mib) / self.rss_warm_mib

    def ok(self, tolerance: float) -> bool:
        return not self.errors and self.missing_done == 0 and self.requests > 0 and self.rss_growth <= tolerance


async def client_loop(client, url: str, model: str, until: float, seed: int, report: LoadReport) -> None:
    """One closed-loop client: random short prompts, lengths and temperatures, one request after another."""
    rng = random.Random(seed)
    t0 = time.perf_counter()
    while time.monotonic() < until:
        body = completion_body(
            model,
            " ".join(rng.choices(WORDS, k=rng.randint(4, 40))),
            rng.randint(8, 64),
            temperature=rng.choice([0, 0.8]),
        )
        stream = await stream_completion(client, url, body, t0)
        if stream.error is not None:
            report.errors.append(stream.error)
        if stream.end is not None:  # the stream was read to its end: count it, and whether it ended properly
            report.requests += 1
            report.tokens += stream.tokens
            report.missing_done += not stream.done


async def run_load(url: str, model: str, pid: int, clients: int, duration: float) -> LoadReport:
    """A 3-s warm-up with every client, then `duration` seconds of load; RSS sampled after warm-up, halfway, after."""
    report = LoadReport(clients, duration)
    async with http_client(timeout=300, max_connections=clients + 8) as client:
        warm = LoadReport(clients, 0)
        await asyncio.gather(
            *[client_loop(client, url, model, time.monotonic() + 3, 10_000 + i, warm) for i in range(clients)]
        )
        report.errors += warm.errors
        await asyncio.sleep(1.0)
        report.rss_warm_mib = rss_mib(pid)
        until = time.monotonic() + duration

        async def sample_midway() -> None:
            await asyncio.sleep(duration / 2)
            report.rss_mid_mib = rss_mib(pid)

        loops = [client_loop(client, url, model, until, i, report) for i in range(clients)]
        await asyncio.gather(sample_midway(), *loops)
    await asyncio.sleep(2.0)
    report.rss_after_mib = rss_mib(pid)
    return report


def load_test(model_dir: Path, clients: int, duration: float, log_path: Path | None = None) -> LoadReport:
    """Every client fits in one batch (--max-batch-size = clients): the tiny model is cheap per row."""
    args = ["--model-name", "load", "--max-batch-size", str(clients), "--threads", "1"]
    with running_server(model_dir, *args, log_path=log_path) as (url, proc):
        return asyncio.run(run_load(url, "load", proc.pid, clients, duration))
