"""The HTTP layer: FastAPI app with OpenAI-compatible endpoints over the engine.

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics
(+ FastAPI's /openapi.json and /docs). The model loads in a background thread after the socket is open, so
clients get 503 (not a refused connection) while it loads. Each client request becomes `n x prompts` engine
requests; their per-step outputs arrive from the engine thread through `loop.call_soon_threadsafe` into one
asyncio queue. A client that disconnects has its engine requests aborted (their KV is freed).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from fastapi import Depends, FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from fastserve_cli.serve.engine import QueueFull, StepOutput
from fastserve_cli.serve.protocol import (
    ChatCompletionRequest, CompletionRequest, LogprobFormatter, OpenAIError, bad_request, chat_prompt,
    check_supported, completion_prompts, new_id, now_s, resolve_max_tokens, sampling_params, usage)
from fastserve_cli.serve.request import Request
from fastserve_cli.serve.sampling import make_generator

log = logging.getLogger("fastserve.api")


@dataclass
class Loaded:
    """Everything the endpoints need once the model is up."""

    engine: Any
    tokenizer: Any
    max_context: int
    kv_bytes_per_token: int
    kv_budget: int
    logprobs: LogprobFormatter = field(init=False)

    def __post_init__(self) -> None:
        self.logprobs = LogprobFormatter(self.tokenizer)


class ServerState:
    def __init__(self, model_name: str, api_key: str | None, loader: Callable[[], Loaded],
                 shutdown_timeout_s: float = 30.0) -> None:
        self.model_name = model_name
        self.api_key = api_key
        self.loader = loader
        self.shutdown_timeout_s = shutdown_timeout_s
        self.loaded: Loaded | None = None
        self.load_error: BaseException | None = None
        self.on_load_error: Callable[[], None] | None = None
        self.created = now_s()

    def load(self) -> None:
        try:
            self.loaded = self.loader()
            self.loaded.engine.start()
            log.info("model %s ready", self.model_name)
        except BaseException as err:  # reported by serve() after uvicorn stops
            self.load_error = err
            log.error("loading the model failed: %s", err)
            if self.on_load_error is not None:
                self.on_load_error()


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=state.load, name="fastserve-load", daemon=True).start()
        yield
        if state.loaded is not None:
            await asyncio.to_thread(state.loaded.engine.shutdown, min(5.0, state.shutdown_timeout_s))

    app = FastAPI(title="fastserve", description="OpenAI-compatible server with continuous batching.",
                  lifespan=lifespan)
    app.state.fastserve = state

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: HTTPRequest, err: OpenAIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: HTTPRequest, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return JSONResponse(bad_request(f"the request body is not valid JSON: {first.get('msg')}").body(), 400)
        param = ".".join(loc) or None
        return JSONResponse(bad_request(f"{param or 'body'}: {first.get('msg', 'invalid request')}", param).body(), 400)

    def authorized(request: HTTPRequest) -> None:
        if not state.api_key:
            return
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), state.api_key.encode()):
            raise OpenAIError(401, "missing or invalid API key; send 'Authorization: Bearer <key>'",
                              code="invalid_api_key")

    def ready() -> Loaded:
        if state.loaded is None:
            raise OpenAIError(503, "the model is still loading; retry shortly", type_="service_unavailable",
                              code="model_loading")
        return state.loaded

    guard = [Depends(authorized)]

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.loaded is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        cluster = getattr(state.loaded.engine, "health", None)  # a cluster ingress: replicas up (503 if none)
        if cluster is not None:
            body = cluster()
            return JSONResponse(body, status_code=200 if body["replicas_up"] else 503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        if state.loaded is None:
            return Response(b"", media_type=CONTENT_TYPE_LATEST)
        return Response(state.loaded.engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=guard)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "fastserve", "max_model_len": state.loaded and state.loaded.max_context}]}

    @app.post("/v1/completions", dependencies=guard)
    async def completions(body: CompletionRequest, request: HTTPRequest):
        loaded = ready()
        check_common(body)
        prompts = completion_prompts(body, loaded.tokenizer)
        max_tokens = [resolve_max_tokens(body.max_tokens, len(p), loaded.max_context, 16) for p in prompts]
        job = Job(loaded, "completion", body, request)
        for i, (ids, mt) in enumerate(zip(prompts, max_tokens)):
            job.add_prompt(ids, sampling_params(body, mt, body.logprobs), first_index=i * body.n)
        return await job.respond()

    @app.post("/v1/chat/completions", dependencies=guard)
    async def chat_completions(body: ChatCompletionRequest, request: HTTPRequest):
        loaded = ready()
        check_common(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise bad_request("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        ids = chat_prompt(body, loaded.tokenizer)
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = resolve_max_tokens(requested, len(ids), loaded.max_context, None)
        job = Job(loaded, "chat", body, request)
        job.add_prompt(ids, sampling_params(body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None), 0)
        return await job.respond()

    def check_common(body) -> None:
        check_supported(body)
        if body.model != state.model_name:
            raise bad_request(f"model '{body.model}' does not exist; this server serves '{state.model_name}'",
                              param="model")
        if body.stream_options is not None and not body.stream:
            raise bad_request("'stream_options' is only allowed with 'stream': true", param="stream_options")

    return app


def _output_error(out: StepOutput) -> OpenAIError:
    """An engine output's error as the client sees it (a cluster ingress sets 503/429 on its outputs)."""
    if out.status == 429:
        return OpenAIError(429, out.error, type_="rate_limit_error", code="queue_full")
    if out.status == 503:
        return OpenAIError(503, out.error, type_="service_unavailable", code="replica_unavailable")
    return OpenAIError(500, f"generation failed: {out.error}", type_="server_error")


class Job:
    """One client request: its engine requests (choices), their outputs, and the response/stream."""

    def __init__(self, loaded: Loaded, kind: str, body, http: HTTPRequest) -> None:
        self.loaded, self.kind, self.body, self.http = loaded, kind, body, http
        self.id = new_id("cmpl" if kind == "completion" else "chatcmpl")
        self.created = now_s()
        self.reqs: list[Request] = []
        self.index: dict[int, int] = {}  # id(req) -> choice index
        self.prompt_tokens = 0
        self.queue: asyncio.Queue[tuple[int, StepOutput]] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()

    def add_prompt(self, ids: list[int], params, first_index: int) -> None:
        budget_tokens = self.loaded.kv_budget // self.loaded.kv_bytes_per_token
        if len(ids) + params.max_new_tokens > budget_tokens:
            raise bad_request(f"prompt + max_tokens = {len(ids) + params.max_new_tokens} tokens do not fit in the "
                              f"KV-cache budget ({budget_tokens} tokens); lower max_tokens or raise --kv-cache-memory",
                              param="max_tokens")
        self.prompt_tokens += len(ids)
        now = time.perf_counter()
        for k in range(self.body.n):
            seed = None if params.seed is None else params.seed + k
            choice_params = type(params)(**{**params.__dict__, "seed": seed})
            req = Request(prompt_ids=list(ids), params=choice_params, arrival_time=now)
            req.generator = make_generator(seed)
            index = first_index + k
            req.on_output = lambda out, i=index: self.loop.call_soon_threadsafe(self.queue.put_nowait, (i, out))
            self.index[id(req)] = index
            self.reqs.append(req)

    def submit(self) -> None:
        try:
            self.loaded.engine.submit(self.reqs)
        except QueueFull as err:
            raise OpenAIError(429, f"the server is busy: {err}; retry later", type_="rate_limit_error",
                              code="queue_full") from None

    def abort(self) -> None:
        self.loaded.engine.abort([r for r in self.reqs if not r.finished])

    async def respond(self):
        self.submit()
        if self.body.stream:
            return StreamingResponse(self.stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(await self.collect())

    async def _outputs(self) -> AsyncIterator[tuple[int, StepOutput]]:
        remaining = len(self.reqs)
        while remaining:
            index, out = await self.queue.get()
            if out.error is not None:
                raise _output_error(out)
            remaining -= out.finished
            yield index, out

    async def collect(self) -> dict[str, Any]:
        """Non-streaming: gather all choices, aborting if the client goes away meanwhile."""
        watcher = asyncio.create_task(self._watch_disconnect())
        texts: dict[int, list[str]] = {self.index[id(r)]: [] for r in self.reqs}
        entries: dict[int, list] = {i: [] for i in texts}
        reasons: dict[int, str] = {}
        try:
            async for index, out in self._outputs():
                texts[index].append(out.text)
                entries[index].extend(out.logprobs)
                if out.finished:
                    reasons[index] = out.finish_reason
        finally:
            watcher.cancel()
            self.abort()
        choices = [self._choice(i, "".join(texts[i]), entries[i], reasons[i], final=True) for i in sorted(texts)]
        obj = "text_completion" if self.kind == "completion" else "chat.completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.body.model,
                "choices": choices, "usage": usage(self.prompt_tokens, sum(r.num_generated for r in self.reqs))}

    async def _watch_disconnect(self) -> None:
        while True:
            if await self.http.is_disconnected():
                self.abort()
                return
            await asyncio.sleep(0.25)

    async def stream(self) -> AsyncIterator[str]:
        """SSE chunks in OpenAI's shape, then an optional usage chunk, then `data: [DONE]`."""
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        offsets = {self.index[id(r)]: 0 for r in self.reqs}
        try:
            if self.kind == "chat":
                for i in sorted(offsets):
                    yield self._sse(self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}], include_usage))
            async for index, out in self._outputs():
                if not out.text and not out.finished and not out.logprobs:
                    continue
                choice = self._choice(index, out.text, out.logprobs, out.finish_reason, final=False,
                                      offset=offsets[index])
                offsets[index] += len(out.text)
                yield self._sse(self._chunk([choice], include_usage))
            if include_usage:
                yield self._sse(self._chunk([], include_usage, usage(self.prompt_tokens,
                                                                     sum(r.num_generated for r in self.reqs))))
            yield "data: [DONE]\n\n"
        except OpenAIError as err:
            yield self._sse(err.body())
            yield "data: [DONE]\n\n"
        finally:
            self.abort()

    def _choice(self, index: int, text: str, entries: list, reason: str | None, final: bool, offset: int = 0):
        logprobs = None
        if self.kind == "completion":
            if self.body.logprobs is not None:
                logprobs = self.loaded.logprobs.completion(entries, offset)
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
        if self.body.logprobs:
            logprobs = self.loaded.logprobs.chat(entries)
        if final:
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                    "finish_reason": reason}
        delta = {"content": text} if text else {}
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}

    def _chunk(self, choices: list, include_usage: bool, usage_: dict | None = None) -> dict[str, Any]:
        obj = "text_completion" if self.kind == "completion" else "chat.completion.chunk"
        chunk = {"id": self.id, "object": obj, "created": self.created, "model": self.body.model, "choices": choices}
        if include_usage:
            chunk["usage"] = usage_
        return chunk

    @staticmethod
    def _sse(obj: dict[str, Any]) -> str:
        return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"
