"""data.min_feedback: a preprocess input made of serve request logs, keeping only well-rated exchanges.

The selection itself (latest feedback wins, a corrected answer replaces the reply) is in
fastserve_cli.core.feedback_log, next to the writer's format; this module turns it into a `datasets`
column of chat messages, which the sft mode then masks to the assistant turns.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastserve_cli.core.errors import UserError
from fastserve_cli.core.feedback_log import rated_conversations
from fastserve_cli.core.recipe import DataConfig


def load_rated(cfg: DataConfig, files: list[str], cache_dir: str) -> tuple[Any, dict[str, Any]]:
    import datasets

    stats: dict[str, int] = {}
    features = datasets.Features(
        {"messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}]}
    )

    def rows():
        yield from rated_conversations(files, cfg.min_feedback, stats)

    try:
        ds = datasets.Dataset.from_generator(rows, features=features, cache_dir=cache_dir, fingerprint=uuid.uuid4().hex)
    except datasets.exceptions.DatasetGenerationError as err:
        raise UserError(f"data.paths: could not read the request logs ({err.__cause__ or err})") from None
    except Exception:  # an empty selection: from_generator cannot build a dataset from no rows
        if stats.get("selected"):
            raise
        raise UserError(
            f"data.min_feedback {cfg.min_feedback}: no exchange in {len(files)} log file(s) has a rating "
            f">= it ({stats.get('exchanges', 0)} exchanges read); lower it or collect feedback"
        ) from None
    info = {
        "files": len(files),
        "format": "request_log",
        "exchanges": stats.get("exchanges", 0),
        "selected_by_feedback": stats.get("selected", 0),
        "corrected_answers": stats.get("corrected", 0),
    }
    return ds, info
