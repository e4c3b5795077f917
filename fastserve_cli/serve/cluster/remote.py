"""An engine look-alike for the ingress: same `submit`/`abort`/`metrics`/`shutdown` as serve/engine.py's
Engine, so serve/api.py's protocol layer (routes, validation, n, stop, logprobs, SSE, error shapes) serves a
cluster unchanged. Each engine request becomes one streaming call to a replica through the deployment
handle, whose request router (router.py) picks the replica.

Faults: a call that fails before its replica produced anything is re-sent (Ray Serve's router has by then
dropped a dead replica); one that fails after tokens reached the client ends with a 503 error output
(api.py turns it into an SSE error event + [DONE], or a 503 body).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any, Callable

from fastserve_cli.serve.cluster.book import Book
from fastserve_cli.serve.cluster.policy import all_full, prefix_key
from fastserve_cli.serve.engine import QueueFull, StepOutput
from fastserve_cli.serve.request import Request

log = logging.getLogger("fastserve.cluster")
MAX_ATTEMPTS = 6  # with the back-off below: ~5 s for Ray Serve to drop a dead replica
RETRY_BACKOFF_S = (0.1, 0.3, 0.6, 1.2, 2.4)
_ids = itertools.count()


class ReplicaLost(Exception):
    """A replica died (or its call failed) after this request had produced tokens."""


class RemoteEngine:
    def __init__(
        self, handle, book: Book, on_shutdown: Callable[[], None] | None = None, transport: str = "grpc"
    ) -> None:
        # grpc: items travel over Ray Serve's replica gRPC server instead of one Ray object each (the
        # object store's per-item cost dominated the cluster's overhead; see docs/serve-cluster.md).
        self.handle = handle.options(stream=True, _by_reference=transport != "grpc")
        self.book = book
        self.metrics = book  # api.py's /metrics calls engine.metrics.render()
        self.on_shutdown = on_shutdown
        self.tasks: dict[int, asyncio.Task] = {}  # id(Request) -> its call
        self.vocab_size: int | None = None  # the replicas' (from their info())
        self.eos_token_ids: list[int] = []

    # -- the Engine interface api.py uses ----------------------------------------------------------
    def grammar_vocab(self) -> tuple[int | None, set[int]]:
        """The replicas' vocabulary and stop tokens (they serve the same model directory)."""
        return self.vocab_size, set(self.eos_token_ids)

    def start(self) -> None:
        """Replicas start their own engines."""

    def submit(self, reqs: list[Request]) -> None:
        """Called on the event loop; 429 (QueueFull) when every replica's queue is full."""
        loads = self.book.loads()
        if all_full(loads):
            self.book.rejected.labels(self.book.policy).inc()
            raise QueueFull(f"all {len(loads)} replicas have a full waiting queue")
        loop = asyncio.get_running_loop()
        for req in reqs:
            self.tasks[id(req)] = loop.create_task(self._run(req))

    def abort(self, reqs: list[Request]) -> None:
        """Client gone: cancelling the call cancels the replica's generator, which aborts its request."""
        for req in reqs:
            task = self.tasks.pop(id(req), None)
            if task is not None and not task.done():
                task.cancel()

    def health(self) -> dict[str, Any]:
        replicas = self.book.replicas()
        return {"status": "ok" if replicas else "no replicas", "replicas_up": len(replicas), "replicas": replicas}

    def shutdown(self, timeout: float = 30.0) -> None:
        """Let calls in flight finish for up to `timeout` s (uvicorn already stopped taking requests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(not t.done() for t in list(self.tasks.values())):
            time.sleep(0.05)
        if self.on_shutdown is not None:
            self.on_shutdown()

    # -- one engine request ------------------------------------------------------------------------
    def _payload(self, req: Request, rid: str) -> dict[str, Any]:
        return {
            "rid": rid,
            "prompt_ids": req.prompt_ids,
            "params": dict(req.params.__dict__),
            "prefix": prefix_key(req.prompt_ids),
            "grammar": req.grammar_spec,
        }

    async def _run(self, req: Request) -> None:
        try:
            await self._attempts(req)
        finally:
            self.tasks.pop(id(req), None)

    async def _attempts(self, req: Request) -> None:
        """Stream one request from a replica into `req.on_output`, retrying while nothing was produced."""
        started = False
        for attempt in range(MAX_ATTEMPTS):
            rid = f"r{next(_ids)}"
            try:
                started = await self._stream(req, rid, started)
                return
            except asyncio.CancelledError:
                raise
            except QueueFull as err:  # the replica's own queue filled up since its last report
                self.book.rejected.labels(self.book.policy).inc()
                self._fail(req, 429, f"the server is busy: {err}; retry later")
                return
            except ReplicaLost as err:
                self.book.failed_started.labels(self.book.policy).inc()
                self._fail(
                    req,
                    503,
                    f"the replica serving this request failed after it had started ({err}); "
                    "the partial output is lost, retry the request",
                )
                return
            except Exception as err:  # the replica died or was unreachable before producing anything
                if attempt + 1 == MAX_ATTEMPTS:
                    self._fail(
                        req,
                        503,
                        f"no replica could serve the request after {MAX_ATTEMPTS} attempts: {type(err).__name__}",
                    )
                    return
                self.book.retries.labels(self.book.policy).inc()
                log.warning(
                    "request %s: replica call failed before any token (%s); retrying",
                    req.request_id,
                    type(err).__name__,
                )
                await asyncio.sleep(RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)])
            finally:
                self.book.on_done(rid)

    async def _stream(self, req: Request, rid: str, started: bool) -> bool:
        gen = self.handle.generate.remote(self._payload(req, rid))
        try:
            async for item in gen:
                if "queue_full" in item:  # the replica's queue filled up since its last report
                    raise QueueFull(item["queue_full"])
                out = StepOutput(**item)
                started = True
                req.output_ids.extend(out.token_ids)
                if out.finished:
                    req.finished, req.finish_reason = True, out.finish_reason
                req.on_output(out)
                if out.finished:
                    return started
        except asyncio.CancelledError:
            gen.cancel()
            raise
        except QueueFull:
            raise
        except Exception as err:
            if started:
                raise ReplicaLost(type(err).__name__) from err
            raise
        if not req.finished:
            if started:
                raise ReplicaLost("the stream ended early")
            raise RuntimeError("the replica's stream ended before any output")
        return started

    def _fail(self, req: Request, status: int, message: str) -> None:
        req.finished, req.finish_reason = True, "error"
        req.on_output(StepOutput(finished=True, finish_reason="error", error=message, status=status))
