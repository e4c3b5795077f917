"""One engine replica as a Ray Serve deployment: today's engine, unchanged, behind three methods.

`generate` streams one engine request's StepOutputs (as dicts) to the ingress; `record_routing_stats` is
Ray Serve's hook that the controller polls every `request_routing_stats_period_s` and hands to the request
router (so routing reads load without a round trip per request); `info` gives the ingress what it needs to
validate requests (context length, KV budget). Cancelling the stream (client gone) aborts the engine
request, which frees its KV cache at the next iteration boundary.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
from pathlib import Path
from typing import Any, AsyncIterator

LOAD_ERROR_MARK = "fastserve-replica-load-error: "


def replica_load_error(node: str, path: Path, err: BaseException | str) -> str:
    """The one line a failed start-up shows: which node could not load which path, and why."""
    return f"{LOAD_ERROR_MARK}replica on node {node} cannot load the model at {path}: {err}"


class EngineReplica:
    """Deployment body (wrapped with `serve.deployment` in deploy.py, so this module imports without Ray)."""

    def __init__(self, target: dict[str, Any], cfg: dict[str, Any]) -> None:
        from fastserve_cli.core.recipe import ServeConfig
        from fastserve_cli.serve import ServeTarget, build_engine

        self.node = _node_address()
        self.pid = os.getpid()
        target = ServeTarget(
            Path(target["model_dir"]),
            target["backend"],
            target["name"],
            Path(target["run_dir"]) if target.get("run_dir") else None,
        )
        config = ServeConfig.model_validate(cfg)
        if not (target.model_dir / "config.json").is_file():
            raise RuntimeError(replica_load_error(self.node, target.model_dir, "no config.json there"))
        try:
            self.loaded = build_engine(target, config)
        except Exception as err:
            raise RuntimeError(
                replica_load_error(self.node, target.model_dir, f"{type(err).__name__}: {err}")
            ) from None
        self.engine = self.loaded.engine
        self.stream_interval = config.replica_stream_interval
        self.engine.start()
        self.replica_id = _replica_id()

    def info(self) -> dict[str, Any]:
        vocab, eos = self.engine.grammar_vocab()
        return {
            "max_context": self.loaded.max_context,
            "kv_bytes_per_token": self.loaded.kv_bytes_per_token,
            "kv_budget": self.loaded.kv_budget,
            "max_queue": self.engine.max_queue,
            "vocab_size": vocab,
            "eos_token_ids": sorted(eos),
        }

    def record_routing_stats(self) -> dict[str, Any]:
        """Live load for the router (called by Ray Serve periodically, never per request), plus this
        replica's metrics page for the ingress's /metrics."""
        engine = self.engine
        live = list(engine.live)
        waiting = sum(1 for r in live if r.first_token_time is None) + len(engine._inbox)
        return {
            "replica": self.replica_id,
            "node": self.node,
            "pid": self.pid,
            "waiting": waiting,
            "running": len(live) - min(waiting, len(live)),
            "kv_usage": engine.kv.usage(live),
            "top_queue": _top_queue(engine.scheduler, live),
            "max_queue": engine.max_queue,
            "metrics": engine.metrics.render().decode(),
        }

    async def generate(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Run one engine request; yields a dict per batch of engine steps (or one `queue_full` dict). No
        header item: each streamed item costs a transfer, and the router already knows the replica."""
        import time

        from fastserve_cli.serve.engine import QueueFull
        from fastserve_cli.serve.request import Request, SamplingParams
        from fastserve_cli.serve.sampling import make_generator

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        params = SamplingParams(**payload["params"])
        req = Request(prompt_ids=list(payload["prompt_ids"]), params=params, arrival_time=time.perf_counter())
        req.generator = make_generator(params.seed)
        if payload.get("grammar") is not None:  # structured outputs / forced tool calls: compiled here (cached)
            req.grammar = self.loaded.grammars.get(payload["grammar"]).new_state()
        req.on_output = lambda out: loop.call_soon_threadsafe(queue.put_nowait, out)
        try:
            self.engine.submit([req])
        except QueueFull as err:
            yield {"queue_full": str(err)}
            return
        try:
            first = True
            while True:
                out = await next_item(queue, self.stream_interval, first)
                first = False
                yield dataclasses.asdict(out)
                if out.finished:
                    return
        finally:
            if not req.finished:  # the ingress cancelled the stream: its client went away
                self.engine.abort([req])

    def __del__(self) -> None:
        """Ray Serve tears the replica down: drain it as the single server does on SIGTERM."""
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(5.0)


async def next_item(queue: asyncio.Queue, interval: int = 1, first: bool = True):
    """The next StepOutput to send: at least `interval` tokens merged (1 for the first item, so time to
    first token never waits), plus whatever is already queued behind them, up to the finished output.
    When the ingress reads slower than the engine steps, one transfer then carries several tokens."""
    outs = [await queue.get()]
    want = 1 if first else interval
    while not outs[-1].finished:
        if sum(len(o.token_ids) for o in outs) < want:
            outs.append(await queue.get())
        elif not queue.empty():
            outs.append(queue.get_nowait())
        else:
            break
    return merge_outputs(outs)


def merge_outputs(outs: list):
    """Consecutive StepOutputs of one request as one (text and tokens concatenated, the last one's end)."""
    from fastserve_cli.serve.engine import StepOutput

    if len(outs) == 1:
        return outs[0]
    last = outs[-1]
    return StepOutput(
        text="".join(o.text for o in outs),
        token_ids=[t for o in outs for t in o.token_ids],
        logprobs=[lp for o in outs for lp in o.logprobs],
        finished=last.finished,
        finish_reason=last.finish_reason,
        error=last.error,
        status=last.status,
    )


def _top_queue(scheduler, live) -> int:
    """Requests in the skip-join MLFQ's top two queues (0 for fcfs, which has no levels)."""
    count = 0
    for req in live:
        level = getattr(req.sched_state, "level", None)
        if level is not None and level <= 1:
            count += 1
    return count


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return f"{socket.gethostname()}-{os.getpid()}"


def _node_address() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:
        return socket.gethostname()
