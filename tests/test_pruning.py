"""Magnitude and structured pruning on tiny GPT-2 and Llama models."""

from __future__ import annotations

import json

import pytest

from fastserve_cli.core.errors import UserError
from fastserve_cli.models.loader import load_causal_lm
from fastserve_cli.models.quantized import copy_side_files
from fastserve_cli.optimize.pruning import (
    blocks,
    calibrated_importance,
    magnitude_prune,
    measure_sparsity,
    plan_structured,
    prune_structured,
    shape_of,
    weight_importance,
)


def _ids(n: int = 2, length: int = 16):
    import torch

    return torch.randint(0, 400, (n, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_pruning_is_permanent_and_verified(tiny_model_dir, tmp_path, scope):
    model = load_causal_lm(tiny_model_dir)
    achieved = magnitude_prune(model, 0.6, scope)
    assert achieved["sparsity"] == pytest.approx(0.6, abs=0.01)
    if scope == "layer":
        assert achieved["min_layer_sparsity"] == pytest.approx(0.6, abs=0.01)
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert not [n for n, _ in model.named_parameters() if n.endswith(("_orig", "_mask"))]
    model.save_pretrained(tmp_path)
    copy_side_files(tiny_model_dir, tmp_path)
    assert measure_sparsity(load_causal_lm(tmp_path))["sparsity"] == pytest.approx(achieved["sparsity"])
    with pytest.raises(UserError, match="outside"):
        magnitude_prune(model, 1.0)


def _silence_units(model, heads: list[int], neurons: list[int]) -> None:
    """Zero every weight of some heads/neurons, so removing exactly them must not change the logits."""
    import torch

    shape = shape_of(model)
    arch = model.config.model_type
    with torch.no_grad():
        for block in blocks(model):
            out = getattr(block.attn, block.heads_out)
            for h in heads:
                cols = slice(h * shape.head_dim, (h + 1) * shape.head_dim)
                if arch == "gpt2":
                    out.weight[cols, :] = 0
                    for part in range(3):
                        start = part * shape.num_heads * shape.head_dim + h * shape.head_dim
                        block.attn.c_attn.weight[:, start : start + shape.head_dim] = 0
                        block.attn.c_attn.bias[start : start + shape.head_dim] = 0
                else:
                    out.weight[:, cols] = 0
                    block.attn.q_proj.weight[cols, :] = 0
            down = getattr(block.mlp, block.neurons_out)
            for n in neurons:
                if arch == "gpt2":
                    down.weight[n, :] = 0
                    block.mlp.c_fc.weight[:, n] = 0
                    block.mlp.c_fc.bias[n] = 0
                else:
                    down.weight[:, n] = 0
                    block.mlp.gate_proj.weight[n, :] = 0
                    block.mlp.up_proj.weight[n, :] = 0


def test_structured_pruning_removes_exactly_the_least_important_units(tiny_model_dir):
    """Silenced units score lowest under weight importance; removing them leaves the logits unchanged."""
    import torch

    model = load_causal_lm(tiny_model_dir)
    shape = shape_of(model)
    heads = [1] if shape.num_heads == shape.num_kv_heads else [1, 2]  # llama fixture: 4 heads in 2 kv groups
    _silence_units(model, heads, neurons=list(range(0, shape.intermediate, 4)))
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
    before = sum(p.numel() for p in model.parameters())
    plan = plan_structured(model, None, len(heads), 0.25)
    details = prune_structured(model, plan, *weight_importance(model))
    assert details["heads_per_layer"] == shape.num_heads - len(heads)
    assert details["intermediate_size"] == shape.intermediate * 3 // 4
    assert sum(p.numel() for p in model.parameters()) < before
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, expected, atol=1e-5)


@pytest.mark.parametrize("importance", ["activation", "gradient"])
def test_structured_pruning_round_trips_as_a_transformers_model(tiny_model_dir, tmp_path, importance):
    import torch
    from transformers import AutoModelForCausalLM

    model = load_causal_lm(tiny_model_dir)
    batches = [{"input_ids": ids, "labels": ids} for ids in _ids(3, 24).split(1)]
    heads, neurons = calibrated_importance(model, batches, importance)
    assert all(h.shape == (shape_of(model).num_heads,) and torch.isfinite(h).all() and h.sum() > 0 for h in heads)
    prune_structured(model, plan_structured(model, 0.5, None, 0.3), heads, neurons)
    assert not any(p.grad is not None for p in model.parameters())
    model.save_pretrained(tmp_path)
    copy_side_files(tiny_model_dir, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
        reloaded = load_causal_lm(tmp_path)
        assert torch.allclose(reloaded(ids).logits, expected, atol=1e-5)
    if config["model_type"] == "llama":  # a plain transformers config describes the pruned llama
        assert config["num_attention_heads"] == 2 and config["intermediate_size"] == 90
        plain = AutoModelForCausalLM.from_pretrained(tmp_path)
        with torch.no_grad():
            assert torch.allclose(plain(ids).logits, expected, atol=1e-5)
    else:  # gpt2: n_inner is plain config; the kept head count needs load_causal_lm
        assert config["n_inner"] == 179 and config["fastserve_attention_heads"] == 2
    assert reloaded.generate(ids[:1, :4], max_new_tokens=5, do_sample=False).shape == (1, 9)


def test_gpt2_mlp_only_pruning_loads_with_plain_from_pretrained(tiny_gpt2_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = load_causal_lm(tiny_gpt2_dir)
    prune_structured(model, plan_structured(model, None, None, 0.5), *weight_importance(model))
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.allclose(
            AutoModelForCausalLM.from_pretrained(tmp_path)(_ids()).logits, model(_ids()).logits, atol=1e-5
        )


def test_structured_bounds(tiny_model_dir):
    model = load_causal_lm(tiny_model_dir)
    with pytest.raises(UserError, match="only 4"):
        plan_structured(model, None, 4, None)
    with pytest.raises(UserError, match="only 4"):
        plan_structured(model, 0.9, None, None)
