"""The OpenAI Batch API file formats: input lines in, result records out, and the resumable output file.

Input line:  {"custom_id": str, "method": "POST", "url": "/v1/chat/completions", "body": {...}}
Output line: {"id": "batch_req_...", "custom_id": str, "response": {"status_code", "request_id", "body"},
              "error": null | {"code", "message"}}

Resumability rests on two rules: a record is written whole (one `write` of one line, then flush + fsync)
and only after its request finished, and a restart first cuts a torn last line off the output, then skips
every input line whose key (its custom_id) already has a record. So a run killed at any instant,
restarted with the same output path, ends with each line answered exactly once.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from fastserve_cli.core.errors import UserError

CHAT_URL, COMPLETIONS_URL, EMBEDDINGS_URL = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
URLS = (CHAT_URL, COMPLETIONS_URL, EMBEDDINGS_URL)


@dataclass
class Line:
    """One input line: parsed when it is a well-formed request, else `problem` says what is wrong."""

    number: int  # 1-based
    custom_id: str | None
    url: str | None = None
    body: dict | None = None
    problem: str | None = None

    @property
    def key(self) -> str:
        """Identity in the output: the custom_id, or the line number when the line has none."""
        return self.custom_id if self.custom_id is not None else f"#line-{self.number}"


def parse_line(number: int, raw: str) -> Line:
    """Parse one line; never raises (a bad line becomes a Line with a `problem`)."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as err:
        return Line(number, None, problem=f"line {number} is not valid JSON ({err.msg} at column {err.colno})")
    if not isinstance(obj, dict):
        return Line(number, None, problem=f"line {number} is not a JSON object")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return Line(number, None, problem=f"line {number}: 'custom_id' must be a non-empty string")
    line = Line(number, custom_id, url=obj.get("url"), body=obj.get("body"))
    method = obj.get("method", "POST")
    if method != "POST":
        line.problem = f"line {number}: 'method' must be POST, got {method!r}"
    elif line.url not in URLS:
        line.problem = f"line {number}: unknown 'url' {line.url!r}; use one of {', '.join(URLS)}"
    elif not isinstance(line.body, dict):
        line.problem = f"line {number}: 'body' must be a JSON object"
    return line


def read_lines(path: Path) -> Iterator[Line]:
    """Non-blank lines of the input file, parsed one at a time (the file is never held in memory)."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, raw in enumerate(handle, 1):
            if raw.strip():
                yield parse_line(number, raw)


def scan_input(path: Path) -> int:
    """Count the requests and reject repeated custom_ids before any work starts (they would be ambiguous)."""
    if not path.is_file():
        raise UserError(f"{path}: no such batch input file")
    first_seen: dict[str, int] = {}
    count = 0
    for line in read_lines(path):
        count += 1
        if line.custom_id is None:
            continue
        if line.custom_id in first_seen:
            raise UserError(
                f"{path}: line {line.number} repeats custom_id {line.custom_id!r} of line "
                f"{first_seen[line.custom_id]}; custom_ids must be unique"
            )
        first_seen[line.custom_id] = line.number
    if count == 0:
        raise UserError(f"{path}: no requests (the file is empty)")
    return count


def success(line: Line, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": line.custom_id,
        "response": {
            "status_code": status,
            "request_id": body.get("id") or f"req_{uuid.uuid4().hex[:24]}",
            "body": body,
        },
        "error": None,
    }


def failure(line: Line, status: int, error_body: dict[str, Any]) -> dict[str, Any]:
    """A request the endpoint rejected: the same status and OpenAI error body the server would answer."""
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": line.custom_id,
        "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex[:24]}", "body": error_body},
        "error": None,
    }


def line_error(line: Line, code: str, message: str) -> dict[str, Any]:
    """A line that never became a request (not JSON, unknown url...): no response, an error naming the line."""
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": line.custom_id,
        "response": None,
        "error": {"code": code, "message": message, "line": line.number},
    }


def record_key(record: dict[str, Any]) -> str | None:
    if record.get("custom_id") is not None:
        return str(record["custom_id"])
    line = (record.get("error") or {}).get("line")
    return f"#line-{line}" if line is not None else None


class ResultWriter:
    """Append-only output: `done` holds the keys already answered; every record is fsynced before the next."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: set[str] = set()
        self.truncated_bytes = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            self._recover()
        self.handle = open(path, "ab")

    def _recover(self) -> None:
        """Read the keys already answered; cut a torn (unterminated or unparsable) tail off the file."""
        good_end, torn_line = 0, 0
        with open(self.path, "rb") as handle:
            for number, raw in enumerate(handle, 1):
                if torn_line:  # a bad line with more after it: not a torn tail, so not a file we wrote
                    raise UserError(
                        f"{self.path}: line {torn_line} is not a batch result record; pass a new "
                        "output path (or the output of an earlier run of this batch to resume it)"
                    )
                try:
                    key = record_key(json.loads(raw)) if raw.endswith(b"\n") else None
                except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                    key = None
                if key is None:
                    torn_line = number
                    continue
                self.done.add(key)
                good_end += len(raw)
        size = self.path.stat().st_size
        if good_end < size:
            with open(self.path, "r+b") as handle:
                handle.truncate(good_end)
                os.fsync(handle.fileno())
            self.truncated_bytes = size - good_end

    def write(self, record: dict[str, Any]) -> None:
        self.handle.write((json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8"))
        self.handle.flush()
        os.fsync(self.handle.fileno())
        key = record_key(record)
        if key is not None:
            self.done.add(key)

    def close(self) -> None:
        self.handle.close()
