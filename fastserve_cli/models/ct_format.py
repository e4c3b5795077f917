"""Quantized variants in the compressed-tensors format (what llm-compressor writes and transformers, vLLM
and SGLang load), written and read without the compressed-tensors package.

`config.json` gets `quantization_config = {"quant_method": "compressed-tensors", "format": ...,
"config_groups": {"group_0": {"targets": ["Linear"], "weights": ..., "input_activations": ...}},
"ignore": [linears left in fp32]}` and `model.safetensors` holds, per quantized `nn.Linear` `name`:

- `dynamic_int8` (W8A8, format `int-quantized`): `name.weight` int8 [out, in], `name.weight_scale` [out, 1];
  activations are declared dynamic per token (our fbgemm kernel quantizes them per tensor at run time).
- `weight_only_int8` (W8A16, `pack-quantized`): `name.weight_packed` int32 [out, in/4] (int8 + 128, four
  per word, little end first), `name.weight_scale` [out, 1], `name.weight_shape` int64 [2].
- `weight_only_int4` (W4A16 symmetric, groups; `pack-quantized`): `name.weight_packed` int32 [out, in/8]
  (q + 8, q in -8..7, eight per word), `name.weight_scale` [out, in/group], `name.weight_shape`;
  w = q * scale. We write symmetric int4 only: compressed-tensors' own asymmetric W4A16 checkpoints (packed
  `weight_zero_point`) fail to load in transformers 5.25 (size mismatch); our loader still reads them.

The layouts were checked against compressed-tensors 0.20.1's own compressors (tests/test_ct_format.py
loads our files with stock transformers + compressed-tensors). compressed-tensors quantizes `nn.Linear`
only, so GPT-2 (transformers' `Conv1D`) is written as the equivalent OPT model (models/gpt2_ct.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastserve_cli.core.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

QUANT_METHOD = "compressed-tensors"
CT_VERSION = "0.20.1"
FORMATS = {"dynamic_int8": "int-quantized", "weight_only_int8": "pack-quantized", "weight_only_int4": "pack-quantized"}


def _args(
    bits: int, strategy: str, symmetric: bool = True, group_size: int | None = None, dynamic: bool = False
) -> dict[str, Any]:
    return {
        "num_bits": bits,
        "type": "int",
        "strategy": strategy,
        "symmetric": symmetric,
        "group_size": group_size,
        "dynamic": dynamic,
    }


def quantization_config(
    scheme: str, ignore: list[str], group_sizes: dict[str, int | None], extra: dict[str, Any]
) -> dict[str, Any]:
    """The `quantization_config` section of config.json for one of our schemes.

    `group_sizes` maps each quantized module to its int4 group size (None for int8). One size: a single
    group targeting every `Linear`; several (a width the preferred size does not divide): one group per size
    whose targets are the module names.
    """
    sizes = sorted({s for s in group_sizes.values()}, key=lambda s: -(s or 0))
    groups = {}
    for i, size in enumerate(sizes):
        if scheme == "dynamic_int8":
            weights, acts = _args(8, "channel"), _args(8, "token", dynamic=True)
        elif scheme == "weight_only_int8":
            weights, acts = _args(8, "channel"), None
        else:
            weights, acts = _args(4, "group", group_size=size), None
        targets = ["Linear"] if len(sizes) == 1 else sorted(n for n, s in group_sizes.items() if s == size)
        groups[f"group_{i}"] = {
            "targets": targets,
            "weights": weights,
            "input_activations": acts,
            "output_activations": None,
            "format": FORMATS[scheme],
        }
    return {
        "quant_method": QUANT_METHOD,
        "format": FORMATS[scheme],
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "transform_config": {},
        "global_compression_ratio": None,
        "version": CT_VERSION,
        "fastserve": {"scheme": scheme, **extra},
    }


def scheme_of(section: dict[str, Any], where: str = "config.json") -> str:
    """Our scheme name for a compressed-tensors section (ours or llm-compressor's), or a UserError."""
    groups = list((section.get("config_groups") or {}).values())
    kinds = {
        json.dumps({k: v for k, v in g.get("weights", {}).items() if k != "group_size"}, sort_keys=True) for g in groups
    }
    if groups and len(kinds) == 1 and groups[0].get("weights"):
        w, acts = groups[0]["weights"], groups[0].get("input_activations")
        if w.get("type") == "int" and w.get("num_bits") == 8 and w.get("strategy") == "channel" and w.get("symmetric"):
            if acts is None and section.get("format") == "pack-quantized":
                return "weight_only_int8"
            if acts and acts.get("dynamic") and acts.get("num_bits") == 8 and section.get("format") == "int-quantized":
                return "dynamic_int8"
        if (
            w.get("type") == "int"
            and w.get("num_bits") == 4
            and w.get("strategy") == "group"
            and acts is None
            and section.get("format") == "pack-quantized"
        ):
            return "weight_only_int4"
    raise UserError(
        f"{where} quantization_config: this compressed-tensors scheme has no fastserve CPU kernel "
        "(supported: W8A8 int8 per channel, W8A16 int8 per channel, W4A16 int4 groups); "
        "load it with transformers or re-run `fastserve optimize` on the fp32 model"
    )


# ------------------------------------------------------------------ packing (compressed-tensors' layout)


def pack_int32(values: "torch.Tensor", bits: int) -> "torch.Tensor":
    """Signed `bits`-bit values [rows, cols] (cols * bits a multiple of 32) -> int32 [rows, cols*bits/32]."""
    import torch

    unsigned = (values.to(torch.int32) + (1 << (bits - 1))).to(torch.uint8)
    if bits == 4:
        unsigned = unsigned[:, 0::2] | (unsigned[:, 1::2] << 4)
    rows = unsigned.shape[0]  # flat view: a [1, n] tensor may carry a stride .view() refuses
    return unsigned.contiguous().reshape(-1).view(torch.int32).reshape(rows, -1)


def unpack_int32(packed: "torch.Tensor", bits: int) -> "torch.Tensor":
    """The inverse of pack_int32: unsigned values (value + 2^(bits-1)) as uint8 [rows, cols]."""
    import torch

    raw = packed.contiguous().reshape(-1).view(torch.uint8).reshape(packed.shape[0], -1)
    if bits == 8:
        return raw
    return torch.stack([raw & 0xF, raw >> 4], dim=-1).reshape(raw.shape[0], -1)


def module_tensors(scheme: str, module: "nn.Module") -> dict[str, "torch.Tensor"]:
    """The compressed-tensors tensors of one of our quantized linears (see models/quantized.py)."""
    import torch

    scale = module.weight_scale.float()
    if scheme == "dynamic_int8":
        return {"weight": module.weight, "weight_scale": scale[:, None].contiguous()}
    shape = torch.tensor([module.out_features, module.in_features], dtype=torch.int64)
    if scheme == "weight_only_int8":
        return {
            "weight_packed": pack_int32(module.weight, 8),
            "weight_scale": scale[:, None].contiguous(),
            "weight_shape": shape,
        }
    packed = module.weight  # ours: uint8, two values per byte, even column in the high nibble
    q = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(module.out_features, module.in_features)
    if not torch.allclose(module.weight_zero.float(), -8 * scale):
        raise UserError(
            "weight_only_int4: this layer was quantized asymmetrically (an older fastserve); "
            "re-run `fastserve optimize` to write it in the compressed-tensors format"
        )
    return {
        "weight_packed": pack_int32(q.to(torch.int16) - 8, 4),
        "weight_scale": scale.contiguous(),
        "weight_shape": shape,
    }


def build_module(scheme: str, tensors: dict[str, "torch.Tensor"], name: str) -> "nn.Module":
    """One of our quantized linears (fast CPU kernels) from the compressed-tensors tensors of `name`."""
    import torch

    from fastserve_cli.models.quant_linear import DynamicInt8Linear, WeightOnlyInt4Linear, WeightOnlyInt8Linear

    def take(key: str) -> "torch.Tensor | None":
        tensor = tensors.pop(f"{name}.{key}", None)
        return None if tensor is None else tensor.contiguous().clone()  # aligned copies for the kernels

    bias, scale = take("bias"), take("weight_scale").float()
    bias = None if bias is None else bias.float()
    if scheme == "dynamic_int8":
        return DynamicInt8Linear(take("weight"), scale.reshape(-1).contiguous(), bias)
    packed, shape = take("weight_packed"), take("weight_shape")
    out_features, in_features = (int(v) for v in shape)
    if scheme == "weight_only_int8":
        q = (unpack_int32(packed, 8).to(torch.int16) - 128).to(torch.int8)
        return WeightOnlyInt8Linear(q[:, :in_features].contiguous(), scale.reshape(-1).contiguous(), bias)
    q = unpack_int32(packed, 4)[:, :in_features]
    zp_raw = take("weight_zero_point")
    if zp_raw is None:  # symmetric W4A16 (llm-compressor's default preset): zero point 0
        zero_point = torch.zeros_like(scale)
    else:
        zero_point = unpack_int32(zp_raw.T.contiguous(), 4).T[:out_features].float() - 8
    ours = ((q[:, 0::2] << 4) | q[:, 1::2]).contiguous()
    group_size = in_features // scale.shape[1]
    return WeightOnlyInt4Linear(ours, scale.contiguous(), (-(8 + zero_point) * scale).contiguous(), bias, group_size)


# ------------------------------------------------------------------ directories


def save_ct(model: "nn.Module", scheme: str, modules: list[str], out: Path, extra: dict[str, Any]) -> None:
    """Write model.safetensors + config.json (a GPT-2 as its OPT equivalent, see gpt2_ct.py)."""
    from safetensors.torch import save_file
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    from fastserve_cli.models import gpt2_ct
    from fastserve_cli.models.quant_linear import WEIGHT_FILE, QuantLinear, distinct_tensors

    quantized = set(modules)
    tensors = {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[0] not in quantized}
    for name in modules:
        module = model.get_submodule(name)
        tensors.update({f"{name}.{k}": v for k, v in module_tensors(scheme, module).items()})
        if module.bias is not None:
            tensors[f"{name}.bias"] = module.bias
    dense = (nn.Linear, Conv1D)  # a GPT-2 Conv1D left in fp32 is a Linear in the file (gpt2_ct.py)
    ignore = [n for n, m in model.named_modules() if isinstance(m, dense) and not isinstance(m, QuantLinear)]
    sizes = {n: getattr(model.get_submodule(n), "group_size", None) for n in modules}
    config = model.config.to_dict()
    config["tie_word_embeddings"] = False
    if config.get("model_type") == "gpt2":  # as OPT; load_causal_lm maps it back to GPT-2
        extra = {**extra, "gpt2_config": {k: v for k, v in config.items() if k != "quantization_config"}}
        tensors, config = gpt2_ct.to_opt(distinct_tensors(tensors), config, quantized)
        ignore = [opt for name in ignore for opt in gpt2_ct.opt_names(name)]
        sizes = {opt: size for name, size in sizes.items() for opt in gpt2_ct.opt_names(name)}
    save_file(distinct_tensors(tensors), str(out / WEIGHT_FILE), metadata={"format": "pt"})
    config["quantization_config"] = quantization_config(scheme, ignore, sizes, extra)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def quantized_names(tensor_names: Any) -> list[str]:
    """The modules a checkpoint stores quantized: every prefix with a weight_scale."""
    return sorted({k[: -len(".weight_scale")] for k in tensor_names if k.endswith(".weight_scale")})
