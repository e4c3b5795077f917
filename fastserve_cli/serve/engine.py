"""The continuous-batching engine: one background thread running one model iteration at a time.

Each iteration: take new arrivals and cancellations, ask the scheduler for a batch, ask the KV manager to
make room for it (offload/reload/recompute), run one batched decode over the prefilled requests and one
batched prefill over the others (each request's next chunk, `prefill_chunk_tokens` at most, continuing from
the KV it already has, which for a newcomer may be a cached prefix's: serve/prefix_cache.py; a request samples
its first token after its last chunk), sample a token for each that has one, detokenize, check stop
conditions, and hand each request's new output to the API layer through `req.on_output`. Requests join and leave at
every iteration. The HTTP side only calls `submit` and `abort`, which are thread-safe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from fastserve_cli.serve.kv_cache import KVCacheManager
from fastserve_cli.serve.metrics import sync_prefix_metrics
from fastserve_cli.serve.request import Request
from fastserve_cli.serve.sampling import sample
from fastserve_cli.serve.scheduler import Scheduler

log = logging.getLogger("fastserve.engine")


class QueueFull(Exception):
    """The waiting queue is at --max-queue; the API answers 429."""


@dataclass
class StepOutput:
    """What one iteration produced for one request."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    status: int | None = None  # HTTP status for `error` (a cluster ingress: 503 replica lost, 429); None = 500


class Detokenizer:
    """Incremental detokenization with stop strings.

    Decodes a small window (as vLLM does) so each step costs O(1) tokens; holds back an incomplete UTF-8
    tail and, while streaming, the last len(longest stop) - 1 characters that could begin a stop string.
    """

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        self.sent = 0

    def add(self, token_id: int) -> bool:
        """Append a token; True when a stop string appeared (the text is cut before it)."""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full = self.tokenizer.decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            start = max(0, len(self.text) - self.holdback)
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            for s in self.stop:
                hit = self.text.find(s, start)
                if hit != -1:
                    self.text = self.text[:hit]
                    return True
        return False

    def take(self, final: bool) -> str:
        """Text not handed out yet (all of it when final)."""
        end = len(self.text) if final else max(self.sent, len(self.text) - self.holdback)
        out, self.sent = self.text[self.sent : end], end
        return out


class Engine:
    def __init__(
        self,
        backend,
        scheduler: Scheduler,
        kv: KVCacheManager,
        tokenizer,
        metrics,
        *,
        max_batch_size: int = 8,
        token_budget: int = 2048,
        max_queue: int = 256,
        prefill_chunk_tokens: int | None = None,
    ) -> None:
        self.backend = backend
        backend.max_rows = max_batch_size  # decode batches never exceed it: the torch pack sizes its rows by it
        self.scheduler = scheduler
        self.kv = kv
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.token_budget = token_budget
        self.max_queue = max_queue
        # A chunk never exceeds the iteration's token budget (then a prefill never runs alone over it).
        self.prefill_chunk_tokens = min(prefill_chunk_tokens, token_budget) if prefill_chunk_tokens else None
        self.chunk_when_idle = False  # True: chunk prefills even with nobody decoding (tests, benchmarks)
        self.live: list[Request] = []
        self._inbox: deque[Request] = deque()
        self._aborts: deque[Request] = deque()
        self._calls: deque[tuple[Any, Future]] = deque()  # work for the backend between iterations (`call`)
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.num_waiting = 0
        self.iterations = 0

    # -- thread-safe API -------------------------------------------------------------------------
    def submit(self, reqs: list[Request]) -> None:
        """Queue requests (all or none); raises QueueFull past --max-queue."""
        with self._cond:
            if self.num_waiting + len(self._inbox) + len(reqs) > self.max_queue:
                raise QueueFull(
                    f"{self.num_waiting + len(self._inbox)} requests are waiting (--max-queue {self.max_queue})"
                )
            for req in reqs:
                req.detok = Detokenizer(self.tokenizer, req.params.stop)
                req.prefill_chunk = self.prefill_chunk_tokens
                self._inbox.append(req)
            self._cond.notify()

    def abort(self, reqs: list[Request]) -> None:
        """Cancel requests (client gone); their KV is freed at the next iteration boundary."""
        with self._cond:
            self._aborts.extend(r for r in reqs if not r.finished)
            self._cond.notify()

    def call(self, fn) -> Future:
        """Run `fn()` on the engine thread between two iterations (so it never overlaps a forward or a pack
        change): prompt scoring uses the backend this way. The HTTP side awaits the returned future."""
        future: Future = Future()
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine is shutting down")
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    def _run_calls(self) -> None:
        with self._cond:
            calls, self._calls = list(self._calls), deque()
        for fn, future in calls:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as err:  # handed to the awaiting request, the engine keeps going
                    future.set_exception(err)

    def grammar_vocab(self) -> tuple[int | None, set[int]]:
        """(vocabulary size, stop-token ids) that grammar masks are built for."""
        return self.backend.config.get("vocab_size"), set(self.backend.eos_token_ids)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="fastserve-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Let in-flight requests finish for up to `timeout` seconds, cancel the rest, stop the thread."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (self.live or self._inbox):
            time.sleep(0.05)
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for req in list(self.live) + list(self._inbox):
            self._finish(req, "abort")

    # -- the loop ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._inbox and not self._aborts and not self.live and not self._calls:
                    self._cond.wait()
                if self._stopping:
                    calls, self._calls = list(self._calls), deque()
                    for _, future in calls:
                        future.cancel()
                    return
            try:
                self._run_calls()
                self.step()
            except Exception as err:  # keep serving: fail the live requests, not the process
                log.exception("engine iteration failed")
                for req in list(self.live):
                    self._finish(req, "error", error=f"{type(err).__name__}: {err}")

    def _intake(self, now: float) -> None:
        with self._cond:
            arrivals, self._inbox = list(self._inbox), deque()
            aborts, self._aborts = list(self._aborts), deque()
        for req in arrivals:
            self.live.append(req)
            self.scheduler.add(req, now)
        for req in aborts:
            if not req.finished:
                self._finish(req, "abort")

    def step(self) -> bool:
        """One iteration; False when there was nothing to run."""
        now = time.perf_counter()
        self._intake(now)
        self._set_chunks()
        batch = self.scheduler.schedule(now, self.max_batch_size, self.token_budget)
        runnable = self.kv.make_room(batch, self.live, self.scheduler.priority_order) if batch else []
        if batch and not runnable and len(self.live) == 1:
            self._finish(batch[0], "error", error="the request does not fit in --kv-cache-memory")
        self._update_gauges()
        if not runnable:
            if self.live:
                time.sleep(0.001)  # nothing fits right now (should be rare); do not spin hot
            return False
        t0 = time.perf_counter()
        results = self._execute(runnable, t0)
        elapsed = time.perf_counter() - t0
        self.metrics.iteration_latency.observe(elapsed)
        self.iterations += 1
        for req, (token, logprob) in results:
            self._accept(req, token, logprob)
        self.scheduler.after_iteration(runnable, elapsed, time.perf_counter())
        self._update_gauges()
        return True

    def _set_chunks(self) -> None:
        """Chunk prefills only while some request decodes: chunks exist to keep the running streams' inter-token
        latency low. With nobody decoding, a prompt prefills whole (one forward: its shortest time to first token).
        """
        if self.prefill_chunk_tokens is None:
            return
        decoding = self.chunk_when_idle or any(r.is_prefilled for r in self.live)
        chunk = self.prefill_chunk_tokens if decoding else None
        for req in self.live:
            req.prefill_chunk = chunk

    def _execute(self, batch: list[Request], start: float) -> list[tuple[Request, tuple[int, Any]]]:
        """One batched decode and one batched prefill (a chunk of each newcomer's prompt, continuing from the KV
        it has); returns a sampled token per request that has one: decodes, and prefills whose last chunk ran."""
        decodes = sorted((r for r in batch if r.is_prefilled), key=lambda r: r.seq)  # stable order keeps the pack
        prefills = [r for r in batch if not r.is_prefilled]
        results = []
        for req in batch:
            if req.first_scheduled_time is None:
                req.first_scheduled_time = start
                self.metrics.request_queue_time.observe(start - req.arrival_time)
                self.metrics.prompt_tokens.inc(req.prompt_len)
        for req in prefills:
            self.kv.begin_prefill(req)  # a prefix-cache hit: the prefill starts from the cached KV
        decoded, logits = self.backend.step(decodes, prefills, [r.num_tokens_next for r in prefills])
        if decodes:
            results += list(zip(decodes, sample(decoded, decodes)))
        if prefills:
            self.kv.end_prefills(prefills, self.live)
            done = [i for i, r in enumerate(prefills) if r.kv_tokens == r.total_len]  # the first token comes now
            if done:
                ready = [prefills[i] for i in done]
                results += list(zip(ready, sample(logits[done] if len(done) < len(prefills) else logits, ready)))
        return results

    def _accept(self, req: Request, token: int, logprob) -> None:
        """Record a sampled token, check finish conditions, notify the API layer."""
        now = time.perf_counter()
        req.output_ids.append(token)
        self.metrics.generation_tokens.inc()
        if req.first_token_time is None:
            req.first_token_time = now
            self.metrics.time_to_first_token.observe(now - req.arrival_time)
        else:
            self.metrics.inter_token_latency.observe(now - req.last_token_time)
        req.last_token_time = now
        out = StepOutput(token_ids=[token])
        if logprob is not None:
            out.logprobs.append((token, logprob[0], logprob[1]))
        reason = None
        if req.grammar is not None and req.grammar.terminated:
            reason = "stop"  # the grammar accepted EOS: the constrained output is complete
        elif token in self.backend.eos_token_ids and not req.params.ignore_eos:
            reason = "stop"
        elif req.detok.add(token):
            reason = "stop"
        elif req.num_generated >= req.params.max_new_tokens or req.total_len >= self.backend.max_context:
            reason = "length"
        if reason is None:
            out.text = req.detok.take(final=False)
            self._emit(req, out)
        else:
            self._finish(req, reason, out)

    def _finish(self, req: Request, reason: str, out: StepOutput | None = None, error: str | None = None) -> None:
        if req.finished:
            return
        out = out or StepOutput()
        req.finished, req.finish_reason = True, reason
        out.finished, out.finish_reason, out.error = True, reason, error
        if req.detok is not None:
            out.text = req.detok.take(final=True)
        if req in self.live:
            self.live.remove(req)
            self.scheduler.remove(req)
        self.kv.free(req)
        self.metrics.e2e_request_latency.observe(time.perf_counter() - req.arrival_time)
        self.metrics.request_success(reason)
        self._emit(req, out)

    def _emit(self, req: Request, out: StepOutput) -> None:
        if req.on_output is not None:
            req.on_output(out)

    def _update_gauges(self) -> None:
        waiting = sum(1 for r in self.live if r.first_token_time is None)
        with self._cond:
            self.num_waiting = waiting
        m = self.metrics
        m.num_requests_waiting.set(waiting + len(self._inbox))
        m.num_requests_running.set(len(self.live) - waiting)
        m.num_requests_swapped.set(sum(1 for r in self.live if r.kv_location == "host"))
        m.kv_cache_usage_perc.set(self.kv.usage(self.live))
        _sync_counter(m.num_preemptions, self.kv.recompute_preemptions)
        _sync_counter(m.kv_offloads, self.kv.offloads)
        _sync_counter(m.kv_reloads, self.kv.reloads)
        _sync_counter(m.kv_offloaded_bytes, self.kv.offloaded_bytes)
        if self.kv.prefix is not None:
            sync_prefix_metrics(m, self.kv.prefix)
        stats = getattr(self.scheduler, "stats", None)  # the MLFQ's counters (fcfs keeps none)
        if stats is not None:
            _sync_counter(m.scheduler_preemptions, stats.preemptions)
            _sync_counter(m.scheduler_demotions, stats.demotions)
            _sync_counter(m.scheduler_promotions, stats.promotions)


def _sync_counter(counter, total: int) -> None:
    """Advance a Prometheus counter to the manager's running total."""
    delta = total - counter._value.get()
    if delta > 0:
        counter.inc(delta)
