"""The one place that knows how this transformers version names the KV cache in `forward`.

transformers 5.2x renamed forward's `past_key_values` to `cache` (and the output's field with it); the code
calls models through these two helpers so both spellings work across the `transformers>=5.0,<6` range
that pyproject.toml allows.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any


@functools.lru_cache(maxsize=None)
def _cache_keyword(forward_type: type) -> str:
    return "cache" if "cache" in inspect.signature(forward_type.forward).parameters else "past_key_values"


def cache_keyword(model: Any) -> str:
    """`cache` or `past_key_values`: whichever this model's forward takes."""
    return _cache_keyword(type(model))


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """`{keyword: cache}` for `model(**cache_kwargs(model, cache))`."""
    return {cache_keyword(model): cache}


def output_cache(out: Any) -> Any:
    """The cache a forward returned, under either name."""
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values
