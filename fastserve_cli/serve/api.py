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
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

from fastapi import Depends, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse

from fastserve_cli.serve.embeddings import EmbeddingRequest, create_embeddings
from fastserve_cli.serve.engine import QueueFull, StepOutput
from fastserve_cli.serve.errors import install_error_handlers, reject_invalid_text
from fastserve_cli.serve.feedback import install as install_feedback
from fastserve_cli.serve.handling import (
    Loaded,
    Plan,
    add_prompt,
    check_model,
    compile_plan,
    engine_requests,
    make_choice,
    plan_chat,
    plan_completion,
    response_body,
)
from fastserve_cli.serve.openapi import install_openapi
from fastserve_cli.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    bad_request,
    check_supported,
    completion_prompts,
    new_id,
    now_s,
    usage,
)
from fastserve_cli.serve.request import Request
from fastserve_cli.serve.responses import ResponsesRequest, create_response
from fastserve_cli.serve.tools import ToolCallStreamer

log = logging.getLogger("fastserve.api")


class ServerState:
    def __init__(
        self, model_name: str, api_key: str | None, loader: Callable[[], Loaded], shutdown_timeout_s: float = 30.0
    ) -> None:
        self.model_name = model_name
        self.api_key = api_key
        self.loader = loader
        self.shutdown_timeout_s = shutdown_timeout_s
        self.loaded: Loaded | None = None
        self.load_error: BaseException | None = None
        self.on_load_error: Callable[[], None] | None = None
        self.request_log = None  # serve/feedback.py RequestLog when serve.log_requests is set
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

    app = FastAPI(
        title="fastserve", description="OpenAI-compatible server with continuous batching.", lifespan=lifespan
    )
    app.state.fastserve = state

    install_error_handlers(app)
    install_openapi(
        app,
        bool(state.api_key),
        state.model_name,
        lambda: state.loaded and {"vocab": len(state.loaded.tokenizer), "context": state.loaded.max_context},
    )

    def authorized(request: HTTPRequest) -> None:
        if not state.api_key:
            return
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), state.api_key.encode()):
            raise OpenAIError(
                401, "missing or invalid API key; send 'Authorization: Bearer <key>'", code="invalid_api_key"
            )

    def ready() -> Loaded:
        if state.loaded is None:
            raise OpenAIError(
                503, "the model is still loading; retry shortly", type_="service_unavailable", code="model_loading"
            )
        return state.loaded

    guard = [Depends(authorized), Depends(reject_invalid_text)]
    install_feedback(app, state, guard)

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
        return {
            "object": "list",
            "data": [
                {
                    "id": state.model_name,
                    "object": "model",
                    "created": state.created,
                    "owned_by": "fastserve",
                    "max_model_len": state.loaded and state.loaded.max_context,
                }
            ],
        }

    @app.post("/v1/completions", dependencies=guard)
    async def completions(body: CompletionRequest, request: HTTPRequest):
        loaded = ready()
        if body.echo:  # prompt log-probabilities (lm-eval's log-likelihood tasks): scoring.py
            from fastserve_cli.serve.scoring import echo_completion

            local_only(loaded, "echo")
            check_supported(body)
            check_model(body.model, state.model_name)
            prompts = completion_prompts(body, loaded.tokenizer)
            return await echo_completion(
                loaded, body, prompts, lambda: Job(loaded, Plan("completion", body, []), request)
            )
        return await Job(loaded, await planned(plan_completion, body, loaded), request).respond()

    @app.post("/v1/chat/completions", dependencies=guard)
    async def chat_completions(body: ChatCompletionRequest, request: HTTPRequest):
        loaded = ready()
        plan = await planned(plan_chat, body, loaded)
        return await Job(loaded, plan, request, state.request_log).respond()

    @app.post("/v1/embeddings", dependencies=guard)
    async def embeddings(body: EmbeddingRequest):
        loaded = ready()
        check_model(body.model, state.model_name)
        local_only(loaded, "/v1/embeddings")
        return await create_embeddings(body, loaded, state.model_name)

    @app.post("/v1/responses", dependencies=guard)
    async def responses(body: ResponsesRequest, request: HTTPRequest):
        loaded = ready()
        check_model(body.model, state.model_name)
        return await create_response(body, loaded, request, lambda chat: Job(loaded, Plan("chat", chat, []), request))

    def local_only(loaded: Loaded, what: str) -> None:
        """Features that run on the model directly (not through engine requests) need this process's engine."""
        if not hasattr(loaded.engine, "backend"):
            raise bad_request(
                f"{what} is not available with --replicas yet; serve a single process for it",
                param="echo" if what == "echo" else None,
            )

    async def planned(planner, body, loaded: Loaded) -> Plan:
        """Validate and plan on the event loop; compile a grammar off it (a cold schema takes a while)."""
        plan = planner(body, loaded, state.model_name)
        if plan.spec is not None:
            await asyncio.to_thread(compile_plan, plan, loaded)
        return plan

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

    def __init__(self, loaded: Loaded, plan: Plan, http: HTTPRequest, request_log=None) -> None:
        self.loaded, self.plan, self.kind, self.body, self.http = loaded, plan, plan.kind, plan.body, http
        self.request_log = request_log  # a RequestLog: finished chat exchanges are appended to it
        self.id = new_id("cmpl" if self.kind == "completion" else "chatcmpl")
        self.created = now_s()
        self.queue: asyncio.Queue[tuple[int, StepOutput]] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.reqs: list[Request] = []
        self.index: dict[int, int] = {}  # id(req) -> choice index
        self._add_requests(plan.prompts)

    @property
    def prompt_tokens(self) -> int:
        return self.plan.prompt_tokens

    def add_prompt(self, ids: list[int], params, first_index: int) -> None:
        """One more prompt for paths that build their prompts themselves (Responses API, echo)."""
        add_prompt(self.plan, self.loaded, ids, params, first_index)
        self._add_requests(self.plan.prompts[-1:])

    def _add_requests(self, prompts) -> None:
        def callback(index: int):
            return lambda out: self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, out))

        for index, req in engine_requests(self.plan, prompts, callback):
            self.index[id(req)] = index
            self.reqs.append(req)

    def submit(self) -> None:
        try:
            self.loaded.engine.submit(self.reqs)
        except QueueFull as err:
            raise OpenAIError(
                429, f"the server is busy: {err}; retry later", type_="rate_limit_error", code="queue_full"
            ) from None

    def abort(self) -> None:
        self.loaded.engine.abort([r for r in self.reqs if not r.finished])

    async def respond(self):
        self.submit()
        if self.body.stream:
            return StreamingResponse(
                self.stream(),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
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
        response = response_body(self.plan, self.id, self.created, choices, sum(r.num_generated for r in self.reqs))
        if self.request_log is not None:
            self.request_log.log_chat(
                self.id, self.body, choices[0]["message"]["content"], response["usage"], reasons[0]
            )
        return response

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
        streamers = {i: ToolCallStreamer() for i in offsets} if self.plan.parse_tools else {}
        first_text: list[str] = []  # choice 0, for the request log
        try:
            if self.kind == "chat":
                for i in sorted(offsets):
                    yield self._sse(
                        self._chunk(
                            [
                                {
                                    "index": i,
                                    "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            ],
                            include_usage,
                        )
                    )
            async for index, out in self._outputs():
                if not out.text and not out.finished and not out.logprobs:
                    continue
                if index == 0 and self.request_log is not None:
                    self._log_streamed(first_text, out)
                if index in streamers:
                    for choice in self._tool_choices(index, out, streamers[index]):
                        yield self._sse(self._chunk([choice], include_usage))
                    continue
                choice = self._choice(
                    index, out.text, out.logprobs, out.finish_reason, final=False, offset=offsets[index]
                )
                offsets[index] += len(out.text)
                yield self._sse(self._chunk([choice], include_usage))
            if include_usage:
                yield self._sse(
                    self._chunk([], include_usage, usage(self.prompt_tokens, sum(r.num_generated for r in self.reqs)))
                )
            yield "data: [DONE]\n\n"
        except OpenAIError as err:
            yield self._sse(err.body())
            yield "data: [DONE]\n\n"
        finally:
            self.abort()

    def _choice(self, index: int, text: str, entries: list, reason: str | None, final: bool, offset: int = 0):
        return make_choice(self.plan, self.loaded, index, text, entries, reason, final, offset)

    def _log_streamed(self, first_text: list[str], out: StepOutput) -> None:
        first_text.append(out.text)
        if out.finished:
            self.request_log.log_chat(
                self.id,
                self.body,
                "".join(first_text),
                usage(self.prompt_tokens, sum(r.num_generated for r in self.reqs)),
                out.finish_reason,
            )

    def _tool_choices(self, index: int, out: StepOutput, streamer: ToolCallStreamer) -> list[dict[str, Any]]:
        """Streamed chat choices when tools are offered: content and tool-call deltas, then the finish."""
        logprobs = self.loaded.logprobs.chat(out.logprobs) if self.body.logprobs and out.logprobs else None
        choices = [
            {"index": index, "delta": d, "logprobs": None, "finish_reason": None}
            for d in streamer.feed(out.text, final=out.finished)
        ]
        if out.finished:
            reason = "tool_calls" if out.finish_reason == "stop" and streamer.num_calls else out.finish_reason
            choices.append({"index": index, "delta": {}, "logprobs": None, "finish_reason": reason})
        if logprobs is not None:
            if not choices:
                choices.append({"index": index, "delta": {}, "logprobs": None, "finish_reason": None})
            choices[0]["logprobs"] = logprobs
        return choices

    def _chunk(self, choices: list, include_usage: bool, usage_: dict | None = None) -> dict[str, Any]:
        obj = "text_completion" if self.kind == "completion" else "chat.completion.chunk"
        chunk = {"id": self.id, "object": obj, "created": self.created, "model": self.body.model, "choices": choices}
        if include_usage:
            chunk["usage"] = usage_
        return chunk

    @staticmethod
    def _sse(obj: dict[str, Any]) -> str:
        return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"
