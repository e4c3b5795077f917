"""Pruning: unstructured magnitude (made permanent) and structured head/neuron removal for GPT-2 and Llama.

Structured pruning removes the same number of attention heads and MLP neurons from every layer, so the
transformers config can describe the result: Llama gets `num_attention_heads` / `num_key_value_heads` /
`intermediate_size` (with `head_dim` pinned) and round-trips through plain `from_pretrained`. GPT-2's
attention in transformers 5 derives its width from `n_embd / n_head` and lost `prune_heads`, so a
head-pruned GPT-2 keeps `n_head` (it fixes head_dim) and records the kept count in
`fastserve_attention_heads`; `models.loader.load_causal_lm` re-shapes the attention before loading the
weights (plain `from_pretrained` refuses the checkpoint on the shape mismatch instead of loading garbage).
MLP-only pruning of GPT-2 just sets `n_inner`, a plain transformers config.

Importance scores (lower = removed first), per head and per neuron of each layer:
- `weight`: squared L2 norm of the weights that belong to it (q/k/v rows + output columns for a head,
  input rows + output column for a neuron);
- `activation`: mean L2 norm of its activation entering the output projection on calibration blocks,
  times the norm of its output-projection columns (what it adds to the residual stream);
- `gradient`: first-order Taylor, |Σ activation · ∂loss/∂activation| on calibration blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

from fastserve_cli.core.errors import UserError
from fastserve_cli.models.head_pruned import HEADS_KEY, apply_pruned_heads, is_conv1d

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


# ------------------------------------------------------------------ unstructured magnitude


def prunable_linears(model: "nn.Module") -> dict[str, "nn.Module"]:
    """Linear/Conv1D layers inside the transformer blocks (embeddings and lm_head are left dense)."""
    from fastserve_cli.models.quantized import linear_modules

    return {name: m for name, m in linear_modules(model).items() if not name.endswith("lm_head")}


def magnitude_prune(model: "nn.Module", sparsity: float, scope: str = "global") -> dict[str, float]:
    """Zero the smallest-|w| weights of the block linears, in place; returns achieved sparsity.

    `global` ranks all weights together (layers that matter less lose more); `layer` prunes each layer
    to the same sparsity. The zeros are written into the weights: no masks or hooks remain.
    """
    import torch

    if not 0.0 < sparsity < 1.0:
        raise UserError(f"optimize.variants.sparsity: {sparsity} is outside (0, 1); use e.g. 0.5 for half the weights")
    layers = prunable_linears(model)
    with torch.no_grad():
        if scope == "global":
            magnitudes = torch.cat([m.weight.detach().abs().flatten() for m in layers.values()])
            threshold = _kth_smallest(magnitudes, sparsity)
            for module in layers.values():
                module.weight.mul_(module.weight.abs() > threshold)
        elif scope == "layer":
            for module in layers.values():
                threshold = _kth_smallest(module.weight.detach().abs().flatten(), sparsity)
                module.weight.mul_(module.weight.abs() > threshold)
        else:
            raise UserError(f"optimize.variants.scope: {scope!r} is unknown; use global or layer")
    return measure_sparsity(model)


def _kth_smallest(values: "torch.Tensor", fraction: float) -> float:
    k = max(1, min(values.numel(), int(round(fraction * values.numel()))))
    return values.kthvalue(k).values.item()


def measure_sparsity(model: "nn.Module") -> dict[str, float]:
    """Fraction of exact zeros in the block linears, overall and per layer (verifies the pruning)."""
    layers = prunable_linears(model)
    zeros = {name: int((m.weight == 0).sum()) for name, m in layers.items()}
    total = sum(m.weight.numel() for m in layers.values())
    per_layer = {name: zeros[name] / m.weight.numel() for name, m in layers.items()}
    return {
        "sparsity": sum(zeros.values()) / total,
        "min_layer_sparsity": min(per_layer.values()),
        "max_layer_sparsity": max(per_layer.values()),
    }


# ------------------------------------------------------------------ architecture adapters


@dataclass
class Block:
    """The pieces of one transformer layer that structured pruning reshapes."""

    attn: "nn.Module"
    heads_in: list[str]  # modules whose output features are grouped by query head
    kv_in: list[str]  # modules whose output features are grouped by key/value head
    heads_out: str  # attention output projection (input features grouped by head)
    mlp: "nn.Module"
    neurons_in: list[str]  # MLP input projections (output features = neurons)
    neurons_out: str  # MLP output projection (input features = neurons)


@dataclass
class Shape:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int


def architecture(model: "nn.Module") -> str:
    kind = model.config.model_type
    if kind not in ("gpt2", "llama"):
        raise UserError(f"structured pruning: model type {kind!r} is not supported; use a gpt2 or llama model")
    return kind


def blocks(model: "nn.Module") -> list[Block]:
    if architecture(model) == "gpt2":
        # c_attn packs q, k and v: handled as three head-grouped slices of one module (see _attn_slices).
        return [
            Block(layer.attn, ["c_attn"], [], "c_proj", layer.mlp, ["c_fc"], "c_proj") for layer in model.transformer.h
        ]
    return [
        Block(
            layer.self_attn,
            ["q_proj"],
            ["k_proj", "v_proj"],
            "o_proj",
            layer.mlp,
            ["gate_proj", "up_proj"],
            "down_proj",
        )
        for layer in model.model.layers
    ]


def shape_of(model: "nn.Module") -> Shape:
    config = model.config
    if architecture(model) == "gpt2":
        heads = getattr(config, HEADS_KEY, None) or config.n_head
        return Shape(heads, heads, config.n_embd // config.n_head, config.n_inner or 4 * config.n_embd)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return Shape(config.num_attention_heads, config.num_key_value_heads, head_dim, config.intermediate_size)


# ------------------------------------------------------------------ slicing modules


def keep_outputs(module: "nn.Module", index: "torch.Tensor") -> "nn.Module":
    """A copy of a Linear/Conv1D that keeps only the output features in `index`."""
    import torch
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    with torch.no_grad():
        if is_conv1d(module):
            new = Conv1D(len(index), module.weight.shape[0])
            new.weight.copy_(module.weight[:, index])
        else:
            new = nn.Linear(module.in_features, len(index), bias=module.bias is not None)
            new.weight.copy_(module.weight[index])
        if module.bias is not None:
            new.bias.copy_(module.bias[index])
    return new.to(module.weight.dtype)


def keep_inputs(module: "nn.Module", index: "torch.Tensor") -> "nn.Module":
    """A copy of a Linear/Conv1D that keeps only the input features in `index`."""
    import torch
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    with torch.no_grad():
        if is_conv1d(module):
            new = Conv1D(module.weight.shape[1], len(index))
            new.weight.copy_(module.weight[index])
        else:
            new = nn.Linear(len(index), module.out_features, bias=module.bias is not None)
            new.weight.copy_(module.weight[:, index])
        if module.bias is not None:
            new.bias.copy_(module.bias)
    return new.to(module.weight.dtype)


def _out_weight(module: "nn.Module") -> "torch.Tensor":
    """[out, in] view of a Linear/Conv1D weight."""
    return module.weight.t() if is_conv1d(module) else module.weight


def _head_features(heads: Iterable[int], head_dim: int, offset: int = 0) -> list[int]:
    return [offset + h * head_dim + i for h in heads for i in range(head_dim)]


def _qkv_features(heads: list[int], shape: Shape) -> list[int]:
    """GPT-2's c_attn output features of the given heads, for q, k and v."""
    width = shape.num_heads * shape.head_dim
    return [f for part in range(3) for f in _head_features(heads, shape.head_dim, part * width)]


# ------------------------------------------------------------------ importance


def weight_importance(model: "nn.Module") -> tuple[list["torch.Tensor"], list["torch.Tensor"]]:
    """Per layer: head scores [num_heads] and neuron scores [intermediate] from weight norms."""
    shape = shape_of(model)
    kind = architecture(model)
    heads, neurons = [], []
    for block in blocks(model):
        out_cols = _out_weight(getattr(block.attn, block.heads_out)).pow(2)  # [hidden, heads*dim]
        score = out_cols.sum(0).reshape(shape.num_heads, shape.head_dim).sum(-1)
        for name in block.heads_in:
            rows = _out_weight(getattr(block.attn, name)).pow(2).sum(1)
            if kind == "gpt2":
                rows = rows.reshape(3, shape.num_heads, shape.head_dim).sum(0)
            score = score + rows.reshape(shape.num_heads, shape.head_dim).sum(-1)
        heads.append(score.detach())
        mlp_score = _out_weight(getattr(block.mlp, block.neurons_out)).pow(2).sum(0)
        for name in block.neurons_in:
            mlp_score = mlp_score + _out_weight(getattr(block.mlp, name)).pow(2).sum(1)
        neurons.append(mlp_score.detach())
    return heads, neurons


def calibrated_importance(
    model: "nn.Module", batches: list[dict[str, "torch.Tensor"]], kind: str
) -> tuple[list["torch.Tensor"], list["torch.Tensor"]]:
    """Activation- or gradient-based scores from hooks on the inputs of the output projections."""
    import torch

    shape = shape_of(model)
    layer_blocks = blocks(model)
    head_scores = [torch.zeros(shape.num_heads) for _ in layer_blocks]
    neuron_scores = [torch.zeros(shape.intermediate) for _ in layer_blocks]
    tokens = 0

    def capture(scores: list["torch.Tensor"], index: int, grouped: int):
        def hook(_module, args):
            act = args[0]
            if kind == "activation":
                value = act.detach().float()
                if grouped:
                    value = value.reshape(*value.shape[:-1], -1, grouped).norm(dim=-1)
                scores[index].add_(value.abs().reshape(-1, value.shape[-1]).sum(0))
            elif act.requires_grad:

                def on_grad(grad, act=act.detach()):
                    taylor = (act * grad).float()
                    if grouped:
                        taylor = taylor.reshape(*taylor.shape[:-1], -1, grouped).sum(-1)
                    scores[index].add_(taylor.reshape(-1, taylor.shape[-1]).sum(0).abs())

                act.register_hook(on_grad)

        return hook

    handles = []
    for i, block in enumerate(layer_blocks):
        handles.append(
            getattr(block.attn, block.heads_out).register_forward_pre_hook(capture(head_scores, i, shape.head_dim))
        )
        handles.append(getattr(block.mlp, block.neurons_out).register_forward_pre_hook(capture(neuron_scores, i, 0)))
    try:
        model.eval()
        for batch in batches:
            tokens += int(batch["input_ids"].numel())
            if kind == "gradient":
                model.zero_grad(set_to_none=True)
                model(**batch).loss.backward()
            else:
                with torch.no_grad():
                    model(**batch)
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    if kind == "activation":  # weight by how strongly each unit writes into the residual stream
        for i, block in enumerate(layer_blocks):
            cols = _out_weight(getattr(block.attn, block.heads_out)).detach().pow(2).sum(0)
            head_scores[i] *= cols.reshape(shape.num_heads, shape.head_dim).sum(-1).sqrt()
            neuron_scores[i] *= _out_weight(getattr(block.mlp, block.neurons_out)).detach().norm(dim=0)
    return [s / max(tokens, 1) for s in head_scores], [s / max(tokens, 1) for s in neuron_scores]


# ------------------------------------------------------------------ structured pruning


@dataclass
class StructuredPlan:
    heads_removed_per_group: int
    neurons_removed: int


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def plan_structured(
    model: "nn.Module", heads_fraction: float | None, heads_per_layer: int | None, neurons_fraction: float | None
) -> StructuredPlan:
    """How many heads (per key/value group) and neurons to remove from each layer; checks the bounds."""
    shape = shape_of(model)
    group = shape.num_heads // shape.num_kv_heads
    requested = (
        heads_per_layer if heads_per_layer is not None else round_half_up((heads_fraction or 0.0) * shape.num_heads)
    )
    if heads_fraction and requested == 0:
        requested = 1
    if requested >= shape.num_heads:
        raise UserError(
            f"optimize.variants: removing {requested} heads per layer, but a layer has only {shape.num_heads}; "
            f"remove at most {shape.num_heads - 1} (heads_per_layer) or lower heads_fraction"
        )
    per_group = 0
    if requested:
        # GQA: the same number of query heads leave every key/value group (whole groups when group == 1).
        per_group = max(1, round_half_up(requested / shape.num_kv_heads)) if group > 1 else requested
        if group > 1 and per_group >= group:
            raise UserError(
                f"optimize.variants: removing {requested} heads per layer leaves a key/value group of "
                f"{group} query heads empty; remove fewer than {shape.num_kv_heads * (group - 1) + 1} heads"
            )
    neurons = round_half_up((neurons_fraction or 0.0) * shape.intermediate)
    if neurons >= shape.intermediate:
        raise UserError(
            f"optimize.variants.neurons_fraction: removes all {shape.intermediate} MLP neurons; use a fraction below 1"
        )
    return StructuredPlan(per_group, neurons)


def _kept_heads(score: "torch.Tensor", shape: Shape, per_group: int) -> tuple[list[int], list[int]]:
    """(query heads kept, kv heads kept), sorted, removing the lowest-scored heads."""
    group = shape.num_heads // shape.num_kv_heads
    if per_group == 0:
        return list(range(shape.num_heads)), list(range(shape.num_kv_heads))
    if group == 1:
        keep = sorted(score.argsort(descending=True)[: shape.num_heads - per_group].tolist())
        return keep, keep
    keep = []
    for g in range(shape.num_kv_heads):
        members = score[g * group : (g + 1) * group]
        keep += [g * group + int(i) for i in sorted(members.argsort(descending=True)[: group - per_group].tolist())]
    return keep, list(range(shape.num_kv_heads))


def prune_structured(
    model: "nn.Module", plan: StructuredPlan, head_scores: list["torch.Tensor"], neuron_scores: list["torch.Tensor"]
) -> dict[str, Any]:
    """Remove the planned heads and neurons in place and update the config; returns what was removed."""
    import torch

    shape = shape_of(model)
    kind = architecture(model)
    kept_heads = kept_kv = shape.num_heads
    for block, h_score, n_score in zip(blocks(model), head_scores, neuron_scores):
        heads, kv_heads = _kept_heads(h_score, shape, plan.heads_removed_per_group)
        kept_heads, kept_kv = len(heads), len(kv_heads)
        if kept_heads < shape.num_heads:
            for name in block.heads_in:
                features = _qkv_features(heads, shape) if kind == "gpt2" else _head_features(heads, shape.head_dim)
                setattr(block.attn, name, keep_outputs(getattr(block.attn, name), torch.tensor(features)))
            for name in block.kv_in if kept_kv < shape.num_kv_heads else []:
                setattr(
                    block.attn,
                    name,
                    keep_outputs(getattr(block.attn, name), torch.tensor(_head_features(kv_heads, shape.head_dim))),
                )
            out = getattr(block.attn, block.heads_out)
            setattr(block.attn, block.heads_out, keep_inputs(out, torch.tensor(_head_features(heads, shape.head_dim))))
        if plan.neurons_removed:
            keep = torch.sort(n_score.argsort(descending=True)[: shape.intermediate - plan.neurons_removed]).values
            for name in block.neurons_in:
                setattr(block.mlp, name, keep_outputs(getattr(block.mlp, name), keep))
            setattr(block.mlp, block.neurons_out, keep_inputs(getattr(block.mlp, block.neurons_out), keep))
    _update_config(model, kept_heads, kept_kv, shape.head_dim, shape.intermediate - plan.neurons_removed)
    apply_pruned_heads(model)
    return {
        "heads_per_layer": kept_heads,
        "heads_removed_fraction": 1 - kept_heads / shape.num_heads,
        "kv_heads_per_layer": kept_kv,
        "intermediate_size": shape.intermediate - plan.neurons_removed,
        "neurons_removed_fraction": plan.neurons_removed / shape.intermediate,
    }


def _update_config(model: "nn.Module", heads: int, kv_heads: int, head_dim: int, intermediate: int) -> None:
    config = model.config
    if architecture(model) == "gpt2":
        config.n_inner = intermediate
        if heads != config.n_head:
            setattr(config, HEADS_KEY, heads)
        return
    config.head_dim = head_dim
    config.num_attention_heads = heads
    config.num_key_value_heads = kv_heads
    config.intermediate_size = intermediate
    for layer in model.model.layers:
        layer.self_attn.num_key_value_groups = heads // kv_heads
        if hasattr(layer.self_attn, "num_heads"):
            layer.self_attn.num_heads = heads
