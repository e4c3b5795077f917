"""POST /v1/responses: OpenAI's Responses API (text in, text out) over the chat path.

A request becomes a chat conversation (`instructions` first as a system message, then the input items),
rendered by the model's chat template and run as one engine request through the same `Job` as
/v1/chat/completions, so scheduling, KV management, cancellation on disconnect and 429s are shared.
The answer is a Response object with one assistant message item holding one `output_text` part; streaming
sends the event sequence the official client consumes:
response.created, response.in_progress, response.output_item.added, response.content_part.added,
response.output_text.delta..., response.output_text.done, response.content_part.done,
response.output_item.done, response.completed (its response has status "incomplete" and
`incomplete_details.reason: "max_output_tokens"` when the limit cut the answer; OpenAI would end with
`response.incomplete`, which the official client's `responses.stream()` helper cannot finish on).
Nothing is stored: `store: true`, `previous_response_id`, tools, reasoning and non-text formats are refused
with a 400 naming the field.
"""

from __future__ import annotations

import itertools
import json
from typing import Any, AsyncIterator, Optional, Union

from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from fastserve_cli.serve.protocol import (
    ChatCompletionRequest,
    OpenAIError,
    bad_request,
    chat_prompt,
    now_s,
    resolve_max_tokens,
    sampling_params,
)

# Fields of OpenAI's Responses API accepted only at their "off" value; anything else is a 400 naming it.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "tools": ([],),
    "tool_choice": ("none", "auto"),
    "store": (False,),
    "previous_response_id": (),
    "include": ([],),
    "reasoning": (),
    "text": ({"format": {"type": "text"}},),
    "truncation": ("disabled",),
    "background": (False,),
    "service_tier": ("auto", "default"),
    "conversation": (),
    "prompt": (),
    "max_tool_calls": (),
    "top_logprobs": (0,),
    "prompt_cache_key": (),
    "safety_identifier": (),
    "stream_options": (),
    "input_transformations": (),
}
ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
TEXT_PARTS = ("input_text", "output_text")


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # JSON types as the spec says: no "1" -> 1, no false -> 0

    model: str
    input: Union[str, list[dict[str, Any]]] = Field(..., description="A string, or a list of message items.")
    instructions: Optional[str] = Field(None, description="Inserted first, as a system message.")
    max_output_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    stream: bool = False
    metadata: Optional[dict[str, str]] = None
    parallel_tool_calls: Optional[bool] = None
    user: Optional[str] = None


def check_fields(body: ResponsesRequest) -> None:
    for name, value in (body.model_extra or {}).items():
        if value is not None and value not in NEUTRAL.get(name, ()):
            raise bad_request(
                f"'{name}' is not supported by this server's Responses API (text input and output "
                "only); remove it from the request",
                param=name,
            )


def to_messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    """`instructions` + `input` -> chat messages with text content; other item kinds are a 400 naming them."""
    messages = [{"role": "system", "content": body.instructions}] if body.instructions else []
    if isinstance(body.input, str):
        if not body.input:
            raise bad_request("'input' is empty", param="input")
        return messages + [{"role": "user", "content": body.input}]
    if not body.input:
        raise bad_request("'input' must hold at least one message", param="input")
    for i, item in enumerate(body.input):
        kind, role = item.get("type", "message"), item.get("role")
        if kind != "message" or not isinstance(role, str) or role not in ROLES:
            what = f"item type {kind!r}" if kind != "message" else f"role {role!r}"
            raise bad_request(
                f"input[{i}]: {what} is not supported; send messages with role user, assistant, "
                "system or developer and text content",
                param=f"input[{i}]",
            )
        messages.append({"role": ROLES[item["role"]], "content": _text(item.get("content"), i)})
    return messages


def _text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"input[{i}].content must be a string or a list of text parts", param=f"input[{i}].content")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in TEXT_PARTS or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise bad_request(
                f"input[{i}].content[{j}]: only text parts (input_text) are supported, got {kind!r}",
                param=f"input[{i}].content[{j}]",
            )
        texts.append(part["text"])
    return "".join(texts)


class ResponseBuilder:
    """The Response object and its message item, in OpenAI's shape, at any stage of the answer."""

    def __init__(self, body: ResponsesRequest, job_id: str, created: int) -> None:
        self.body = body
        self.id = "resp_" + job_id.split("-", 1)[-1]
        self.item_id = "msg_" + job_id.split("-", 1)[-1]
        self.created = created

    def part(self, text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def item(self, text: str | None, status: str) -> dict[str, Any]:
        content = [] if text is None else [self.part(text)]
        return {"id": self.item_id, "type": "message", "role": "assistant", "status": status, "content": content}

    def response(self, status: str, output: list, usage: dict[str, int] | None = None) -> dict[str, Any]:
        b = self.body
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": b.instructions,
            "max_output_tokens": b.max_output_tokens,
            "model": b.model,
            "output": output,
            "parallel_tool_calls": bool(b.parallel_tool_calls),
            "previous_response_id": None,
            "reasoning": None,
            "store": False,
            "temperature": 1.0 if b.temperature is None else b.temperature,
            "text": {"format": {"type": "text"}},
            "tool_choice": "none",
            "tools": [],
            "top_p": 1.0 if b.top_p is None else b.top_p,
            "truncation": "disabled",
            "metadata": b.metadata or {},
            "user": b.user,
            "usage": None if usage is None else response_usage(**usage),
            "completed_at": now_s() if status in ("completed", "incomplete") else None,
        }


def response_usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


async def create_response(body: ResponsesRequest, loaded, http, job_cls):
    """Validate, run through the chat path's Job, and answer a Response (JSON) or its event stream."""
    check_fields(body)
    chat = ChatCompletionRequest(
        model=body.model, messages=to_messages(body), temperature=body.temperature, top_p=body.top_p, stream=body.stream
    )
    ids = chat_prompt(chat, loaded.tokenizer)
    max_tokens = resolve_max_tokens(body.max_output_tokens, len(ids), loaded.max_context, None)
    job = job_cls(chat)
    job.add_prompt(ids, sampling_params(chat, max_tokens, None), 0)
    job.submit()
    build = ResponseBuilder(body, job.id, job.created)
    if body.stream:
        return StreamingResponse(
            stream_events(job, build),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    result = await job.collect()
    choice = result["choices"][0]
    status = "incomplete" if choice["finish_reason"] == "length" else "completed"
    usage = {"input_tokens": result["usage"]["prompt_tokens"], "output_tokens": result["usage"]["completion_tokens"]}
    item = build.item(choice["message"]["content"], status)
    return JSONResponse(build.response(status, [item], usage))


async def stream_events(job, build: ResponseBuilder) -> AsyncIterator[str]:
    counter = itertools.count()

    def event(kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": next(counter), **fields}
        return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"

    where = {"item_id": build.item_id, "output_index": 0}
    texts: list[str] = []
    reason = None
    try:
        yield event("response.created", response=build.response("in_progress", []))
        yield event("response.in_progress", response=build.response("in_progress", []))
        yield event("response.output_item.added", output_index=0, item=build.item(None, "in_progress"))
        yield event("response.content_part.added", **where, content_index=0, part=build.part(""))
        async for _, out in job._outputs():
            if out.text:
                texts.append(out.text)
                yield event("response.output_text.delta", **where, content_index=0, delta=out.text, logprobs=[])
            if out.finished:
                reason = out.finish_reason
        text = "".join(texts)
        status = "incomplete" if reason == "length" else "completed"
        yield event("response.output_text.done", **where, content_index=0, text=text, logprobs=[])
        yield event("response.content_part.done", **where, content_index=0, part=build.part(text))
        item = build.item(text, status)
        yield event("response.output_item.done", output_index=0, item=item)
        usage = {"input_tokens": job.prompt_tokens, "output_tokens": sum(r.num_generated for r in job.reqs)}
        # always `response.completed` (status "incomplete" inside when cut): the official client's
        # `responses.stream(...).get_final_response()` knows no other terminal event
        yield event("response.completed", response=build.response(status, [item], usage))
    except OpenAIError as err:
        yield event("error", code=err.code or err.type, message=err.message, param=err.param)
    finally:
        job.abort()
