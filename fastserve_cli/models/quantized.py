"""Torch int8/int4 quantization of a causal LM's linear layers, saved as safetensors, loaded without fp32.

Formats (all in one `model.safetensors` beside a `config.json` whose `quantization_config` says which
modules are quantized, `{"quant_method": "fastserve", "scheme": ..., "modules": [...]}`):

- `dynamic_int8`: int8 weights, one fp32 scale per output channel (symmetric, zero point 0); at run
  time activations are quantized per batch by fbgemm (`torch.ops.quantized.linear_dynamic`).
- `weight_only_int8`: the same tensors; the matmul runs in bf16 with int8 weights
  (`aten._weight_int8pack_mm`), norms and residuals stay fp32.
- `weight_only_int4`: 4-bit per group of `group_size` input channels: two values per byte
  (`weight`, uint8 [out, in/2]), `weight_scale` and `weight_zero` [out, in/group_size]
  (w = q * scale + zero, q in 0..15; symmetric since issue 20, so zero = -8 * scale; older directories
  hold asymmetric float zeros and still load). The portable nibble layout is repacked for the CPU kernel
  (`aten._weight_int4pack_mm_for_cpu`) at load time.

GPT-2's `Conv1D` layers are stored as `nn.Linear` ([out, in]); loading swaps them back. Since issue 20 only
GPT-2 models with no OPT equivalent (head-pruned ones) are still written in this format. Quantized weights
are only ever re-packed at load time, never re-quantized from fp32, and nothing is pickled.
`load_causal_lm` loads these directories and plain HF directories alike.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastserve_cli.core.errors import UserError
from fastserve_cli.models.head_pruned import apply_pruned_heads
from fastserve_cli.models.quant_linear import (  # noqa: F401 (re-exported: the modules belong to this format too)
    WEIGHT_FILE,
    DynamicInt8Linear,
    QuantLinear,
    WeightOnlyInt4Linear,
    WeightOnlyInt8Linear,
    distinct_tensors,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

QUANT_METHOD = "fastserve"
SCHEMES = ("dynamic_int8", "weight_only_int8", "weight_only_int4")
MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


# ------------------------------------------------------------------ quantized modules


# ------------------------------------------------------------------ quantizing fp32 weights


def quantize_int8_per_channel(weight: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """Symmetric int8, one scale per output row: w ≈ q * scale, q in [-127, 127]."""
    import torch

    weight = weight.detach().float()
    scale = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
    q = torch.clamp(torch.round(weight / scale[:, None]), -127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def quantize_int4_grouped(
    weight: "torch.Tensor", group_size: int
) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """Symmetric 4-bit per group of input channels; returns (nibbles packed 2/byte, scale, zero).

    w = (u - 8) * scale with u in 0..15 (so `zero = -8 * scale`), scale = max|w| / 7.5 as compressed-tensors'
    W4A16 computes it, which is the int4 format transformers loads (its asymmetric W4A16 checkpoints do not
    load in transformers 5.25, see docs/quantization-formats.md).
    """
    import torch

    out_features, in_features = weight.shape
    groups = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    scale = int4_scale(groups.abs().amax(-1))
    q = (torch.clamp(torch.round(groups / scale[..., None]), -8, 7) + 8).to(torch.uint8)
    q = q.reshape(out_features, in_features)
    packed = (q[:, 0::2] << 4) | q[:, 1::2]
    return packed.contiguous(), scale.contiguous(), (-8 * scale).contiguous()


def int4_scale(absmax: "torch.Tensor") -> "torch.Tensor":
    """Symmetric int4 scale of groups with the given max |w| (q = round(w / scale) in -8..7)."""
    return (absmax / 7.5).clamp(min=1e-8)


def int4_group_size(in_features: int, preferred: int) -> int | None:
    """Largest group size ≤ preferred (a power of two ≥ 32) that divides the input width, or None."""
    size = preferred
    while size >= 32:
        if in_features % size == 0:
            return size
        size //= 2
    return None


def as_linear_weight(module: "nn.Module") -> "torch.Tensor":
    """[out, in] weight of an nn.Linear or a transformers Conv1D (which stores [in, out])."""
    from transformers.pytorch_utils import Conv1D

    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def linear_modules(model: "nn.Module") -> dict[str, "nn.Module"]:
    """Every nn.Linear / Conv1D of the model, by qualified name (lm_head included)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def quantize_module(module: "nn.Module", scheme: str, group_size: int = 128) -> QuantLinear | None:
    """The quantized replacement of one linear layer, or None when the scheme cannot take its shape."""
    weight = as_linear_weight(module)
    bias = None if module.bias is None else module.bias.detach().float().clone()
    if scheme == "dynamic_int8":
        return DynamicInt8Linear(*quantize_int8_per_channel(weight), bias)
    if scheme == "weight_only_int8":
        return WeightOnlyInt8Linear(*quantize_int8_per_channel(weight), bias)
    if scheme == "weight_only_int4":
        size = int4_group_size(weight.shape[1], group_size)
        if size is None:
            return None
        return WeightOnlyInt4Linear(*quantize_int4_grouped(weight, size), bias, size)
    raise UserError(f"quantization scheme {scheme!r}: unknown; use one of {', '.join(SCHEMES)}")


def quantize_model(model: "nn.Module", scheme: str, group_size: int = 128) -> list[str]:
    """Swap every linear layer (lm_head included) for its quantized form, in place; returns their names.

    A tied lm_head gets its own quantized copy: the embedding stays fp32 for the lookup.
    """
    import torch

    if scheme not in SCHEMES:
        raise UserError(f"quantization scheme {scheme!r}: unknown; use one of {', '.join(SCHEMES)}")
    done = []
    with torch.no_grad():
        for name, module in linear_modules(model).items():
            replacement = quantize_module(module, scheme, group_size)
            if replacement is not None:
                model.set_submodule(name, replacement)
                done.append(name)
    model.config.tie_word_embeddings = False
    return done


# ------------------------------------------------------------------ saving and loading


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, generation config, chat template...: everything but config and weights."""
    for item in Path(src).iterdir():
        if item.name in MODEL_FILES or item.name.startswith(".") or item.suffix in (".safetensors", ".bin", ".pt"):
            continue
        if item.is_file():
            shutil.copy2(item, dst / item.name)


def has_conv1d(config: Any) -> bool:
    """Whether the architecture uses transformers' Conv1D (GPT-2), which compressed-tensors cannot quantize."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return any(isinstance(m, Conv1D) for m in skeleton.modules())


def save_quantized(
    model: "nn.Module", scheme: str, modules: list[str], src_dir: Path, out: Path, extra: dict[str, Any] | None = None
) -> None:
    """Write config.json (+ quantization_config), model.safetensors and the source dir's side files.

    Written in the compressed-tensors format (models/ct_format.py) that transformers, vLLM and SGLang load,
    GPT-2 as its OPT equivalent (models/gpt2_ct.py); the fastserve format described above is left for
    Conv1D models with no such equivalent (head-pruned GPT-2, other Conv1D architectures).
    """
    from fastserve_cli.models.ct_format import save_ct
    from fastserve_cli.models.gpt2_ct import unmappable

    config_dict = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
    config_probe = type(model.config).from_dict(config_dict)
    gpt2_as_opt = config_dict.get("model_type") == "gpt2" and unmappable(config_dict) is None
    if gpt2_as_opt or not has_conv1d(config_probe):
        save_ct(model, scheme, modules, out, extra or {})
    else:
        save_fastserve(model, scheme, modules, out, extra)
    copy_side_files(src_dir, out)


def save_fastserve(
    model: "nn.Module", scheme: str, modules: list[str], out: Path, extra: dict[str, Any] | None = None
) -> None:
    """config.json + model.safetensors in the fastserve format (the only format before issue 20)."""
    from safetensors.torch import save_file

    quantized = set(modules)
    tensors: dict[str, "torch.Tensor"] = {}
    for name, tensor in model.state_dict().items():
        if name.rsplit(".", 1)[0] not in quantized:
            tensors[name] = tensor
    for name in modules:
        module = model.get_submodule(name)
        for key, tensor in module.saved_tensors().items():
            tensors[f"{name}.{key}"] = tensor
        if module.bias is not None:
            tensors[f"{name}.bias"] = module.bias
    save_file(
        distinct_tensors(tensors),
        str(out / WEIGHT_FILE),
        metadata={"format": "pt", "quant_method": QUANT_METHOD, "scheme": scheme},
    )
    config = model.config.to_dict()
    config["quantization_config"] = {
        "quant_method": QUANT_METHOD,
        "scheme": scheme,
        "modules": modules,
        **(extra or {}),
    }
    config["tie_word_embeddings"] = False
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_quantization_config(path: Path) -> dict[str, Any] | None:
    """The quantization section (fastserve or compressed-tensors) of a model directory's config.json, or None."""
    from fastserve_cli.models.ct_format import QUANT_METHOD as CT_METHOD

    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        return None
    section = json.loads(config_path.read_text(encoding="utf-8")).get("quantization_config")
    if isinstance(section, dict) and section.get("quant_method") in (QUANT_METHOD, CT_METHOD):
        return section
    return None


def _owned(tensor: "torch.Tensor | None") -> "torch.Tensor | None":
    """A fresh, aligned copy: the CPU int8/int4 kernels crash on safetensors' unaligned int8 views."""
    return None if tensor is None else tensor.contiguous().clone()


def _build_module(scheme: str, tensors: dict[str, "torch.Tensor"], name: str) -> QuantLinear:
    bias = _owned(tensors.pop(f"{name}.bias", None))
    weight, scale = _owned(tensors.pop(f"{name}.weight")), _owned(tensors.pop(f"{name}.weight_scale"))
    if scheme == "dynamic_int8":
        return DynamicInt8Linear(weight, scale, bias)
    if scheme == "weight_only_int8":
        return WeightOnlyInt8Linear(weight, scale, bias)
    zero = _owned(tensors.pop(f"{name}.weight_zero"))
    # Per module: a layer whose width the preferred group size does not divide was quantized with a smaller one.
    return WeightOnlyInt4Linear(weight, scale, zero, bias, (weight.shape[1] * 2) // scale.shape[1])


def load_quantized(path: Path, section: dict[str, Any], device: str) -> "nn.Module":
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fastserve_cli.models import ct_format, gpt2_ct

    compressed = section.get("quant_method") == ct_format.QUANT_METHOD
    scheme = ct_format.scheme_of(section, str(path / "config.json")) if compressed else section.get("scheme")
    if scheme not in SCHEMES:
        raise UserError(
            f"{path}: quantization scheme {scheme!r} is not one fastserve knows ({', '.join(SCHEMES)}); re-run `fastserve optimize`"
        )
    if device != "cpu":
        raise UserError(
            f"{path}: {scheme} variants run on the CPU only; load it with device='cpu' or serve the fp32 model on {device}"
        )
    tensors = load_weights(path)
    modules = ct_format.quantized_names(tensors) if compressed else section["modules"]
    if compressed and "gpt2_config" in (section.get("fastserve") or {}):  # a GPT-2 saved as OPT
        config = gpt2_ct.gpt2_config(section)
        tensors, modules = gpt2_ct.from_opt(tensors)
    else:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = apply_pruned_heads(AutoModelForCausalLM.from_config(config, dtype=torch.float32))
    for name in modules:
        build = ct_format.build_module if compressed else _build_module
        model.set_submodule(name, build(scheme, tensors, name))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or [k for k in missing if k.rsplit(".", 1)[0] not in set(modules)]:
        raise UserError(
            f"{path}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]}); re-run `fastserve optimize`"
        )
    return model.eval()


def load_weights(path: Path) -> dict[str, "torch.Tensor"]:
    """Every tensor of model.safetensors, or of the shards listed in model.safetensors.index.json."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if not (path / WEIGHT_FILE).is_file() and index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return {k: v for f in files for k, v in load_file(str(path / f)).items()}
    return load_file(str(path / WEIGHT_FILE))
