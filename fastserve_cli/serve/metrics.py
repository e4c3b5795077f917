"""Prometheus metrics with vLLM's names under the `fastserve:` prefix (one registry per engine)."""

from __future__ import annotations

LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
)


class Metrics:
    def __init__(self, model_name: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def gauge(name, doc):
            return Gauge(f"fastserve:{name}", doc, labels, registry=r).labels(model_name)

        def counter(name, doc):
            return Counter(f"fastserve:{name}", doc, labels, registry=r).labels(model_name)

        def histogram(name, doc):
            return Histogram(f"fastserve:{name}", doc, labels, buckets=LATENCY_BUCKETS, registry=r).labels(model_name)

        self.num_requests_running = gauge("num_requests_running", "Requests with a KV cache (started, unfinished).")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests waiting for their first iteration.")
        self.num_requests_swapped = gauge("num_requests_swapped", "Requests whose KV cache is in the host pool.")
        self.kv_cache_usage_perc = gauge("kv_cache_usage_perc", "Fraction of the KV-cache budget in use (0..1).")
        self.prompt_tokens = counter("prompt_tokens", "Prefilled prompt tokens.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self.num_preemptions = counter("num_preemptions", "Preemptions by recompute (KV dropped).")
        self.kv_offloads = counter("kv_cache_offloads", "KV caches moved to the host pool.")
        self.kv_reloads = counter("kv_cache_reloads", "KV caches moved back from the host pool.")
        self.kv_offloaded_bytes = counter("kv_cache_offloaded_bytes", "Bytes of KV cache moved to the host pool.")
        self.scheduler_preemptions = counter(
            "scheduler_preemptions", "Requests left out of an iteration after running in the one before (KV kept)."
        )
        self.scheduler_demotions = counter(
            "scheduler_demotions", "MLFQ demotions: a request used up its level's quantum."
        )
        self.scheduler_promotions = counter("scheduler_promotions", "MLFQ starvation promotions to the top queue.")
        self.time_to_first_token = histogram("time_to_first_token_seconds", "Arrival to first token.")
        self.inter_token_latency = histogram("inter_token_latency_seconds", "Time between two tokens of a request.")
        self.e2e_request_latency = histogram("e2e_request_latency_seconds", "Arrival to finish.")
        self.request_queue_time = histogram("request_queue_time_seconds", "Arrival to first scheduled.")
        self.iteration_latency = histogram("iteration_latency_seconds", "Wall time of one engine iteration.")
        self.prefix_cache_queries = counter(
            "prefix_cache_queries", "Prefix cache: tokens of the prefills that looked it up (vLLM's name)."
        )
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prefix cache: of those, tokens whose KV was reused.")
        self.prefix_cache_hit_rate = gauge("prefix_cache_hit_rate", "Prefix cache: hits / queries since start (0..1).")
        self.prefix_cache_usage_perc = gauge(
            "prefix_cache_usage_perc", "Prefix cache: fraction of the KV-cache budget its blocks hold (0..1)."
        )
        self.prefix_cache_evictions = counter("prefix_cache_evicted_blocks", "Prefix cache: blocks evicted.")
        self._success = Counter(
            "fastserve:request_success", "Finished requests by reason.", ["model_name", "finished_reason"], registry=r
        )
        self._model_name = model_name

    def request_success(self, reason: str) -> None:
        self._success.labels(self._model_name, reason).inc()

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def sync_prefix_metrics(metrics: Metrics, cache) -> None:
    """Advance the prefix-cache series to the cache's running totals (serve/prefix_cache.py)."""
    stats = cache.stats
    for counter, total in (
        (metrics.prefix_cache_queries, stats.queries),
        (metrics.prefix_cache_hits, stats.hits),
        (metrics.prefix_cache_evictions, stats.evicted_blocks),
    ):
        delta = total - counter._value.get()
        if delta > 0:
            counter.inc(delta)
    metrics.prefix_cache_hit_rate.set(stats.hit_rate)
    metrics.prefix_cache_usage_perc.set(min(1.0, cache.bytes / cache.budget) if cache.budget else 0.0)
