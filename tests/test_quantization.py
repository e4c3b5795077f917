"""Torch int8/int4 variants: saved as safetensors + config, loaded by load_causal_lm, usable with a KV cache."""

from __future__ import annotations

import json

import pytest

from fastserve_cli.core.errors import UserError
from fastserve_cli.models.loader import load_causal_lm
from fastserve_cli.models.quantized import SCHEMES, quantize_model, save_quantized


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_variant_round_trips(tiny_model_dir, tmp_path, scheme):
    import torch
    from safetensors import safe_open
    from transformers import DynamicCache

    base = load_causal_lm(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir)
    modules = quantize_model(model, scheme, group_size=128)  # int4: 128 where the width allows, 64 elsewhere
    assert "lm_head" in modules and len(modules) >= 9  # 4 (gpt2) or 7 (llama) linears per layer, 2 layers, + lm_head
    save_quantized(model, scheme, modules, tiny_model_dir, tmp_path, {"group_size": 128})

    section = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert (tmp_path / "tokenizer.json").is_file() and not list(tmp_path.glob("*.bin"))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        stored = f.get_tensor("lm_head.weight" if "lm_head.weight" in names else "lm_head.weight_packed")
    # compressed-tensors, GPT-2 as its OPT equivalent (tests/test_ct_format.py loads them with transformers)
    assert section["quant_method"] == "compressed-tensors" and section["fastserve"]["scheme"] == scheme
    assert stored.dtype == (torch.int8 if scheme == "dynamic_int8" else torch.int32)

    loaded = load_causal_lm(tmp_path)
    ids = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference, in_memory, reloaded = base(ids).logits, model(ids).logits, loaded(ids).logits
    assert torch.equal(in_memory, reloaded)  # stored tensors are exactly what ran before saving
    relative = (reloaded - reference).norm() / reference.norm()
    assert relative < (0.2 if scheme == "weight_only_int4" else 0.03)  # int4 is symmetric (compressed-tensors W4A16)

    # Incremental decode with a DynamicCache matches the full forward, and generate() runs.
    with torch.no_grad():
        cache = DynamicCache(config=loaded.config)
        first = loaded(ids[:, :8], past_key_values=cache, use_cache=True)
        step = loaded(ids[:, 8:9], past_key_values=first.past_key_values, use_cache=True).logits[:, -1]
    assert torch.allclose(step, reloaded[:, 8], atol=0.05 * reloaded.abs().max().item())
    out = loaded.generate(ids[:1, :4], max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 10)


def test_quantized_weights_are_a_fraction_of_fp32(tiny_gpt2_dir, tmp_path):
    from fastserve_cli.models.measure import linear_weight_bytes, weight_bytes

    base = load_causal_lm(tiny_gpt2_dir)
    fp32 = linear_weight_bytes(base)
    model = load_causal_lm(tiny_gpt2_dir)
    save_quantized(model, "dynamic_int8", quantize_model(model, "dynamic_int8"), tiny_gpt2_dir, tmp_path)
    assert linear_weight_bytes(load_causal_lm(tmp_path)) < 0.3 * fp32
    assert weight_bytes(tmp_path) < weight_bytes(tiny_gpt2_dir)


def test_load_errors_are_user_errors(tmp_path, tiny_gpt2_dir):
    with pytest.raises(UserError, match="not a model directory"):
        load_causal_lm(tmp_path)
    model = load_causal_lm(tiny_gpt2_dir)
    save_quantized(model, "dynamic_int8", quantize_model(model, "dynamic_int8"), tiny_gpt2_dir, tmp_path)
    with pytest.raises(UserError, match="CPU only"):
        load_causal_lm(tmp_path, device="cuda")


def test_dynamic_int8_linear_wide_inputs_take_onednn_with_the_same_result():
    """From ONEDNN_MIN_ROWS rows the layer runs oneDNN's kernel; both kernels compute the same quantized matmul."""
    import torch

    from fastserve_cli.models.quant_linear import ONEDNN_MIN_ROWS, DynamicInt8Linear

    torch.manual_seed(0)
    weight = torch.randn(48, 64) * 0.05
    scale = weight.abs().amax(1) / 127
    q = torch.clamp((weight / scale[:, None]).round(), -127, 127).to(torch.int8)
    layer = DynamicInt8Linear(q, scale, torch.randn(48))
    if layer._packed_rows is None:
        pytest.skip("torch has no oneDNN quantized engine here")
    x = torch.randn(2, ONEDNN_MIN_ROWS, 64)
    exact = x @ (q.float() * scale[:, None]).t() + layer.bias
    wide = layer(x)
    narrow = torch.cat([layer(x[:, i : i + 1]) for i in range(x.shape[1])], dim=1)  # one row at a time: fbgemm
    assert wide.shape == exact.shape
    torch.testing.assert_close(wide, exact, atol=0.05, rtol=0.05)
    torch.testing.assert_close(wide, narrow, atol=0.05, rtol=0.05)
