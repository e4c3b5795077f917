"""The one model loader every stage and the server use: plain HF directories, optimize variants
(int8/int4 quantized, head-pruned), in eval mode."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from fastserve_cli.core.errors import UserError
from fastserve_cli.models.head_pruned import HEADS_KEY, load_head_pruned
from fastserve_cli.models.quantized import load_quantized, read_quantization_config

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


def load_causal_lm(path: str | Path, device: str = "cpu", dtype: "torch.dtype | None" = None) -> "nn.Module":
    """Load a plain HF model directory or an optimize variant (quantized or pruned), in eval mode.

    Quantized variants come back with their int8/int4 modules in place (CPU only, `dtype` ignored:
    they compute in fp32/bf16 internally); everything else goes through `from_pretrained`. The result
    supports the usual forward with `past_key_values` and `generate()`.
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not a model directory (no config.json); pass run/model or run/optimized/<variant>")
    section = read_quantization_config(path)
    if section is not None:
        return load_quantized(path, section, device)
    if json.loads((path / "config.json").read_text(encoding="utf-8")).get(HEADS_KEY):
        return load_head_pruned(path, dtype or torch.float32).to(device).eval()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, trust_remote_code=False)
    return model.to(device).eval()
