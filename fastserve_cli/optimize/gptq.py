"""GPTQ (Frantar et al., 2022): calibrated 4-bit weights in the same symmetric, grouped int4 format as
round-to-nearest, so the variant is a `weight_only_int4` directory (compressed-tensors W4A16) that our int4
kernel, transformers, vLLM and SGLang all load.

Per linear layer, with H = 2/n Σ xᵀx over the layer's calibration inputs (plus `damp` × mean(diag H) on
the diagonal), columns are quantized one at a time and each column's rounding error is spread over the
columns not yet quantized through the Cholesky factor of H⁻¹, in lazy batches of `block` columns (the
update of the remaining columns happens once per batch). Columns go in act-order (decreasing diag H) with
static groups: each group's scale is fixed from the original weights, so groups stay contiguous runs of
input columns and the checkpoint stays plain W4A16. On the quickstart model (1500 steps) this halved
GPTQ's perplexity increase against left-to-right order (docs/quantization-formats.md).

Why our own ~100 lines and not llm-compressor / gptqmodel: `pip install --dry-run` here shows llmcompressor
0.14 downgrading transformers 5.25 -> 5.17 (and compressed-tensors, huggingface_hub), and GPTQModel 7.7
pulling a CUDA torch 2.14.1 plus the nvidia-* wheels (docs/quantization-formats.md).

All layers are calibrated in one pass over the fp32 model (inputs of layer k come from fp32 layers < k,
not from already-quantized ones): one forward per calibration block. Sequential calibration (each layer
fed by the already-quantized ones) did not do better on the quickstart model, so it is not done.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

DAMP = 0.01


def gptq_quantize(
    weight: "torch.Tensor",
    hessian: "torch.Tensor",
    group_size: int,
    damp: float = DAMP,
    block: int = 128,
    act_order: bool = True,
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """GPTQ of one [out, in] weight against H [in, in]; returns (q int8 in -8..7 [out, in], scale [out, in/group]).

    With `act_order`, columns are quantized in order of decreasing diag(H) (the inputs with the most energy
    first, while the most columns are left to absorb their error), and the group scales are fixed up front
    from the original weights ("static groups"), so a group stays a contiguous run of input columns and the
    result is plain W4A16 (no g_idx). Without it, columns go left to right and a group's scale is chosen
    when its first column comes up, from the weights as updated so far.
    """
    import torch

    from fastserve_cli.models.quantized import int4_scale

    W = weight.detach().float().clone()
    H = hessian.detach().double().clone()
    out_features, in_features = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    static = act_order
    scale = torch.zeros(out_features, in_features // group_size)
    if static:
        scale = int4_scale(W.reshape(out_features, -1, group_size).abs().amax(-1))
    order = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(in_features)
    W, H = W[:, order], H[order][:, order]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(in_features, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()

    block = group_size * max(1, block // group_size)  # without act_order, groups never straddle a lazy batch
    Q = torch.zeros_like(W, dtype=torch.int8)
    for i1 in range(0, in_features, block):
        i2 = min(i1 + block, in_features)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        errors = torch.zeros_like(W1)
        for i in range(i2 - i1):
            column = i1 + i
            group = int(order[column]) // group_size
            if not static and column % group_size == 0:
                scale[:, group] = int4_scale(W1[:, i : i + group_size].abs().amax(1))
            s = scale[:, group]
            q = torch.clamp(torch.round(W1[:, i] / s), -8, 7)
            Q[:, column] = q.to(torch.int8)
            error = (W1[:, i] - q * s) / Hinv1[i, i]
            W1[:, i:] -= error[:, None] * Hinv1[i, i:][None, :]
            errors[:, i] = error
        W[:, i2:] -= errors @ Hinv[i1:i2, i2:]
    return Q[:, torch.argsort(order)].contiguous(), scale


def layer_hessians(
    model: "nn.Module", names: list[str], batches: list[dict[str, "torch.Tensor"]]
) -> dict[str, "torch.Tensor"]:
    """H = 2/n Σ xᵀx of every named linear's input over the calibration batches (one fp32 pass)."""
    import torch

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def accumulate(_module: "nn.Module", inputs: tuple, _output: Any) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        return accumulate

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for batch in batches:
                model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    finally:
        for handle in handles:
            handle.remove()
    return {n: (2.0 / counts[n]) * sums[n] for n in names if n in sums}


def gptq_model(
    model: "nn.Module", batches: list[dict[str, "torch.Tensor"]], group_size: int, damp: float = DAMP
) -> list[str]:
    """Replace every linear layer (lm_head included) by its GPTQ int4 form, in place; returns their names.

    Layers the calibration never reached, or whose width no group size ≥ 32 divides, stay fp32 (as in RTN).
    """
    import torch

    from fastserve_cli.models.quantized import WeightOnlyInt4Linear, as_linear_weight, int4_group_size, linear_modules

    layers = linear_modules(model)
    hessians = layer_hessians(model, list(layers), batches)
    done = []
    with torch.no_grad():
        for name, module in layers.items():
            weight = as_linear_weight(module)
            size = int4_group_size(weight.shape[1], group_size)
            if size is None or name not in hessians:
                continue
            q, scale = gptq_quantize(weight, hessians[name], size, damp)
            unsigned = (q.to(torch.int16) + 8).to(torch.uint8)
            packed = ((unsigned[:, 0::2] << 4) | unsigned[:, 1::2]).contiguous()
            bias = None if module.bias is None else module.bias.detach().float().clone()
            model.set_submodule(
                name, WeightOnlyInt4Linear(packed, scale.contiguous(), (-8 * scale).contiguous(), bias, size)
            )
            done.append(name)
    model.config.tie_word_embeddings = False
    return done


def reconstruction_error(weight: "torch.Tensor", dequantized: "torch.Tensor", inputs: "torch.Tensor") -> float:
    """||W X - Q(W) X|| / ||W X|| for inputs X [n, in]: the layer-output error GPTQ minimizes."""
    reference = inputs @ weight.float().T
    return float((reference - inputs @ dequantized.float().T).norm() / reference.norm())
