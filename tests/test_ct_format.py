"""Quantized variants in the compressed-tensors format: stock transformers (+ compressed-tensors) loads what
optimize writes, and agrees with our loader's fast CPU kernels on the same files."""

from __future__ import annotations

import json

import pytest

from fastserve_cli.models.loader import load_causal_lm
from fastserve_cli.models.quantized import SCHEMES, QuantLinear, quantize_model, save_quantized


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer_dir):
    from conftest import make_tiny_model

    return make_tiny_model("llama", tiny_tokenizer_dir, tmp_path_factory.mktemp("ct-llama"))


def _quantized_dir(src, out, scheme):
    model = load_causal_lm(src)
    modules = quantize_model(model, scheme, group_size=128)  # llama: 64-wide layers get groups of 64
    save_quantized(model, scheme, modules, src, out, {"group_size": 128} if scheme == "weight_only_int4" else {})
    return model


@pytest.mark.parametrize("scheme", SCHEMES)
def test_transformers_loads_our_variant_and_agrees(tiny_llama_dir, tmp_path, scheme):
    import torch
    from transformers import AutoModelForCausalLM

    pytest.importorskip("compressed_tensors")
    in_memory = _quantized_dir(tiny_llama_dir, tmp_path, scheme)
    section = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert section["quant_method"] == "compressed-tensors" and section["fastserve"]["scheme"] == scheme

    ours = load_causal_lm(tmp_path)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert isinstance(ours.lm_head, QuantLinear)  # our kernels, not a dense fallback
    ids = torch.randint(0, 400, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine, theirs = ours(ids).logits, stock(ids).logits
        assert torch.equal(mine, in_memory(ids).logits)  # the file holds exactly what ran before saving
    # Same weights; the arithmetic differs (fbgemm per-tensor activations / bf16 int4 kernel vs fp32 fake-quant).
    assert (mine - theirs).norm() / theirs.norm() < 0.04
    assert (mine.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.9
    if scheme != "weight_only_int4":  # the bf16 int4 kernel can flip near-ties of a random model's logits
        prompt = ids[:1, :6]
        assert torch.equal(
            ours.generate(prompt, max_new_tokens=12, do_sample=False),
            stock.generate(prompt, max_new_tokens=12, do_sample=False),
        )


def test_packing_matches_compressed_tensors():
    import torch

    from fastserve_cli.models.ct_format import pack_int32, unpack_int32

    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    for bits, low, high in ((4, -8, 8), (8, -128, 128)):
        values = torch.randint(low, high, (24, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(bits))
        packed = pack_int32(values, bits)
        assert torch.equal(packed, helpers.pack_to_int32(values, bits))
        assert torch.equal(unpack_int32(packed, bits).to(torch.int16) - (1 << (bits - 1)), values.to(torch.int16))


def test_gpt2_conv1d_keeps_the_fastserve_format(tiny_gpt2_dir, tmp_path):
    import torch

    _quantized_dir(tiny_gpt2_dir, tmp_path, "weight_only_int4")
    section = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert section["quant_method"] == "fastserve"  # compressed-tensors cannot quantize transformers' Conv1D
    model = load_causal_lm(tmp_path)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == model.config.vocab_size


def test_unsupported_compressed_tensors_scheme_is_a_user_error(tiny_llama_dir, tmp_path):
    from fastserve_cli.core.errors import UserError

    _quantized_dir(tiny_llama_dir, tmp_path, "weight_only_int8")
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 6
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="no fastserve CPU kernel"):
        load_causal_lm(tmp_path)
