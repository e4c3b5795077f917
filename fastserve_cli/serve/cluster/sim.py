"""Routing beyond this machine, by simulation: N replicas, each running the real scheduler over a linear
per-iteration cost (simulate.py's model, fitted to this model's measured profile), behind the real routing
policies of policy.py.

Why: the question "does load-aware routing pay at 8 or 64 replicas, at rho 0.9, with heavy-tailed outputs" is
about queueing, not about this 2-core VM; the same policy code and the same skip-join MLFQ decide here as in
the server. The router sees what the served router sees: each replica's load as of the last stats period
(`stats_period`, like `record_routing_stats`) plus the requests it routed there itself and has not seen finish.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from fastserve_cli.serve.cluster.policy import ReplicaLoad, make_policy
from fastserve_cli.serve.simulate import LinearCost, SimRequest


@dataclass
class SimReplica:
    index: int
    scheduler: Any
    active: list[SimRequest] = field(default_factory=list)
    batch: list[SimRequest] | None = None  # the iteration in flight
    batch_start: float = 0.0
    snapshot: ReplicaLoad | None = None

    @property
    def rid(self) -> str:
        return f"r{self.index:03d}"

    def load(self, max_queue: int) -> ReplicaLoad:
        waiting = sum(1 for r in self.active if not r.is_prefilled)
        top = sum(1 for r in self.active if getattr(r.sched_state, "level", 99) <= 1)
        return ReplicaLoad(self.rid, waiting, len(self.active) - waiting, 0.0, top, max_queue)


def with_prefixes(
    trace: Sequence[SimRequest], seed: int, num_prefixes: int = 16, share: float = 0.7
) -> dict[str, str | None]:
    """A prefix key per request: `share` of them carry one of `num_prefixes` system prompts (Zipf-like)."""
    rng = random.Random(seed)
    weights = [1.0 / (k + 1) for k in range(num_prefixes)]
    return {
        r.request_id: (f"sys{rng.choices(range(num_prefixes), weights)[0]}" if rng.random() < share else None)
        for r in trace
    }


def simulate_cluster(
    trace: Sequence[SimRequest],
    router: str,
    replicas: int,
    make_scheduler: Callable[[], Any],
    cost: LinearCost,
    max_batch_size: int,
    prefixes: dict[str, str | None] | None = None,
    stats_period: float = 0.5,
    token_budget: int = 2048,
    max_queue: int = 1 << 30,
    seed: int = 0,
) -> dict[str, int]:
    """Run `trace` (fresh SimRequests) to completion; fills in their times. Returns requests per replica."""
    policy = make_policy(router, seed)
    reps = [SimReplica(i, make_scheduler()) for i in range(replicas)]
    prefixes = prefixes or {}
    # Events: (time, order, kind, payload); kinds: 0 iteration end, 1 stats tick, 2 arrival.
    events: list[tuple[float, int, int, Any]] = []
    order = 0
    for req in sorted(trace, key=lambda r: r.arrival_time):
        events.append((req.arrival_time, order, 2, req))
        order += 1
    heapq.heapify(events)
    heapq.heappush(events, (0.0, -1, 1, None))
    remaining, routed = len(trace), {r.rid: 0 for r in reps}

    def start(rep: SimReplica, now: float) -> None:
        nonlocal order
        batch = rep.scheduler.schedule(now, max_batch_size, token_budget)
        if not batch:
            raise RuntimeError(f"replica {rep.rid} scheduled nothing with {len(rep.active)} requests live")
        rep.batch, rep.batch_start = batch, now
        order += 1
        heapq.heappush(events, (now + cost(batch), order, 0, rep))

    def finish_iteration(rep: SimReplica, now: float, elapsed: float) -> None:
        nonlocal remaining
        batch, rep.batch = rep.batch, None
        for req in batch:
            req.runs.append(now - elapsed)
            req.num_generated += 1
            if not req.is_prefilled:
                req.is_prefilled, req.kv_location, req.first_token_time = True, "device", now
        rep.scheduler.after_iteration(batch, elapsed, now)
        for req in [r for r in batch if r.finished]:
            req.finish_time, req.kv_location = now, "none"
            rep.scheduler.remove(req)
            rep.active.remove(req)
            remaining -= 1
        if rep.active:
            start(rep, now)

    while events and remaining:
        now, _, kind, item = heapq.heappop(events)
        if kind == 0:
            finish_iteration(item, now, now - item.batch_start)
        elif kind == 1:
            for rep in reps:
                rep.snapshot = rep.load(max_queue)
            heapq.heappush(events, (now + stats_period, -1, 1, None))
        else:
            loads = []
            for rep in reps:
                snap = rep.snapshot or ReplicaLoad(rep.rid, max_queue=max_queue)
                loads.append(
                    ReplicaLoad(
                        rep.rid, snap.waiting, snap.running, 0.0, snap.top_queue, max_queue, inflight=len(rep.active)
                    )
                )
            choice = policy.choose(loads, prefixes.get(item.request_id))
            rep = reps[int(choice.replica_id[1:])]
            routed[rep.rid] += 1
            rep.scheduler.add(item, now)
            rep.active.append(item)
            if rep.batch is None:
                start(rep, now)
    return routed


def fit_cost(
    decode_1: float, decode_b: float, batch_size: int, prefill_short: tuple[int, float], prefill_long: tuple[int, float]
) -> LinearCost:
    """simulate.py's linear iteration cost from measured points: decode at batch 1 and at full batch, and two
    prefill lengths (the per-token slope)."""
    td = max(0.0, (decode_b - decode_1) / max(1, batch_size - 1))
    t0 = max(0.0, decode_1 - td)
    (n0, s0), (n1, s1) = prefill_short, prefill_long
    tp = max(0.0, (s1 - s0) / max(1, n1 - n0))
    return LinearCost(t0=t0, td=td, tp=tp)


def full_batch_floor(trace: Sequence[SimRequest], cost: LinearCost, batch_size: int, q: float = 0.99) -> float:
    """The `q` quantile of JCT if no request ever waited and every iteration it ran in was a full batch: at
    rho near 1 replicas run full batches, so this is about the best P99 any router can reach (a request's
    own length, not queueing, sets it)."""
    full_step = cost.t0 + cost.td * batch_size
    jct = sorted(cost.prefill_s(r.prompt_len) + (r.max_new_tokens - 1) * full_step for r in trace)
    return jct[min(len(jct) - 1, int(q * len(jct)))]


def run_grid(
    cost: LinearCost,
    batch_size: int,
    sizes: Sequence[int],
    routers: Sequence[str],
    loads: Sequence[float],
    seed: int = 0,
    per_replica: int = 300,
) -> list[dict[str, Any]]:
    """Every (replicas, rho, router) on the same seeded trace per (replicas, rho); one summary row each."""
    from fastserve_cli.serve.scheduler import make_scheduler
    from fastserve_cli.serve.simulate import make_trace, mean_service_time, sim_records, summarize

    service = mean_service_time(make_trace(seed, 2000, 1.0), cost, batch_size)

    def mlfq():
        return make_scheduler(
            "skip-join-mlfq",
            base_quantum_s=cost.t0 + cost.td * batch_size,
            estimate_prefill_s=cost.prefill_s,
            num_levels=8,
            starvation_s=3.0,
            max_batch_size=batch_size,
            token_budget=2048,
        )

    rows = []
    for n in sizes:
        for rho in loads:
            for router in routers:
                trace = make_trace(seed + n, n * per_replica, rho * n / service)
                simulate_cluster(trace, router, n, mlfq, cost, batch_size, with_prefixes(trace, seed), seed=seed)
                row = {"replicas": n, "rho": rho, "router": router, **summarize(sim_records(trace))}
                rows.append({**row, "p99_floor": full_batch_floor(trace, cost, batch_size)})
    return rows
