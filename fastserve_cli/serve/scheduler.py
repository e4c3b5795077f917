"""Scheduler interface: which live requests run in the next engine iteration.

The engine (fastserve_cli/serve/engine.py) drives a scheduler like this, once per iteration:

    scheduler.add(req, now)                       # a request arrived (also after nothing else happened to it)
    batch = scheduler.schedule(now, max_batch_size, token_budget)
    ... engine makes KV room for `batch` (in order), runs one model iteration over it ...
    scheduler.after_iteration(batch, elapsed_s, now)
    scheduler.remove(req)                         # finished, cancelled or disconnected
    scheduler.priority_order()                    # asked by the KV manager when it must offload

Contract
- `schedule` returns the batch for this iteration, in priority order, at most `max_batch_size` requests whose
  `num_tokens_next` sum to at most `token_budget` -- except that a single request whose prefill alone exceeds
  the budget may run alone (without chunked prefill a prefill runs whole in one iteration; with it, the engine
  caps every chunk at the budget, so `num_tokens_next` of a prefill is its next chunk and never exceeds it).
  Requests not returned are preempted for this iteration and keep their KV cache.
- The engine may drop requests from the *tail* of the returned batch when it cannot make KV room for them;
  dropped requests simply did not run (they are not passed to `after_iteration`).
- `after_iteration(batch, elapsed_s, now)` gets the requests that actually ran and the iteration's wall time,
  so a scheduler can account service time (quanta, demotion, starvation).
- `priority_order()` lists every live request, soonest-to-run first. The KV manager offloads caches to the host
  pool from the tail of this list and reloads from its head, and preempts-by-recompute from the tail when the
  host pool is full too.
- Everything runs on the engine thread; schedulers need no locks.

Request attributes a scheduler may read (see `fastserve_cli.serve.request.Request`):
  request_id, arrival_time, prompt_len, num_generated, max_new_tokens, num_tokens_next (the next prefill
  chunk, or 1), prefill_remaining (prefill tokens left, 0 once prefilled), is_prefilled (the next iteration is
  a decode), is_started (KV exists: prefilled or some chunks done), kv_location ("none" | "device" | "host"),
  num_preemptions,
  and `sched_state`, a free attribute the scheduler owns.

Registry: `make_scheduler(name, **options)` builds a scheduler by name. Built-in names are resolved lazily
through `SCHEDULER_MODULES` (importing the module registers the class with `@register_scheduler`), so
`fastserve_cli/serve/mlfq.py` only needs `@register_scheduler("skip-join-mlfq")` on its class.
Options passed by the engine (a scheduler ignores the ones it does not use, via **options):
  starvation_s (float), base_quantum_s (float | None), profile_path (Path | None: serve_profile.json of the
  run directory when it exists), max_batch_size (int), token_budget (int).
"""

from __future__ import annotations

import importlib
from typing import Callable

from fastserve_cli.core.errors import UserError
from fastserve_cli.serve.request import Request

SCHEDULERS: dict[str, type["Scheduler"]] = {}
SCHEDULER_MODULES = {
    "fcfs": "fastserve_cli.serve.scheduler",
    "skip-join-mlfq": "fastserve_cli.serve.mlfq",
    "srpt-oracle": "fastserve_cli.serve.mlfq",
}


def register_scheduler(name: str) -> Callable[[type["Scheduler"]], type["Scheduler"]]:
    """Class decorator: make a scheduler available as `--scheduler NAME`."""

    def wrap(cls: type[Scheduler]) -> type[Scheduler]:
        cls.name = name
        SCHEDULERS[name] = cls
        return cls

    return wrap


def make_scheduler(name: str, **options) -> "Scheduler":
    if name not in SCHEDULERS and name in SCHEDULER_MODULES:
        try:
            importlib.import_module(SCHEDULER_MODULES[name])
        except ModuleNotFoundError as err:
            if err.name != SCHEDULER_MODULES[name]:
                raise
    if name not in SCHEDULERS:
        known = ", ".join(sorted(SCHEDULERS)) or "fcfs"
        raise UserError(f"--scheduler {name}: unknown or not built yet; choose one of: {known}")
    return SCHEDULERS[name](**options)


class Scheduler:
    """Base class; subclasses implement the five methods below."""

    name = "base"

    def __init__(self, **options) -> None:
        self.options = options

    def add(self, req: Request, now: float) -> None:
        raise NotImplementedError

    def remove(self, req: Request) -> None:
        raise NotImplementedError

    def schedule(self, now: float, max_batch_size: int, token_budget: int) -> list[Request]:
        raise NotImplementedError

    def after_iteration(self, batch: list[Request], elapsed_s: float, now: float) -> None:
        """Default: nothing to account."""

    def priority_order(self) -> list[Request]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.priority_order())


def take_in_order(
    candidates: list[Request], max_batch_size: int, token_budget: int, skip: bool = False
) -> list[Request]:
    """Fill a batch from `candidates` (already in priority order) under the size and token budgets.

    With skip=False (strict order) the first request that does not fit ends the batch, so nobody overtakes it;
    with skip=True later, smaller requests may fill the remaining budget. A lone oversized prefill may run alone.
    """
    batch: list[Request] = []
    used = 0
    for req in candidates:
        if len(batch) >= max_batch_size:
            break
        cost = req.num_tokens_next
        if used + cost > token_budget and batch:
            if skip:
                continue
            break
        batch.append(req)
        used += cost
    return batch


@register_scheduler("fcfs")
class FCFSScheduler(Scheduler):
    """First come, first served: the oldest requests run, and a request runs until it finishes.

    Running (prefilled) requests are older than waiting ones, so they keep their slots; new requests join as
    soon as a slot and the token budget allow (continuous batching).
    """

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.queue: list[Request] = []

    def add(self, req: Request, now: float) -> None:
        self.queue.append(req)

    def remove(self, req: Request) -> None:
        if req in self.queue:
            self.queue.remove(req)

    def schedule(self, now: float, max_batch_size: int, token_budget: int) -> list[Request]:
        return take_in_order(self.queue, max_batch_size, token_budget)

    def priority_order(self) -> list[Request]:
        return list(self.queue)
