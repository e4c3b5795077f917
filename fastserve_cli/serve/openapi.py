"""The served `/openapi.json`, made to tell the truth about what each route answers.

FastAPI's generated spec documents a 422 (we answer 400), no error statuses, JSON for streaming routes
and for /metrics, and no authentication. This rewrites it once, from `ROUTE_STATUSES`: every status a route
can return with OpenAI's error body schema, `text/event-stream` beside JSON where `stream: true` is allowed,
`text/plain` for /metrics, the /health body, and the bearer scheme when the server has an API key.
A schemathesis run over the live spec checks that responses match it (tests/test_serve_openapi.py).
"""

from __future__ import annotations

from typing import Any, Callable

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "title": "ErrorResponse",
    "description": "OpenAI's error body.",
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "code": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            },
        }
    },
}
HEALTH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["status"],
    "title": "Health",
    "properties": {"status": {"type": "string", "enum": ["ok", "loading"]}},
}
STATUS_TEXT = {
    400: "Invalid request (OpenAI error body names the field in `param`)",
    401: "Missing or invalid API key (only when the server has one)",
    404: "Unknown model (`code: model_not_found`)",
    429: "The waiting queue is full (--max-queue); retry later",
    500: "Generation failed inside the engine",
    503: "The model is still loading; retry shortly",
}
GENERATE = (400, 401, 404, 429, 500, 503)
# (method, path) -> error statuses it can answer, besides 200; 401 is dropped when there is no API key.
ROUTE_STATUSES: dict[tuple[str, str], tuple[int, ...]] = {
    ("post", "/v1/completions"): GENERATE,
    ("post", "/v1/chat/completions"): GENERATE,
    ("post", "/v1/responses"): GENERATE,
    ("post", "/v1/embeddings"): (400, 401, 404, 503),
    ("post", "/v1/feedback"): (400, 401, 404),
    ("get", "/v1/models"): (401,),
}
# OpenAPI 3.1: the `schema` of an event stream describes one event.
SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "required": ["data"],
    "description": "One server-sent event (when `stream` is true): `data` is "
    "a JSON chunk (or `[DONE]` for completions and chat); /v1/responses events also carry `event`, the event type.",
    "properties": {
        "event": {"type": "string"},
        "data": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}
STREAMING = {"/v1/completions", "/v1/chat/completions", "/v1/responses"}
TEXT_PLAIN = {"/metrics"}


def install_openapi(
    app: FastAPI, has_api_key: bool, model_name: str, facts: Callable[[], dict[str, int] | None]
) -> None:
    """Replace `app.openapi` with the corrected spec. `facts()` gives the loaded model's {"vocab", "context"}
    (None while it loads); the spec is cached once they are known and written into the limits."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        known = facts()
        spec = correct(spec, has_api_key, model_name)
        if known is None:
            return spec
        app.openapi_schema = with_limits(spec, known["vocab"], known["context"])
        return app.openapi_schema

    app.openapi = openapi


def correct(spec: dict[str, Any], has_api_key: bool, model_name: str) -> dict[str, Any]:
    components = spec.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for schema in schemas.values():  # request bodies: the one model this server serves (others are a 404)
        model = schema.get("properties", {}).get("model")
        if model is not None and model.get("type") == "string" and "model" in schema.get("required", ()):
            model["enum"] = [model_name]
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas["ErrorResponse"] = ERROR_SCHEMA
    schemas["Health"] = HEALTH_SCHEMA
    if has_api_key:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    error_ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, methods in spec.get("paths", {}).items():
        for method, op in methods.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            for status in ROUTE_STATUSES.get((method, path), ()):
                if status == 401 and not has_api_key:
                    continue
                responses[str(status)] = {"description": STATUS_TEXT[status], "content": error_ref}
            if has_api_key and (method, path) in ROUTE_STATUSES:
                op["security"] = [{"bearer": []}]
            ok = responses.setdefault("200", {"description": "Successful Response"})
            if path in STREAMING:
                ok["content"] = {
                    **ok.get("content", {"application/json": {"schema": {}}}),
                    "text/event-stream": {"schema": SSE_EVENT},
                }
            if path in TEXT_PLAIN:
                ok["content"] = {"text/plain": {"schema": {"type": "string"}}}
            if path == "/health":
                ok["content"] = {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}}
                health = {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}}
                responses["503"] = {"description": "The model is still loading", "content": health}
    return spec


def with_limits(spec: dict[str, Any], vocab: int, context: int) -> dict[str, Any]:
    """Write what the validation enforces into the request schemas: non-empty prompts, token ids inside the
    vocabulary, output-token limits within the context."""
    token = {"type": "integer", "minimum": 0, "maximum": vocab - 1}
    text = {"type": "string", "minLength": 1}
    prompt = {
        "anyOf": [
            text,
            {"type": "array", "minItems": 1, "items": text},
            {"type": "array", "minItems": 1, "items": token},
            {"type": "array", "minItems": 1, "items": {"type": "array", "minItems": 1, "items": token}},
        ]
    }
    part = {
        "type": "object",
        "required": ["type", "text"],
        "properties": {"type": {"enum": ["input_text", "output_text"]}, "text": {"type": "string"}},
    }
    item = {
        "type": "object",
        "required": ["role", "content"],
        "properties": {
            "type": {"const": "message"},
            "role": {"enum": ["user", "assistant", "system", "developer"]},
            "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": part}]},
        },
    }
    items = {"anyOf": [text, {"type": "array", "minItems": 1, "items": item}]}
    limit = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": context}, {"type": "null"}]}
    patches = {
        "CompletionRequest": {"prompt": prompt, "max_tokens": limit},
        "ChatCompletionRequest": {"max_tokens": limit, "max_completion_tokens": limit},
        "EmbeddingRequest": {"input": prompt},
        "ResponsesRequest": {"max_output_tokens": limit, "input": items},
    }
    schemas = spec.get("components", {}).get("schemas", {})
    for name, fields in patches.items():
        props = schemas.get(name, {}).get("properties", {})
        for field, schema in fields.items():
            if field in props:
                keep = {k: v for k, v in props[field].items() if k in ("title", "description", "default")}
                props[field] = {**schema, **keep}
    return spec
