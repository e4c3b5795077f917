"""A weight-only int4 variant (RTN or GPTQ) as a dense fp32 model whose weights are exactly its int4
values, plus those int4 values keyed by the bytes of each weight, so an exporter can re-emit the very
same int4 weights (ONNX MatMulNBits) instead of re-quantizing them (export and optimize agree).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


def int4_group_size_of(path: Path) -> int | None:
    """The int4 group size of a weight-only int4 variant directory (fastserve or compressed-tensors), or None."""
    from fastserve_cli.models.ct_format import QUANT_METHOD as CT_METHOD
    from fastserve_cli.models.ct_format import scheme_of
    from fastserve_cli.models.quantized import read_quantization_config

    section = read_quantization_config(Path(path))
    if section is None:
        return None
    if section.get("quant_method") == CT_METHOD:
        if scheme_of(section) != "weight_only_int4":
            return None
        return max(g["weights"]["group_size"] for g in section["config_groups"].values())
    return section.get("group_size") if section.get("scheme") == "weight_only_int4" else None


def weight_key(matrix_k_by_n: Any) -> str:
    """Key of a [K, N] (in x out) fp32 weight: the digest of its bytes."""
    import numpy as np

    return hashlib.sha1(np.ascontiguousarray(matrix_k_by_n, dtype=np.float32).tobytes()).hexdigest()


def dequantize_int4(module: "nn.Module") -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor | None"]:
    """(dense W [out, in] fp32, q_u uint8 0..15 [out, in], symmetric scale [out, groups] or None)."""
    import torch

    q = torch.stack([module.weight >> 4, module.weight & 0xF], dim=-1).reshape(module.out_features, module.in_features)
    scale, zero = module.weight_scale.float(), module.weight_zero.float()
    groups = q.float().reshape(module.out_features, -1, module.group_size)
    dense = (groups * scale[..., None] + zero[..., None]).reshape(module.out_features, module.in_features)
    symmetric = torch.allclose(zero, -8 * scale)
    return dense.contiguous(), q, (scale if symmetric else None)


def write_dense_copy(path: Path, out: Path) -> dict[str, tuple[Any, Any, int]]:
    """Save the variant at `path` as a plain HF directory at `out` (int4 layers dequantized, GPT-2 Conv1D
    layout restored); returns {weight_key(Wᵀ): (q_u [out, in] uint8, scale [out, groups], group_size)}."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from fastserve_cli.models.loader import load_causal_lm
    from fastserve_cli.models.quantized import WeightOnlyInt4Linear, copy_side_files

    model = load_causal_lm(path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model.config)
    exact: dict[str, tuple[Any, Any, int]] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, WeightOnlyInt4Linear):
            continue
        dense, q, scale = dequantize_int4(module)
        has_bias = module.bias is not None
        if isinstance(skeleton.get_submodule(name), Conv1D):
            plain = Conv1D(module.out_features, module.in_features)
            plain.weight.data = dense.T.contiguous()
        else:
            plain = nn.Linear(module.in_features, module.out_features, bias=has_bias)
            plain.weight.data = dense
        if has_bias:
            plain.bias.data = module.bias.clone()
        elif isinstance(plain, Conv1D):
            plain.bias.data.zero_()
        model.set_submodule(name, plain)
        if scale is not None:
            exact[weight_key(dense.T.numpy())] = (q.numpy(), scale.numpy(), module.group_size)
    model.save_pretrained(out)
    copy_side_files(path, out)
    return exact
