"""FastServe's skip-join multi-level feedback queue (MLFQ) scheduler, plus an oracle SRPT bound.

Why MLFQ: output lengths are unknown when a request arrives, so shortest-remaining-first cannot be run
directly. MLFQ approximates it by *attained service*: every request starts high, and each time it uses
up its level's quantum it sinks one level, so short jobs finish before long ones get in their way.

Why skip-join: the prompt length *is* known, and it fixes the first iteration's (prefill's) cost. A
request whose prefill alone would exhaust the top quanta would only be demoted right after it, having
blocked the short jobs above it; instead it joins the first level whose quantum covers its estimated
prefill (`min{p : q_p >= t_prefill}`), using a profile of this model on this machine (profile.py).
With chunked prefill (`serve.prefill_chunk_tokens`) the first iteration is the prompt's first chunk, so the
estimate is that chunk's (`num_tokens_next`): the rest of the prefill runs chunk by chunk in later
iterations, preemptible between them, and each chunk's iteration time is charged as service like a decode
step's, so a long prompt still sinks through the levels as its prefill proceeds.

The rest follows the paper and its reference code (LLMServe/FastServe `fastserve/scheduler.py`):
- quanta double per level (`base_quantum * ratio**level`), levels are created on demand up to
  `num_levels` (the paper's Q1..Qn; FastServe's code has no last level);
- service is the wall-clock time of the iterations a request ran in; using up the level's quantum demotes
  it one level (the counter resets), otherwise it keeps its place at the front of its queue;
- a request that has not run for `starvation_s` is promoted to the front of the top queue;
- preemption happens only between iterations (a prefill, or a prefill chunk, is one iteration, so never
  inside it; a chunked prefill may be preempted between its chunks and keeps its partial KV), and each
  iteration's batch is taken in strict priority order until the batch size or the token budget is hit;
- at most `max_started` requests may be started-but-unfinished (each holds a KV cache), new ones wait.

Why a last level: without one, long requests keep sinking and time-share the machine in proportion to
their attained service (least-attained-service first). Among requests that are all long, that is
processor sharing: they all finish late, and mean JCT is dominated by them. In the last queue a request is
never demoted again, keeps its place and is not promoted for starvation, so long requests run first come,
first served (by arrival) among themselves, as in the last queue of a textbook MLFQ. With the default 8
levels the last one starts after 127 base quanta (about 127 full-batch decode steps); on the scheduling
benchmark's trace shape, simulated, that raised the mean-JCT gain over fcfs at rho=0.9 from ~1.15x to
~1.3x and lowered P99 JCT, at the same per-token gain (see README, Scheduling).

`priority_order()` ranks requests by ENST (estimated next scheduled time, the paper's key for proactive
KV swapping): the KV manager offloads caches from the tail and reloads from the head.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from fastserve_cli.core.errors import UserError
from fastserve_cli.serve.profile import PrefillProfile
from fastserve_cli.serve.scheduler import Scheduler, register_scheduler, take_in_order

log = logging.getLogger("fastserve.serve.mlfq")

PrefillEstimator = Callable[[int], float]


class SchedRequest(Protocol):
    """What a scheduler reads from a request (the engine's request object satisfies it)."""

    request_id: str
    arrival_time: float
    prompt_len: int
    num_generated: int
    max_new_tokens: int
    num_tokens_next: int
    prefill_remaining: int
    is_prefilled: bool
    is_started: bool
    kv_location: str
    sched_state: Any


@dataclass
class MLFQState:
    """Per-request scheduler bookkeeping, stored on `req.sched_state`."""

    level: int
    service_s: float = 0.0  # service attained at the current level (resets on level change)
    last_run: float = 0.0  # last time the request ran (arrival time until it first runs)
    last_promoted: float = -math.inf
    preemptions: int = 0
    queued: bool = True  # False once the request has left the scheduler
    history: list[tuple[float, int, str]] = field(default_factory=list)  # (time, level, why)


@dataclass
class SchedulerStats:
    """Monotonic counters, exported as Prometheus counters by the engine."""

    preemptions: int = 0
    demotions: int = 0
    promotions: int = 0


def within_start_cap(ordered: list[SchedRequest], cap: int) -> list[SchedRequest]:
    """Drop the new (not yet started) requests beyond what keeps started-but-unfinished ones within `cap`.

    Every started request holds a KV cache, and a preemptive scheduler would otherwise keep starting new
    ones (the paper saw 7x FCFS's KV footprint); the excess new ones wait, in priority order, while the
    started ones behind them may still run.
    """
    room = cap - sum(1 for req in ordered if req.is_started)
    kept = []
    for req in ordered:
        if not req.is_started:
            if room <= 0:
                continue
            room -= 1
        kept.append(req)
    return kept


@register_scheduler("skip-join-mlfq")
class SkipJoinMLFQ(Scheduler):
    """Skip-join MLFQ (FastServe). With `skip_join=False` it is the naive MLFQ (everyone joins level 0).

    `num_levels=None` lets levels grow without end (FastServe's reference code).

    Built by the engine with `make_scheduler("skip-join-mlfq", **options)`: the base quantum and the
    prefill estimate come from `base_quantum_s` / `estimate_prefill_s` when given, else from the profile
    at `profile_path` (profile.py measures it at start-up). Tests pass them directly, in abstract units.
    """

    def __init__(
        self,
        base_quantum_s: float | None = None,
        estimate_prefill_s: PrefillEstimator | None = None,
        *,
        profile_path: str | Path | None = None,
        ratio: float = 2.0,
        starvation_s: float = 3.0,
        max_started: int | None = None,
        skip_join: bool = True,
        num_levels: int | None = None,
        **options: Any,
    ):
        super().__init__(**options)
        if profile_path is not None and Path(profile_path).is_file():
            profile = PrefillProfile.load(Path(profile_path))
            estimate_prefill_s = estimate_prefill_s or profile.prefill_s
            base_quantum_s = base_quantum_s or profile.base_quantum_s
        if base_quantum_s is None:
            raise UserError(
                "--scheduler skip-join-mlfq: no base quantum and no prefill profile; "
                "set serve.base_quantum_s (e.g. --set serve.base_quantum_s=0.02) or let the server "
                "profile the model at start-up"
            )
        if base_quantum_s <= 0 or ratio <= 1:
            raise UserError("skip-join-mlfq: the base quantum must be > 0 s and the level ratio > 1")
        if num_levels is not None and num_levels < 2:
            raise UserError("skip-join-mlfq: serve.mlfq_levels must be at least 2 (or null for no last level)")
        self.base_quantum_s = base_quantum_s
        self.estimate_prefill_s = estimate_prefill_s or (lambda prompt_len: 0.0)
        self.ratio = ratio
        self.starvation_s = starvation_s
        self.max_started = max_started
        self.skip_join = skip_join
        self.num_levels = num_levels
        self.queues: list[deque[SchedRequest]] = []
        self.stats = SchedulerStats()
        self._last_batch: list[SchedRequest] = []
        self._last_batch_size = 1
        self._now = 0.0
        if not skip_join:
            self.name = "mlfq"

    # -- levels -----------------------------------------------------------------
    def quantum(self, level: int) -> float:
        return self.base_quantum_s * self.ratio**level

    def join_level(self, first_tokens: int) -> int:
        """Skip-join: the highest-priority level whose quantum covers the estimated time of the request's first
        iteration, a prefill of `first_tokens` (the whole prompt, or its first chunk when chunked)."""
        if not self.skip_join:
            return 0
        prefill_s = self.estimate_prefill_s(first_tokens)
        if prefill_s <= self.base_quantum_s:
            return 0
        # Smallest p with base * ratio**p >= prefill_s; the epsilon keeps exact powers at their level.
        return self._clamp(max(0, math.ceil(math.log(prefill_s / self.base_quantum_s, self.ratio) - 1e-9)))

    def _clamp(self, level: int) -> int:
        """Levels below the last one are the last one."""
        return level if self.num_levels is None else min(level, self.num_levels - 1)

    def _queue(self, level: int) -> deque[SchedRequest]:
        while len(self.queues) <= level:  # queues are created on demand, as in the reference code
            self.queues.append(deque())
        return self.queues[level]

    def _move(self, req: SchedRequest, level: int, now: float, why: str, front: bool = False) -> None:
        state: MLFQState = req.sched_state
        self.queues[state.level].remove(req)
        state.level, state.service_s = level, 0.0
        state.history.append((now, level, why))
        self._enqueue(req, level, front)

    def _enqueue(self, req: SchedRequest, level: int, front: bool = False) -> None:
        """Front or back of the level's queue; the last level is kept in arrival order (first come, first
        served), so a request that comes back down after a promotion regains its old place."""
        queue = self._queue(level)
        if front:
            queue.appendleft(req)
        elif self.num_levels is not None and level == self.num_levels - 1:
            at = next((i for i, other in enumerate(queue) if other.arrival_time > req.arrival_time), len(queue))
            queue.insert(at, req)
        else:
            queue.append(req)

    # -- Scheduler interface ----------------------------------------------------
    def add(self, req: SchedRequest, now: float) -> None:
        level = self.join_level(req.num_tokens_next)  # the first iteration: a whole prefill, or its first chunk
        req.sched_state = MLFQState(level=level, last_run=now, history=[(now, level, "join")])
        self._enqueue(req, level)

    def remove(self, req: SchedRequest) -> None:
        state: MLFQState | None = req.sched_state
        if state is None:
            return
        self.queues[state.level].remove(req)
        state.queued = False
        self._last_batch = [r for r in self._last_batch if r is not req]
        if log.isEnabledFor(logging.DEBUG):
            levels = " ".join(f"{why}:L{level}@{t:.3f}" for t, level, why in state.history)
            log.debug("request %s done: preemptions=%d levels %s", req.request_id, state.preemptions, levels)

    def __len__(self) -> int:
        return sum(len(q) for q in self.queues)

    def requests(self) -> list[SchedRequest]:
        """Strict priority order: level by level, front of each queue first."""
        return [req for queue in self.queues for req in queue]

    def started_cap(self, max_batch_size: int) -> int:
        return self.max_started if self.max_started is not None else 4 * max_batch_size

    def promote_starved(self, now: float) -> list[SchedRequest]:
        """Move requests that have not run for `starvation_s` to the front of the top queue.

        Not those in the last level: they already run in arrival order, and promoting the ones that waited
        longest since they last ran (the youngest, at the back) only reorders the long requests, which is
        what makes their tail long (simulated at rho=0.99: P99 JCT 1.33-1.59x fcfs without these
        promotions, 1.38-2.10x with them).
        """
        starved = [
            req
            for req in self.requests()
            if self._promotable(req.sched_state.level)
            and now - max(req.sched_state.last_run, req.sched_state.last_promoted) >= self.starvation_s
        ]
        # The longest-starved ends up at the very front.
        for req in sorted(starved, key=lambda r: r.sched_state.last_run, reverse=True):
            req.sched_state.last_promoted = now
            self._move(req, 0, now, "promote", front=True)
            self.stats.promotions += 1
        return starved

    def schedule(self, now: float, max_batch_size: int, token_budget: int) -> list[SchedRequest]:
        """This iteration's batch: strict priority order, new requests held back at the started-cap."""
        self._now = now
        self.promote_starved(now)
        self._last_batch_size = max_batch_size
        candidates = within_start_cap(self.requests(), self.started_cap(max_batch_size))
        return take_in_order(candidates, max_batch_size, token_budget)

    def after_iteration(self, batch: list[SchedRequest], elapsed_s: float, now: float) -> None:
        """Charge the iteration's time to every request that ran; demote those out of quantum by one level
        (never past the last level, whose requests keep their place and run to completion).

        A request that ran last iteration, is still live and did not run in this one was preempted.
        """
        self._now = now
        ran = {id(req) for req in batch}
        for req in self._last_batch:
            if id(req) not in ran and req.sched_state is not None:
                req.sched_state.preemptions += 1
                req.sched_state.history.append((now - elapsed_s, req.sched_state.level, "preempt"))
                self.stats.preemptions += 1
        self._last_batch = [req for req in batch if self._is_live(req)]
        for req in self._last_batch:
            state: MLFQState = req.sched_state
            state.service_s += elapsed_s
            state.last_run = now
            if state.service_s >= self.quantum(state.level) - 1e-12 and self._clamp(state.level + 1) > state.level:
                self._move(req, state.level + 1, now, "demote")
                self.stats.demotions += 1

    def _promotable(self, level: int) -> bool:
        """Starvation promotion applies between the top level and the last (first come, first served) one."""
        return 0 < level and (self.num_levels is None or level < self.num_levels - 1)

    def _is_live(self, req: SchedRequest) -> bool:
        state = req.sched_state
        return isinstance(state, MLFQState) and state.queued

    # -- KV-manager ordering ------------------------------------------------------
    def enst(self, now: float) -> dict[int, float]:
        """Estimated next scheduled time of each request, seconds from `now`, keyed by id(req).

        ENST = min(T_promote, T_execute): T_promote is the time left until starvation promotion (none in the
        top and last levels);
        T_execute is the quantum time the requests ahead of it must use before sinking to its level
        (the rest of their current quantum plus the full quanta of the levels in between), shared
        by `max_batch_size` slots. The first `max_batch_size` requests in order run next: ENST 0.
        """
        slots = max(1, self._last_batch_size)
        result: dict[int, float] = {}
        # One pass in priority order (levels never decrease along it), with running sums instead of a
        # loop over everyone ahead: the KV manager asks for this every iteration.
        lower, lower_quanta_sum, same, level_now, remaining = 0, 0.0, 0, 0, 0.0
        for index, req in enumerate(self.requests()):
            state: MLFQState = req.sched_state
            if state.level != level_now:  # everyone so far is now at a higher-priority level
                lower += same
                lower_quanta_sum += same * self.quanta_through(level_now)
                same, level_now = 0, state.level
            # Requests above: the rest of their quantum, then every full quantum down to this level.
            ahead = remaining + lower * self.quanta_through(state.level - 1) - lower_quanta_sum
            t_execute = 0.0 if index < slots else ahead / slots
            t_promote = max(0.0, self.starvation_s - (now - max(state.last_run, state.last_promoted)))
            result[id(req)] = min(t_execute, t_promote) if self._promotable(state.level) else t_execute
            remaining += max(0.0, self.quantum(state.level) - state.service_s)
            same += 1
        return result

    def quanta_through(self, level: int) -> float:
        """Sum of the quanta of levels 0..level (0 for level -1)."""
        return self.base_quantum_s * (self.ratio ** (level + 1) - 1) / (self.ratio - 1)

    def priority_order(self) -> list[SchedRequest]:
        """Soonest-to-run first (by ENST, ties in queue order): reload from the head, offload from the tail."""
        ordered = self.requests()
        enst = self.enst(self._now)
        rank = {id(req): i for i, req in enumerate(ordered)}
        return sorted(ordered, key=lambda req: (enst[id(req)], rank[id(req)]))


@register_scheduler("srpt-oracle")
class OracleSRPT(Scheduler):
    """Shortest remaining processing time, knowing each output length: the bound MLFQ approximates.

    It is an oracle only when `max_new_tokens` is the real output length (benchmarks send max_tokens with
    ignore_eos, as FastServe's client does). Remaining time = estimated rest of the prefill (if not yet done) plus
    the remaining decode steps times the decode-iteration time. Preemptive at every iteration, with the
    same batch rules and started-cap as the MLFQ, so the comparison isolates the ordering.
    """

    def __init__(
        self,
        decode_s: float | None = None,
        estimate_prefill_s: PrefillEstimator | None = None,
        *,
        profile_path: str | Path | None = None,
        max_started: int | None = None,
        base_quantum_s: float | None = None,
        **options: Any,
    ):
        super().__init__(**options)
        if profile_path is not None and Path(profile_path).is_file():
            profile = PrefillProfile.load(Path(profile_path))
            estimate_prefill_s = estimate_prefill_s or profile.prefill_s
            decode_s = decode_s or profile.base_quantum_s
        self.decode_s = decode_s or base_quantum_s or 1.0  # only the ratio to the prefill estimate matters
        self.estimate_prefill_s = estimate_prefill_s or (lambda prompt_len: 0.0)
        self.max_started = max_started
        self.live: list[SchedRequest] = []
        self.stats = SchedulerStats()

    def remaining_s(self, req: SchedRequest) -> float:
        steps = req.max_new_tokens - req.num_generated
        if req.is_prefilled:
            return steps * self.decode_s
        return self.estimate_prefill_s(req.prefill_remaining) + (steps - 1) * self.decode_s

    def add(self, req: SchedRequest, now: float) -> None:
        self.live.append(req)

    def remove(self, req: SchedRequest) -> None:
        if req in self.live:
            self.live.remove(req)

    def priority_order(self) -> list[SchedRequest]:
        return sorted(self.live, key=lambda r: (self.remaining_s(r), r.arrival_time))

    def schedule(self, now: float, max_batch_size: int, token_budget: int) -> list[SchedRequest]:
        cap = self.max_started if self.max_started is not None else 4 * max_batch_size
        return take_in_order(within_start_cap(self.priority_order(), cap), max_batch_size, token_budget)
