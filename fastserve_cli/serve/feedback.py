"""`serve.log_requests`: log each finished chat exchange, and `POST /v1/feedback` to rate or correct one.

Off unless `serve.log_requests: PATH` is set. The log is the JSONL of fastserve_cli.core.feedback_log:
request messages + reply, model, time, usage and the completion id; never the API key or any header.
Each record is one `write` of one line followed by a flush, under a lock, so concurrent requests never
interleave and a crash loses at most the line being written (readers skip a torn last line).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from fastserve_cli.core.errors import UserError
from fastserve_cli.core.feedback_log import EXCHANGE, exchange_record, feedback_record, read_records
from fastserve_cli.serve.protocol import OpenAIError


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(..., min_length=1, description="The `id` of a chat completion this server returned.")
    rating: float = Field(
        ..., allow_inf_nan=False, description="Higher is better, e.g. 1-5 or -1/+1; `data.min_feedback` selects on it."
    )
    corrected_answer: Optional[str] = Field(
        None, description="What the assistant should have said; replaces its reply in training data."
    )


class RequestLog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.ids = (
                {r["id"] for r in read_records(str(self.path)) if r["type"] == EXCHANGE}
                if self.path.exists()
                else set()
            )
            self._handle = open(self.path, "a", encoding="utf-8")
            if self.path.stat().st_size and not _ends_with_newline(self.path):
                self._handle.write("\n")  # a torn last line (killed mid-write) stays alone; readers skip it
        except OSError as err:
            raise UserError(
                f"serve.log_requests {path}: cannot open it for appending ({err.strerror}); pick a writable path"
            ) from None

    def _append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
        with self._lock:
            self._handle.write(line)
            self._handle.flush()

    def log_chat(self, completion_id: str, body, reply: str, usage: dict, finish_reason: str | None) -> None:
        """The request's messages (text only, as rendered for the model) plus the first choice's reply."""
        messages = [{"role": m.role, "content": _text(m.content)} for m in body.messages]
        self._append(exchange_record(completion_id, body.model, messages, reply, usage, finish_reason))
        self.ids.add(completion_id)

    def add_feedback(self, request: FeedbackRequest) -> dict[str, Any]:
        if request.id not in self.ids:
            raise OpenAIError(
                404, f"no chat completion with id '{request.id}' in the request log", param="id", code="not_found"
            )
        record = feedback_record(request.id, request.rating, request.corrected_answer)
        self._append(record)
        return {
            "object": "feedback",
            "id": request.id,
            "rating": request.rating,
            "corrected": request.corrected_answer is not None,
        }

    def close(self) -> None:
        with self._lock:
            self._handle.close()


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-1, 2)
        return handle.read(1) == b"\n"


def _text(content) -> str:
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if part.get("type") == "text")
    return content or ""


def install(app, state, dependencies: list) -> None:
    """Add POST /v1/feedback to the app (answers 404 in OpenAI's error shape while logging is off)."""

    @app.post("/v1/feedback", dependencies=dependencies)
    async def feedback(body: FeedbackRequest) -> dict[str, Any]:
        log: RequestLog | None = getattr(state, "request_log", None)
        if log is None:
            raise OpenAIError(
                404,
                "feedback needs the request log; start the server with serve.log_requests set",
                code="feedback_disabled",
            )
        return log.add_feedback(body)
