"""A discrete-event simulated executor: run any scheduler over a trace without a model.

Why: scheduling behaviour (who runs when, preemption points, demotions, starvation promotion) must be
testable exactly, in abstract time units, independent of how fast this machine is today. The simulated
executor calls the scheduler the way the engine does - `add` on arrival, `schedule` at every iteration
boundary, `after_iteration` with the iteration's duration, `remove` when a request finishes - and
charges each iteration a linear cost: t0 + td * decoding requests + tp * prefill tokens.

It also holds what the benchmark shares with it: seeded traces (Poisson arrivals, heavy-tailed output
lengths) and the summary metrics (JCT percentiles, per-token latency = JCT / output tokens, TTFT).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from fastserve_cli.core.stats import percentile


@dataclass
class SimRequest:
    """A request as the scheduler sees it, plus the times the simulation records."""

    request_id: str
    arrival_time: float
    prompt_len: int
    max_new_tokens: int  # the output length: generation never stops early (ignore_eos)
    num_generated: int = 0
    is_prefilled: bool = False
    kv_location: str = "none"
    sched_state: Any = None
    first_token_time: float | None = None
    finish_time: float | None = None
    runs: list[float] = field(default_factory=list)  # start time of every iteration it ran in

    @property
    def finished(self) -> bool:
        return self.num_generated >= self.max_new_tokens

    @property
    def num_tokens_next(self) -> int:
        return 1 if self.is_prefilled else self.prompt_len

    @property
    def is_started(self) -> bool:
        return self.is_prefilled  # the simulation prefills whole, in one iteration

    @property
    def prefill_remaining(self) -> int:
        return 0 if self.is_prefilled else self.prompt_len


@dataclass(frozen=True)
class LinearCost:
    """Iteration time = t0 + td * decoding requests + tp * prefill tokens (the notes' calibration form)."""

    t0: float = 0.0
    td: float = 1.0
    tp: float = 1.0

    def __call__(self, batch: Sequence[SimRequest]) -> float:
        decodes = sum(1 for r in batch if r.is_prefilled)
        prefill_tokens = sum(r.prompt_len for r in batch if not r.is_prefilled)
        return self.t0 + self.td * decodes + self.tp * prefill_tokens

    def prefill_s(self, prompt_len: int) -> float:
        """What a prefill profile of this cost model reports (batch of one)."""
        return self.t0 + self.tp * prompt_len


@dataclass
class Iteration:
    start: float
    end: float
    request_ids: list[str]


def simulate(
    scheduler: Any,
    requests: Iterable[SimRequest],
    max_batch_size: int,
    token_budget: int = 1 << 30,
    cost: LinearCost = LinearCost(),
    max_iterations: int = 10_000_000,
) -> list[Iteration]:
    """Run `requests` to completion under `scheduler`; fills in their times and returns the timeline.

    Arrivals are admitted at iteration boundaries (an iteration in flight is never interrupted), the
    prefill iteration produces the first token and every later iteration one more.
    """
    pending = sorted(requests, key=lambda r: (r.arrival_time, r.request_id))
    active: list[SimRequest] = []
    timeline: list[Iteration] = []
    now, i = 0.0, 0
    for _ in range(max_iterations):
        while i < len(pending) and pending[i].arrival_time <= now:
            scheduler.add(pending[i], now)
            active.append(pending[i])
            i += 1
        if not active:
            if i == len(pending):
                return timeline
            now = pending[i].arrival_time
            continue
        batch = scheduler.schedule(now, max_batch_size, token_budget)
        if not batch:
            raise RuntimeError(f"{type(scheduler).__name__} scheduled nothing with {len(active)} requests waiting")
        elapsed = cost(batch)
        for req in batch:
            req.runs.append(now)
            req.num_generated += 1
            if not req.is_prefilled:
                req.is_prefilled, req.kv_location = True, "device"
                req.first_token_time = now + elapsed
        timeline.append(Iteration(now, now + elapsed, [r.request_id for r in batch]))
        now += elapsed
        scheduler.after_iteration(batch, elapsed, now)
        for req in [r for r in batch if r.finished]:
            req.finish_time = now
            req.kv_location = "none"
            scheduler.remove(req)
            active.remove(req)
    raise RuntimeError(f"simulation did not finish in {max_iterations} iterations")


# ---------------------------------------------------------------- traces and metrics


def bimodal_output_len(
    rng: random.Random,
    short: tuple[int, int] = (8, 32),
    long: tuple[int, int] = (256, 512),
    long_fraction: float = 0.15,
) -> int:
    """Heavy-tailed output lengths as in the issue: 85% in [8, 32], 15% in [256, 512] tokens."""
    low, high = long if rng.random() < long_fraction else short
    return rng.randint(low, high)


def lognormal_prompt_len(
    rng: random.Random, median: int = 120, sigma: float = 1.0, low: int = 4, cap: int = 512
) -> int:
    return max(low, min(cap, int(round(median * math.exp(rng.gauss(0.0, sigma))))))


def make_trace(
    seed: int, num_requests: int, rate: float, prompt_len=lognormal_prompt_len, output_len=bimodal_output_len
) -> list[SimRequest]:
    """Poisson arrivals at `rate` requests per time unit; the same seed gives the same trace."""
    rng = random.Random(seed)
    t, trace = 0.0, []
    for n in range(num_requests):
        t += rng.expovariate(rate)
        trace.append(SimRequest(f"r{n}", t, prompt_len(rng), output_len(rng)))
    return trace


def mean_service_time(trace: Sequence[SimRequest], cost: LinearCost, batch_size: int) -> float:
    """Time one request occupies the machine at full batch: prefill plus decode steps sharing an iteration."""
    per_step = cost.t0 / batch_size + cost.td
    return sum(cost.tp * r.prompt_len + per_step * (r.max_new_tokens - 1) for r in trace) / len(trace)


def summarize(records: Iterable[tuple[float, float, float, int]]) -> dict[str, float]:
    """Metrics from (arrival, first_token, finish, output_tokens) per request.

    per_token_latency is the paper's metric: the mean over requests of JCT / output tokens.
    """
    rows = list(records)
    jct = [finish - arrival for arrival, _, finish, _ in rows]
    ttft = [first - arrival for arrival, first, _, _ in rows]
    per_token = [(finish - arrival) / max(1, n) for arrival, _, finish, n in rows]
    span = max(f for _, _, f, _ in rows) - min(a for a, _, _, _ in rows)
    return {
        "requests": len(rows),
        "mean_jct": sum(jct) / len(jct),
        "p50_jct": percentile(jct, 50),
        "p99_jct": percentile(jct, 99),
        "mean_per_token_latency": sum(per_token) / len(per_token),
        "mean_ttft": sum(ttft) / len(ttft),
        "p99_ttft": percentile(ttft, 99),
        "throughput_tokens": sum(n for *_, n in rows) / span if span > 0 else float("nan"),
    }


def sim_records(trace: Iterable[SimRequest]) -> list[tuple[float, float, float, int]]:
    return [(r.arrival_time, r.first_token_time, r.finish_time, r.max_new_tokens) for r in trace]
