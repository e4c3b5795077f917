"""Load test: N concurrent streaming clients for D seconds against `fastserve serve`.

Every stream must end with `data: [DONE]` and no request may fail; the server's resident memory after
the load (and a short idle) must stay within a tolerance of its memory halfway through the load. Exit
code 1 on any violation. Why halfway and not right after the warm-up: the server's bounded caches (oneDNN
kernels per padded row count, the decode pack's buffers) fill during the first ~20 s of this load (RSS
506 -> 545 MiB, then 526-550 MiB until 150 s), so growth from a 3-s warm-up measures that fill, while
growth over the second half of the load is what a leak would show. Both are printed.

The issue's acceptance run is 64 clients for 60 s on the tiny model:

    .venv/bin/python scripts/load_serve.py MODEL_DIR --clients 64 --duration 60

(tests/test_serve_load.py runs the same check for 10 s, marked slow.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastserve_cli.serve.launch import running_server  # noqa: E402

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


async def client_loop(http, url: str, model: str, until: float, seed: int, report: LoadReport) -> None:
    rng = random.Random(seed)
    while time.monotonic() < until:
        body = {"model": model, "prompt": " ".join(rng.choices(WORDS, k=rng.randint(4, 40))),
                "max_tokens": rng.randint(8, 64), "stream": True, "temperature": rng.choice([0, 0.8]),
                "stream_options": {"include_usage": True}}
        try:
            async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
                if response.status_code != 200:
                    report.errors.append(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
                    continue
                last = None
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        last = line
                        if line != "data: [DONE]":
                            chunk = json.loads(line[6:])
                            if "error" in chunk:
                                report.errors.append(str(chunk["error"])[:200])
                            elif chunk.get("usage"):
                                report.tokens += chunk["usage"]["completion_tokens"]
                report.requests += 1
                report.missing_done += last != "data: [DONE]"
        except Exception as err:  # any transport failure is a load-test failure
            report.errors.append(repr(err)[:200])


def rss_mib(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


async def run_load(url: str, model: str, pid: int, clients: int, duration: float) -> LoadReport:
    import httpx

    report = LoadReport(clients, duration)
    limits = httpx.Limits(max_connections=clients + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300), limits=limits) as http:
        warm = LoadReport(clients, 0)
        await asyncio.gather(*[client_loop(http, url, model, time.monotonic() + 3, 10_000 + i, warm)
                               for i in range(clients)])
        report.errors += warm.errors
        await asyncio.sleep(1.0)
        report.rss_warm_mib = rss_mib(pid)
        until = time.monotonic() + duration

        async def sample_midway() -> None:
            await asyncio.sleep(duration / 2)
            report.rss_mid_mib = rss_mib(pid)

        await asyncio.gather(sample_midway(), *[client_loop(http, url, model, until, i, report) for i in range(clients)])
    await asyncio.sleep(2.0)
    report.rss_after_mib = rss_mib(pid)
    return report


def load_test(model_dir: Path, clients: int, duration: float, log_path: Path | None = None) -> LoadReport:
    """Every client fits in one batch (--max-batch-size = clients): the tiny model is cheap per row."""
    args = ["--model-name", "load", "--max-batch-size", str(clients), "--threads", "1"]
    with running_server(model_dir, *args, log_path=log_path) as (url, proc):
        return asyncio.run(run_load(url, "load", proc.pid, clients, duration))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--rss-tolerance", type=float, default=0.10, help="Allowed RSS growth over the second half of the load (fraction).")
    args = parser.parse_args()
    report = load_test(args.model_dir, args.clients, args.duration)
    print(f"{report.clients} clients x {report.duration_s:.0f} s: {report.requests} streams, {report.tokens} tokens, "
          f"{len(report.errors)} errors, {report.missing_done} without [DONE]; server RSS {report.rss_warm_mib:.0f} MiB "
          f"after warm-up, {report.rss_mid_mib:.0f} MiB halfway, {report.rss_after_mib:.0f} MiB after load "
          f"({report.rss_growth:+.1%} over the second half; {report.rss_growth_since_warmup:+.1%} since warm-up)")
    for err in report.errors[:5]:
        print("  error:", err)
    sys.exit(0 if report.ok(args.rss_tolerance) else 1)


if __name__ == "__main__":
    main()
