"""A server as a real child process (ours or a baseline), ready-polling, and reading what it reports.

Tests and benchmarks talk to the server the way users do: over HTTP to a separate process. This is the one
place that starts it, waits for /health, stops it (SIGTERM, the path a deployment takes) and reads /metrics.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence


def free_port() -> int:
    """A port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(
    url: str, proc: subprocess.Popen | None = None, timeout: float = 120.0, log_path: Path | None = None
) -> None:
    """Poll GET /health until 200; fail early if the process died (with its log's tail, when there is one)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready{log_tail(log_path)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout} s{log_tail(log_path)}")


def log_tail(log_path: Path | None, chars: int = 2000) -> str:
    if log_path is None or not Path(log_path).is_file():
        return ""
    return f"; log {log_path} ends with:\n{Path(log_path).read_text(errors='replace')[-chars:]}"


@contextlib.contextmanager
def running_process(
    cmd: Sequence[str],
    url: str,
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
    ready: bool = True,
    ready_timeout: float = 120.0,
    stop_timeout: float = 60.0,
) -> Iterator[subprocess.Popen]:
    """Run `cmd` (a server answering `url`/health) as a child; on exit SIGTERM, then kill after `stop_timeout`."""
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        if ready:
            wait_ready(url, proc, ready_timeout, log_path)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if log_path:
            log.close()


@contextlib.contextmanager
def running_server(
    target: str | Path,
    *args: str,
    port: int | None = None,
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
    ready: bool = True,
    ready_timeout: float = 120.0,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`fastserve serve TARGET --port P ARGS...` in a child process; yields (base url, process)."""
    port = port or free_port()
    cmd = [
        sys.executable,
        "-m",
        "fastserve_cli",
        "serve",
        str(target),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *args,
    ]
    url = f"http://127.0.0.1:{port}"
    with running_process(cmd, url, env, log_path, ready, ready_timeout) as proc:
        yield url, proc


def prometheus_samples(text: str) -> dict[str, float]:
    """Sample name -> value from a Prometheus text page (labels dropped: one model per server)."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            values[line.split("{")[0].split(" ")[0]] = float(line.rsplit(" ", 1)[1])
    return values


def fastserve_counters(text: str) -> dict[str, float]:
    """The `fastserve:*_total` counters of a /metrics page, by name."""
    return {
        name: value
        for name, value in prometheus_samples(text).items()
        if name.startswith("fastserve:") and name.endswith("_total")
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def rss_mib(pid: int) -> float:
    """Resident memory of a process, MiB."""
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20
