"""KV-cache manager: per-request caches under a device memory budget, with a host pool for offload.

Accounting is in tokens x bytes-per-token of the model (the pack's left padding is transient and not
counted). Before each iteration the engine asks `make_room(batch, live, priority_order)`:
- every request in the batch needs room for its KV after this iteration on the device: what it holds plus
  `num_tokens_next` (decode: one more token; prefill: the chunk this iteration computes, all of the rest
  when prefill is not chunked). A partially prefilled request is a request like any other here: it holds
  `kv_tokens` of KV and may be offloaded (its chunks then continue after the reload) or, by recompute,
  dropped (its prefill restarts from token 0, or from what `req.kv` holds);
- room comes from offloading the caches of requests that will run latest (the tail of the scheduler's
  priority order, never one in this batch) to the host pool, and when the host pool is full too, from
  dropping their cache (preemption by recompute: they prefill again later; counted in metrics);
- requests whose cache sits in the host pool are reloaded before they run;
- requests at the batch's tail that still do not fit are left out of this iteration.
With a prefix cache (serve/prefix_cache.py) its blocks count against the device budget too: before anything
is offloaded, unreferenced blocks are evicted (a prefill of this batch first references the blocks it will
read, so they stay); after the prefills, their full blocks are cached in whatever room is left.
On a CPU-only machine "device" and "host" are both main memory: the host pool is then a separate budget
with real copies, which keeps the policy (and its tests) identical to the GPU case.
"""

from __future__ import annotations

import re
from typing import Callable

from fastserve_cli.core.errors import UserError
from fastserve_cli.serve.request import Request

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text: str | int, what: str = "--kv-cache-memory") -> int:
    """'512MiB', '2GB', '1e9' or an int -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise UserError(f"{what} {text!r}: not a size; write e.g. 512MiB, 2GB or 1073741824")
    try:
        value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    except ValueError:
        raise UserError(f"{what} {text!r}: not a size; write e.g. 512MiB, 2GB or 1073741824") from None
    if value <= 0:
        raise UserError(f"{what} {text!r}: must be positive")
    return int(value)


class KVCacheManager:
    """Decides where each request's KV lives; the backend moves the tensors."""

    def __init__(self, backend, device_budget: int, host_budget: int, prefix_cache=None) -> None:
        self.backend = backend
        self.prefix = prefix_cache  # a PrefixCache, or None when prefix caching is off
        self.bytes_per_token = backend.kv_bytes_per_token
        self.device_budget = device_budget
        self.host_budget = host_budget
        self.offloads = 0
        self.reloads = 0
        self.offloaded_bytes = 0
        self.prefetches = 0  # reloads ahead of a request's turn (counted in `reloads` too)
        self.recompute_preemptions = 0

    # -- accounting ---------------------------------------------------------------------------
    def tokens_fitting(self) -> int:
        return self.device_budget // self.bytes_per_token

    def bytes_of(self, req: Request) -> int:
        return req.kv_tokens * self.bytes_per_token

    def used(self, live: list[Request], where: str) -> int:
        return sum(self.bytes_of(r) for r in live if r.kv_location == where)

    def usage(self, live: list[Request]) -> float:
        """Fraction of the device budget in use (vLLM's kv_cache_usage_perc is a 0..1 fraction too); cached
        prefix blocks count only while a request holds them (the others are given up on demand)."""
        held = self.prefix.held_bytes if self.prefix is not None else 0
        return min(1.0, (self.used(live, "device") + held) / self.device_budget)

    def cached_bytes(self) -> int:
        return self.prefix.bytes if self.prefix is not None else 0

    # -- policy --------------------------------------------------------------------------------
    def make_room(self, batch: list[Request], live: list[Request], order: Callable[[], list[Request]]) -> list[Request]:
        """Return the prefix of `batch` that can run this iteration, after offloading/reloading as needed.

        `live` is every live request in any order; `order()` ranks them soonest-to-run first and is asked
        only when a cache must move (under MLFQ it costs O(n log n) a call, most of a scheduling step).
        """
        device_used = self.used(live, "device") + self.cached_bytes()
        growth = 0  # what the requests already admitted add during this iteration
        ranked: list[Request] | None = None
        moved_out = self.offloads + self.recompute_preemptions
        runnable: list[Request] = []
        for req in batch:
            after = self._tokens_after(req) * self.bytes_per_token
            mine_now = self.bytes_of(req) if req.kv_location == "device" else 0
            need = device_used + growth - mine_now + after - self.device_budget
            if need > 0 and self.prefix is not None:
                need, device_used = self._evict_prefix(req, need, device_used)
            if need > 0:
                ranked = ranked if ranked is not None else order()
                if not self._evict(need, ranked, {id(r) for r in runnable} | {id(req)}):
                    break
                device_used = self.used(live, "device") + self.cached_bytes()
            if req.kv_location == "host":
                self.backend.to_device(req)
                self.reloads += 1
                device_used += self.bytes_of(req)
            growth += after - self.bytes_of(req)
            runnable.append(req)
        if self.prefix is not None:  # holds last one iteration: the requests left out read nothing now
            for req in batch[len(runnable) :]:
                self.prefix.release(req)
        # Never reload what was just pushed out; there is nothing to prefetch without host-resident caches.
        if self.offloads + self.recompute_preemptions == moved_out and any(r.kv_location == "host" for r in live):
            self._prefetch(ranked if ranked is not None else order(), runnable)
        return runnable

    def _tokens_after(self, req: Request) -> int:
        """KV tokens `req` holds after this iteration: what it holds plus its next chunk; a newcomer with a
        prefix-cache hit (referenced here, so it survives until its prefill copies it) starts from the hit."""
        if req.kv_location != "none":
            return req.kv_tokens + req.num_tokens_next
        hit = self.prefix.acquire(req) if self.prefix is not None else 0
        rest = req.total_len - hit
        return hit + (rest if req.prefill_chunk is None else min(rest, req.prefill_chunk))

    def _evict_prefix(self, req: Request, need: int, device_used: int) -> tuple[int, int]:
        """Room from unreferenced cached blocks; then from the blocks only `req` holds (it computes those
        tokens itself rather than not running)."""
        freed = self.prefix.evict(need)
        if freed < need:
            self.prefix.release(req)
            freed += self.prefix.evict(need - freed)
        return need - freed, device_used - freed

    def begin_prefill(self, req: Request) -> None:
        """Before `req`'s prefill: its cached prefix becomes its initial KV (the prefill computes the rest)."""
        if self.prefix is not None and req.kv is None:
            self.prefix.attach(req)

    def end_prefills(self, reqs: list[Request], live: list[Request]) -> None:
        """After an iteration's prefills: cache their full blocks in the room the budget has left."""
        if self.prefix is None:
            return
        for req in reqs:
            free = self.device_budget - self.used(live, "device") - self.cached_bytes()
            self.prefix.insert(req, free)

    def _prefetch(self, live: list[Request], runnable: list[Request]) -> None:
        """Reload host-resident caches from the head of the priority order while the device has room.

        Room is what stays free after this iteration's growth, unreferenced prefix-cache blocks included (a
        live request's cache comes before them); the requests that will run soonest then find their cache on
        the device (on a GPU the copy overlaps the current iteration's compute).
        """
        growth = sum(r.num_tokens_next for r in runnable) * self.bytes_per_token
        free = self.device_budget - self.used(live, "device") - self.cached_bytes() - growth
        for req in live:
            if req.kv_location != "host":
                continue
            if self.prefix is not None and free < self.bytes_of(req) <= free + self.prefix.evictable_bytes:
                free += self.prefix.evict(self.bytes_of(req) - free)
            if self.bytes_of(req) > free:
                break
            self.backend.to_device(req)
            free -= self.bytes_of(req)
            self.reloads += 1
            self.prefetches += 1

    def _evict(self, need: int, live: list[Request], protected: set[int]) -> bool:
        """Free `need` device bytes from the tail of the priority order; False if impossible."""
        victims = [r for r in reversed(live) if r.kv_location == "device" and id(r) not in protected]
        if sum(self.bytes_of(r) for r in victims) < need:
            return False
        for victim in victims:
            if need <= 0:
                break
            size = self.bytes_of(victim)
            if self.used(live, "host") + size <= self.host_budget:
                self.backend.to_host(victim)
                self.offloads += 1
                self.offloaded_bytes += size
            else:
                self.backend.release(victim)
                victim.num_preemptions += 1
                self.recompute_preemptions += 1
            need -= size
        return True

    def free(self, req: Request) -> None:
        self.backend.release(req)
        if self.prefix is not None:
            self.prefix.release(req)
