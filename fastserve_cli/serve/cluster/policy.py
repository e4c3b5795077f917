"""Routing policies for engine replicas: pure functions of each replica's load, no Ray import.

Why pure: the same code picks a replica inside Ray Serve's request router (router.py), inside the
multi-replica simulator (sim.py) and in unit tests, so the policy measured offline is the policy served.

Load signals, per replica (`ReplicaLoad`): waiting and running requests, KV-cache usage and, with the
skip-join MLFQ, how many requests sit in its top queues. They arrive periodically from the replica
(`record_routing_stats`, no round trip per request); between two reports the router adds what it sent
itself and has not seen finish (`inflight`), so a burst does not pile onto a replica whose report is stale.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass
from typing import Sequence

POLICIES = ("round-robin", "least-loaded", "prefix")
PREFIX_TOKENS = 32  # prompts sharing their first 32 tokens (a chat system prompt) share a prefix key


@dataclass
class ReplicaLoad:
    """One replica's latest report plus what this router routed to it since."""

    replica_id: str
    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0  # 0..1 of the replica's KV budget
    top_queue: int = 0  # requests in the MLFQ's top queues (0 with fcfs)
    max_queue: int = 256
    inflight: int = 0  # routed here by this router and not finished (always fresh)

    @property
    def requests(self) -> int:
        """Live requests: the fresher of the replica's report and this router's own count."""
        return max(self.waiting + self.running, self.inflight)

    @property
    def full(self) -> bool:
        """Its waiting queue is at --max-queue: a request sent there would get 429."""
        return max(self.waiting, self.inflight - self.running) >= self.max_queue

    @property
    def pending(self) -> int:
        """Requests not prefilled yet: the reported waiting ones plus what this router sent since the report."""
        return self.waiting + max(0, self.inflight - (self.waiting + self.running))

    def score(self) -> float:
        """Lower is better. Every live request counts once; one still waiting for its prefill counts 2 more
        (a prefill stalls the replica's whole batch: ~150 us a prompt token against ~0.1 ms a decode row
        for the benchmark model); one in the skip-join MLFQ's top queues half more (it runs before a
        newcomer, lower queues get preempted for it); a nearly full KV cache up to 4 more (offloads or
        recompute for whatever joins). Weights chosen with the simulator (sim.py), see docs/serve-cluster.md."""
        return self.requests + 2.0 * self.pending + 0.5 * self.top_queue + 4.0 * self.kv_usage


def prefix_key(prompt_ids: Sequence[int], length: int = PREFIX_TOKENS) -> str | None:
    """A stable key of the prompt's first `length` tokens; None for shorter prompts (nothing to share)."""
    if len(prompt_ids) < length:
        return None
    data = ",".join(map(str, prompt_ids[:length])).encode()
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def _rendezvous(key: str, replica_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}|{replica_id}".encode(), digest_size=8).digest(), "big")


@dataclass
class Choice:
    replica_id: str
    decision: str  # how it was chosen: rr, p2c, only, prefix_hit, prefix_overflow, no_prefix


class Policy:
    """Base: `choose(loads, prefix)` returns the replica for one request. Full replicas are skipped;
    the caller answers 429 when `all_full(loads)`."""

    name = ""

    def __init__(self, seed: int | None = None) -> None:
        self.rng = random.Random(seed)

    def choose(self, loads: Sequence[ReplicaLoad], prefix: str | None = None) -> Choice:
        raise NotImplementedError


def all_full(loads: Sequence[ReplicaLoad]) -> bool:
    return bool(loads) and all(r.full for r in loads)


def _open(loads: Sequence[ReplicaLoad]) -> list[ReplicaLoad]:
    open_ = [r for r in loads if not r.full]
    return open_ or list(loads)


class RoundRobin(Policy):
    """The baseline: replicas in turn, whatever their load."""

    name = "round-robin"

    def __init__(self, seed: int | None = None) -> None:
        super().__init__(seed)
        self._counter = itertools.count()

    def choose(self, loads: Sequence[ReplicaLoad], prefix: str | None = None) -> Choice:
        ordered = sorted(loads, key=lambda r: r.replica_id)
        return Choice(ordered[next(self._counter) % len(ordered)].replica_id, "rr")


class LeastLoaded(Policy):
    """Power of two choices: sample two replicas, take the lower score (ties at random). Near-optimal
    balance without every router herding onto the one replica that looked emptiest in the last report."""

    name = "least-loaded"

    def choose(self, loads: Sequence[ReplicaLoad], prefix: str | None = None) -> Choice:
        candidates = _open(loads)
        if len(candidates) == 1:
            return Choice(candidates[0].replica_id, "only")
        a, b = self.rng.sample(candidates, 2)
        sa, sb = a.score(), b.score()
        best = a if sa < sb else b if sb < sa else self.rng.choice((a, b))
        return Choice(best.replica_id, "p2c")


class PrefixAffinity(Policy):
    """Same prompt prefix -> same replica (rendezvous hashing, so adding a replica moves few keys), unless
    that replica carries `slack` more requests than the least-loaded one (then least-loaded decides)."""

    name = "prefix"

    def __init__(self, seed: int | None = None, slack: int = 4) -> None:
        super().__init__(seed)
        self.slack = slack
        self.fallback = LeastLoaded(seed)

    def choose(self, loads: Sequence[ReplicaLoad], prefix: str | None = None) -> Choice:
        if prefix is None:
            return Choice(self.fallback.choose(loads).replica_id, "no_prefix")
        home = max(loads, key=lambda r: _rendezvous(prefix, r.replica_id))
        lightest = min(r.requests for r in _open(loads))
        if not home.full and home.requests <= lightest + self.slack:
            return Choice(home.replica_id, "prefix_hit")
        return Choice(self.fallback.choose(loads).replica_id, "prefix_overflow")


def make_policy(name: str, seed: int | None = None) -> Policy:
    classes = {cls.name: cls for cls in (RoundRobin, LeastLoaded, PrefixAffinity)}
    if name not in classes:
        raise ValueError(f"unknown router '{name}'; choose one of: {', '.join(POLICIES)}")
    return classes[name](seed)
