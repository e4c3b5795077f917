"""An Engine built straight from a model directory and stepped on the caller's thread, without HTTP.

Why: engine, KV-manager and scheduler tests need exact control (budgets in tokens, a scheduler swapped in,
step by step), which the server's own factory (`fastserve_cli.serve.build_engine`, sized in bytes from a
recipe) does not give. One factory here instead of one per test file.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from fastserve_cli.serve.request import Request, SamplingParams


def make_engine(
    model_dir: Path,
    backend: str = "torch",
    scheduler: Any = "fcfs",
    *,
    device_tokens: int = 100_000,
    host_tokens: int = 100_000,
    max_batch_size: int = 4,
    token_budget: int = 512,
    device: str | None = None,
    metrics_name: str = "t",
    prefill_chunk_tokens: int | None = None,
    prefix_cache_tokens: int | None = None,
    block_size: int = 16,
):
    """An engine whose KV budgets hold `device_tokens` / `host_tokens` tokens of this model's cache.

    `scheduler` is a registered name (built with defaults) or a scheduler object; `device` pins the torch
    backend (None: the backend's own choice); `prefix_cache_tokens` turns on a prefix cache of that many
    tokens at most, in `block_size`-token blocks (off by default here, unlike `fastserve serve`).
    """
    from transformers import AutoTokenizer

    from fastserve_cli.serve.backends import TorchBackend, load_backend
    from fastserve_cli.serve.engine import Engine
    from fastserve_cli.serve.kv_cache import KVCacheManager
    from fastserve_cli.serve.metrics import Metrics
    from fastserve_cli.serve.scheduler import make_scheduler

    be = TorchBackend(model_dir, device=device) if backend == "torch" else load_backend(backend, model_dir)
    per_token = be.kv_bytes_per_token
    prefix = None
    if prefix_cache_tokens is not None:
        from fastserve_cli.serve.prefix_cache import make_prefix_cache

        fraction = min(1.0, prefix_cache_tokens / device_tokens)
        prefix = make_prefix_cache(be, device_tokens * per_token, block_size, fraction)
    kv = KVCacheManager(be, device_tokens * per_token, host_tokens * per_token, prefix)
    policy = make_scheduler(scheduler) if isinstance(scheduler, str) else scheduler
    return Engine(
        be,
        policy,
        kv,
        AutoTokenizer.from_pretrained(model_dir),
        Metrics(metrics_name),
        max_batch_size=max_batch_size,
        token_budget=token_budget,
        prefill_chunk_tokens=prefill_chunk_tokens,
    )


def greedy_request(prompt_ids: list[int], max_new_tokens: int) -> Request:
    """Greedy and of a fixed length (ignore_eos), so its output can be compared token for token."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0, ignore_eos=True)
    return Request(list(prompt_ids), params, time.perf_counter())


def run_until_finished(engine, reqs: Sequence[Request], max_steps: int = 10_000) -> None:
    """Submit `reqs` and step the engine on this thread until all finish (a step bound, not a clock, stops a hang)."""
    engine.submit(list(reqs))
    for _ in range(max_steps):
        if all(r.finished for r in reqs):
            return
        engine.step()
    raise AssertionError(f"engine did not finish {sum(not r.finished for r in reqs)} requests in {max_steps} steps")


class RoundRobin:
    """Test scheduler: one request per iteration, rotating, so every iteration touches another request's
    cache (offloads, reloads and pack swaps on every step). Subclasses change `schedule` only."""

    def __init__(self) -> None:
        self.queue: list[Request] = []

    def add(self, req, now):
        self.queue.append(req)

    def remove(self, req):
        self.queue.remove(req)

    def schedule(self, now, max_batch_size, token_budget):
        if not self.queue:
            return []
        self.queue.append(self.queue.pop(0))
        return [self.queue[-1]]

    def after_iteration(self, batch, elapsed_s, now):
        pass

    def priority_order(self):
        return list(self.queue)
