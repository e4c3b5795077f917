"""OpenAI's `logit_bias`: a map from token id (as a JSON string key) to a bias in [-100, 100] added to that
token's logit before sampling (and before logprobs, which therefore describe the biased distribution).

Parsed once per request here; applied per row in `sampling.sample_row`, so it works the same for the torch
and onnx backends and composes with greedy, temperature, top-k/top-p and penalties. As OpenAI documents it,
-100 effectively bans a token and +100 effectively forces it.
"""

from __future__ import annotations

import math
from typing import Any

from fastserve_cli.serve.protocol import bad_request

MAX_ENTRIES = 1024


def parse_logit_bias(raw: Any, vocab_size: int) -> dict[int, float] | None:
    """`{"50256": -100, ...}` -> {50256: -100.0}; a 400 naming the bad key or value."""
    if raw is None or raw == {}:
        return None
    if not isinstance(raw, dict):
        raise bad_request("'logit_bias' must be an object mapping token ids to biases", param="logit_bias")
    if len(raw) > MAX_ENTRIES:
        raise bad_request(f"'logit_bias' has {len(raw)} entries; at most {MAX_ENTRIES} are allowed", param="logit_bias")
    bias: dict[int, float] = {}
    for key, value in raw.items():
        token = str(key).strip()
        if not token.isdigit() or not token.isascii() or int(token) >= vocab_size:
            raise bad_request(
                f"logit_bias: key {str(key)!r} is not a token id in this model's vocabulary (0..{vocab_size - 1})",
                param="logit_bias",
            )
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or not -100 <= value <= 100
        ):
            raise bad_request(
                f"logit_bias: the bias for token {token} must be a number in [-100, 100], got {value!r}",
                param="logit_bias",
            )
        bias[int(token)] = float(value)
    return bias


def apply_logit_bias(row, bias: dict[int, float] | None):
    """`row` (one request's logits [V]) with the biases added; a new tensor, the input is left as it was."""
    if not bias:
        return row
    import torch

    ids = torch.tensor(list(bias), dtype=torch.long)
    keep = ids < row.shape[-1]
    row = row.clone()
    row[ids[keep]] += torch.tensor(list(bias.values()), dtype=row.dtype)[keep]
    return row
