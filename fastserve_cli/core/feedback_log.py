"""The request log: served chat exchanges and the feedback on them, as JSONL (written by serve, read by preprocess).

Two record types share one append-only file, so the server never rewrites anything:

  {"type": "exchange", "id": "chatcmpl-...", "created": 1733, "model": "...", "messages": [...with the reply...],
   "usage": {...}, "finish_reason": "stop"}
  {"type": "feedback", "id": "chatcmpl-...", "created": 1734, "rating": 5, "corrected_answer": "..." | null}

`messages` is the chat format `data.messages_column` already reads. The latest feedback on an id wins.
Lives in core/ because two stages use it: serve writes it, preprocess selects well-rated exchanges from it.
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterable, Iterator

EXCHANGE, FEEDBACK = "exchange", "feedback"


def exchange_record(
    id_: str, model: str, messages: list[dict], reply: str, usage: dict, finish_reason: str | None
) -> dict:
    return {
        "type": EXCHANGE,
        "id": id_,
        "created": int(time.time()),
        "model": model,
        "messages": [*messages, {"role": "assistant", "content": reply}],
        "usage": usage,
        "finish_reason": finish_reason,
    }


def feedback_record(id_: str, rating: float, corrected_answer: str | None) -> dict:
    return {
        "type": FEEDBACK,
        "id": id_,
        "created": int(time.time()),
        "rating": rating,
        "corrected_answer": corrected_answer,
    }


def read_records(path: str) -> Iterator[dict[str, Any]]:
    """Records of one log file; a torn last line (a server killed mid-write) is skipped."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        for raw in handle:
            try:
                record = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("type") in (EXCHANGE, FEEDBACK) and record.get("id"):
                yield record


def rated_conversations(paths: Iterable[str], min_rating: float, stats: dict[str, int]) -> Iterator[dict[str, Any]]:
    """`{"messages": [...]}` for each exchange whose latest feedback has rating >= min_rating, in log order.

    A corrected answer replaces the assistant reply (a person wrote it, so it is what to learn). Two passes
    over the files: feedback first (small: one entry per rated id), then the exchanges, streamed.
    """
    paths = list(paths)
    latest: dict[str, dict] = {}
    for path in paths:
        for record in read_records(path):
            if record["type"] == FEEDBACK:
                latest[record["id"]] = record
    for path in paths:
        for record in read_records(path):
            if record["type"] != EXCHANGE:
                continue
            stats["exchanges"] = stats.get("exchanges", 0) + 1
            feedback = latest.get(record["id"])
            if (
                feedback is None
                or not isinstance(feedback.get("rating"), (int, float))
                or feedback["rating"] < min_rating
            ):
                continue
            messages = [
                {"role": str(m.get("role")), "content": str(m.get("content") or "")} for m in record["messages"]
            ]
            if feedback.get("corrected_answer") and messages and messages[-1]["role"] == "assistant":
                messages[-1]["content"] = feedback["corrected_answer"]
                stats["corrected"] = stats.get("corrected", 0) + 1
            stats["selected"] = stats.get("selected", 0) + 1
            yield {"messages": messages}
