"""What the ingress process knows about the replicas: their last reported load, what it has in flight on
each, routing counters, and their metrics pages merged under a `replica` label.

One `Book` per ingress process, shared by the request router (which Ray Serve runs inside our
`DeploymentHandle`, i.e. in this process) and the ingress endpoints. No Ray import here.
"""

from __future__ import annotations

import threading
from typing import Any, Iterable

from fastserve_cli.serve.cluster.policy import ReplicaLoad


class Book:
    def __init__(self, policy: str = "least-loaded") -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.policy = policy
        self.lock = threading.Lock()
        self.stats: dict[str, dict[str, Any]] = {}  # replica id -> last record_routing_stats() report
        self.up: set[str] = set()  # replicas Ray Serve currently routes to
        self.inflight: dict[str, int] = {}
        self.routed: dict[str, str] = {}  # our request id -> replica chosen by the router
        self.registry = CollectorRegistry()
        r = self.registry
        self.routed_total = Counter(
            "fastserve:router_requests",
            "Engine requests routed, by policy, replica and "
            "decision (rr, p2c, only, prefix_hit, prefix_overflow, no_prefix).",
            ["policy", "replica", "decision"],
            registry=r,
        )
        self.retries = Counter(
            "fastserve:router_retries",
            "Engine requests re-sent to another replica because theirs failed before producing a token.",
            ["policy"],
            registry=r,
        )
        self.failed_started = Counter(
            "fastserve:router_failed_started",
            "Engine requests lost with their replica after it had produced tokens (the client got an error).",
            ["policy"],
            registry=r,
        )
        self.rejected = Counter(
            "fastserve:router_rejected",
            "Requests answered 429: every replica's queue was full.",
            ["policy"],
            registry=r,
        )
        self.replicas_up = Gauge("fastserve:cluster_replicas_up", "Replicas Ray Serve routes to.", registry=r)
        self.registry.register(_ReplicaMetrics(self))

    # -- written by the router -------------------------------------------------------------------
    def set_replicas(self, replicas: Iterable[tuple[str, dict[str, Any] | None]]) -> None:
        """The live replica set with each one's latest routing stats (None: not reported yet)."""
        with self.lock:
            self.up = set()
            for rid, stats in replicas:
                self.up.add(rid)
                if stats:
                    self.stats[rid] = stats
            for gone in set(self.stats) - self.up:
                self.stats.pop(gone, None)
            self.replicas_up.set(len(self.up))

    def on_routed(self, request_id: str | None, replica: str, decision: str) -> None:
        with self.lock:
            self.inflight[replica] = self.inflight.get(replica, 0) + 1
            if request_id:
                self.routed[request_id] = replica
        self.routed_total.labels(self.policy, replica, decision).inc()

    # -- written by the ingress ------------------------------------------------------------------
    def on_done(self, request_id: str) -> None:
        with self.lock:
            replica = self.routed.pop(request_id, None)
            if replica is not None and self.inflight.get(replica, 0) > 0:
                self.inflight[replica] -= 1

    def loads(self, replica_ids: Iterable[str] | None = None) -> list[ReplicaLoad]:
        with self.lock:
            ids = list(replica_ids) if replica_ids is not None else sorted(self.up)
            out = []
            for rid in ids:
                s = self.stats.get(rid, {})
                out.append(
                    ReplicaLoad(
                        rid,
                        int(s.get("waiting", 0)),
                        int(s.get("running", 0)),
                        float(s.get("kv_usage", 0.0)),
                        int(s.get("top_queue", 0)),
                        int(s.get("max_queue", 1 << 30)),
                        self.inflight.get(rid, 0),
                    )
                )
            return out

    def replicas(self) -> list[dict[str, Any]]:
        """For /health: who is up, where, and its load."""
        with self.lock:
            return [
                {
                    "replica": rid,
                    "node": self.stats.get(rid, {}).get("node"),
                    "pid": self.stats.get(rid, {}).get("pid"),
                    "waiting": self.stats.get(rid, {}).get("waiting"),
                    "running": self.stats.get(rid, {}).get("running"),
                    "inflight": self.inflight.get(rid, 0),
                }
                for rid in sorted(self.up)
            ]

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


_BOOKS: dict[str, Book] = {}
_BOOKS_LOCK = threading.Lock()


def book_for(app_name: str, policy: str = "least-loaded") -> Book:
    """The per-process Book of one application, shared by its request router and its ingress."""
    with _BOOKS_LOCK:
        if app_name not in _BOOKS:
            _BOOKS[app_name] = Book(policy)
        return _BOOKS[app_name]


class _ReplicaMetrics:
    """A Prometheus collector that re-exports each replica's `fastserve:*` families with a `replica` label
    (families merged across replicas, so the page stays valid exposition text)."""

    def __init__(self, book: Book) -> None:
        self.book = book

    def collect(self):
        from prometheus_client.parser import text_string_to_metric_families

        with self.book.lock:
            pages = [(rid, s.get("metrics", "")) for rid, s in sorted(self.book.stats.items()) if rid in self.book.up]
        merged: dict[str, Any] = {}
        for rid, page in pages:
            for family in text_string_to_metric_families(page):
                target = merged.setdefault(family.name, _empty_like(family))
                for sample in family.samples:
                    labels = {**sample.labels, "replica": rid}
                    target.samples.append(
                        type(sample)(sample.name, labels, sample.value, sample.timestamp, sample.exemplar)
                    )
        yield from merged.values()

    def describe(self):
        return []


def _empty_like(family):
    from prometheus_client.metrics_core import Metric

    return Metric(family.name, family.documentation, family.type, family.unit)
