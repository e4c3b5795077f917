"""Streaming completions over HTTP, and a seeded trace replayed open-loop: the one client every benchmark uses.

Why one: the serving benchmark, the scheduling benchmark and the load test all time the same thing (a streamed
/v1/completions request: when it was sent, its first token, each token, its end), so they must time it the
same way for their numbers to compare. Works against any OpenAI-compatible server (ours, `transformers serve`).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass
class Job:
    """One request of a trace: sent `arrival` seconds after the replay starts (before the rate scaling)."""

    arrival: float
    prompt: str
    max_tokens: int
    prompt_len: int = 0  # tokens, for reporting the workload


@dataclass
class Stream:
    """What one streamed completion did, in seconds since the replay's start."""

    sent: float
    first_token: float | None = None  # the first chunk with text
    token_times: list[float] = field(default_factory=list)  # every chunk with text
    end: float | None = None
    tokens: int = 0  # the usage's completion_tokens, else the text chunks counted
    done: bool = False  # the stream ended with `data: [DONE]`
    error: str | None = None  # HTTP status, an error event or a transport failure

    def record(self) -> tuple[float, float, float, int]:
        """(arrival, first token, finish, output tokens): the simulator's summary input."""
        end = self.end if self.end is not None else self.sent
        return self.sent, self.first_token if self.first_token is not None else end, end, self.tokens


def checked(stream: Stream, max_tokens: int) -> tuple[float, float, float, int]:
    """The stream's (arrival, first token, finish, output tokens); a failed or short stream raises, so a
    benchmark that fixes output lengths (`max_tokens` + `ignore_eos`) never times a request that did less work."""
    if stream.error is not None:
        raise RuntimeError(stream.error)
    if stream.tokens != max_tokens:
        raise RuntimeError(f"asked for {max_tokens} tokens with ignore_eos, got {stream.tokens}")
    return stream.record()


def completion_body(model: str, prompt: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    """A greedy streamed completion that reports usage at the end (how the token count is known)."""
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }


async def stream_completion(client, url: str, body: dict[str, Any], t0: float) -> Stream:
    """POST `body` to `url`/v1/completions and read the event stream; failures are recorded, not raised."""
    import httpx

    stream = Stream(sent=time.perf_counter() - t0)
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                stream.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return stream
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    stream.done = True
                    continue
                read_chunk(stream, json.loads(line[6:]), time.perf_counter() - t0)
        stream.end = time.perf_counter() - t0
        stream.tokens = stream.tokens or len(stream.token_times)
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        stream.error = repr(err)[:200]
    return stream


def read_chunk(stream: Stream, chunk: dict[str, Any], now: float) -> None:
    if "error" in chunk:
        stream.error = str(chunk["error"])[:200]
    if chunk.get("usage"):
        stream.tokens = chunk["usage"]["completion_tokens"]
    if chunk.get("choices") and chunk["choices"][0].get("text"):
        stream.first_token = stream.first_token if stream.first_token is not None else now
        stream.token_times.append(now)


def http_client(timeout: float | None = None, max_connections: int | None = None):
    """An async client for many concurrent streams: no pool limit by default, keep-alive for reuse."""
    import httpx

    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=64)
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits)


async def replay(url: str, model: str, jobs: Sequence[Job], rate: float = 1.0, **extra: Any) -> list[Stream]:
    """Send each job at `arrival / rate` seconds (open loop: late answers never delay later sends).

    A unit-rate trace replayed at `rate` keeps the same requests at every load; only their spacing changes.
    `extra` goes into every request body (e.g. ignore_eos=True to fix each output length).
    """
    async with http_client() as client:
        t0 = time.perf_counter()

        async def at(job: Job) -> Stream:
            await asyncio.sleep(max(0.0, job.arrival / rate - (time.perf_counter() - t0)))
            return await stream_completion(client, url, completion_body(model, job.prompt, job.max_tokens, **extra), t0)

        return list(await asyncio.gather(*(at(job) for job in jobs)))


def replay_sync(url: str, model: str, jobs: Sequence[Job], rate: float = 1.0, **extra: Any) -> list[Stream]:
    """`replay` from synchronous code (its own event loop)."""
    return asyncio.run(replay(url, model, jobs, rate, **extra))
