"""Every failure the HTTP layer can answer, in OpenAI's error shape and with a 4xx for anything the client sent.

Why a module of its own: the endpoints (api.py, embeddings.py, responses.py) raise `OpenAIError`; this module
turns those, FastAPI's validation errors, unknown routes and anything unexpected into
`{"error": {"message", "type", "param", "code"}}`. Bodies are JSON-encoded with `ensure_ascii`, so a message
that quotes user input (which may hold a lone UTF-16 surrogate) can always be written: a plain JSONResponse
would fail to encode it as UTF-8 and turn a client mistake into a 500.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fastserve_cli.serve.protocol import OpenAIError, bad_request

log = logging.getLogger("fastserve.api")

_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class SafeJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: encodes any Python str, lone surrogates included."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(err: OpenAIError) -> SafeJSONResponse:
    return SafeJSONResponse(err.body(), status_code=err.status)


def install_error_handlers(app: FastAPI) -> None:
    """OpenAI-shaped bodies for our errors, validation errors, unknown routes/methods and internal faults."""

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: HTTPRequest, err: OpenAIError) -> SafeJSONResponse:
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: HTTPRequest, err: RequestValidationError) -> SafeJSONResponse:
        return error_response(validation_error(err))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: HTTPRequest, err: StarletteHTTPException) -> SafeJSONResponse:
        type_ = _STATUS_TYPES.get(err.status_code, "invalid_request_error" if err.status_code < 500 else "server_error")
        response = error_response(OpenAIError(err.status_code, str(err.detail), type_=type_))
        for name, value in (err.headers or {}).items():
            response.headers[name] = value
        return response

    @app.exception_handler(Exception)
    async def _internal_error(_: HTTPRequest, err: Exception) -> SafeJSONResponse:
        log.exception("internal error while answering a request")
        return error_response(OpenAIError(500, f"internal server error: {type(err).__name__}", type_="server_error"))


def validation_error(err: RequestValidationError) -> OpenAIError:
    """The first pydantic error as a 400 naming the field (dotted path without the leading 'body')."""
    first = err.errors()[0] if err.errors() else {}
    if first.get("type") == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "missing" and not loc:
        return bad_request("the request body is missing; send a JSON object")
    return bad_request(f"{param or 'body'}: {first.get('msg', 'invalid request')}", param)


async def reject_invalid_text(request: HTTPRequest) -> None:
    """Dependency: a JSON body whose strings hold a lone UTF-16 surrogate (e.g. the escape `\\ud800` without
    its pair) is a 400 naming where. Such a string is valid JSON but not Unicode text: the tokenizer (Rust)
    and the UTF-8 encoder refuse it, so it must stop here rather than deep inside the request."""
    if request.method != "POST":
        return
    try:
        body = await request.json()  # cached: FastAPI parsed it already
    except Exception:  # noqa: BLE001 - not JSON: the body validation reports it
        return
    where = _find_surrogate(body, "")
    if where is not None:
        raise bad_request(
            f"{where or 'body'}: the text holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
            "escape), which is not valid Unicode; send well-formed text",
            param=where or None,
        )


def _find_surrogate(value: Any, path: str) -> str | None:
    """Path of the first string (or key) holding a lone surrogate, else None (iterative: no recursion limit)."""
    stack = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if _has_surrogate(item):
                return where
        elif isinstance(item, dict):
            for key, sub in item.items():
                sub_path = f"{where}.{key}" if where else str(key)
                if _has_surrogate(str(key)):
                    return where or "body"
                stack.append((sub, sub_path))
        elif isinstance(item, list):
            stack.extend((sub, f"{where}[{i}]") for i, sub in enumerate(item))
    return None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True
