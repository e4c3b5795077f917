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
@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_transformers_loads_our_variant_and_agrees(tiny_llama_dir, tiny_gpt2_dir, tmp_path, scheme, architecture):
    import torch
    from transformers import AutoModelForCausalLM

    pytest.importorskip("compressed_tensors")
    src = tiny_llama_dir if architecture == "llama" else tiny_gpt2_dir
    in_memory = _quantized_dir(src, tmp_path, scheme)
    config = json.loads((tmp_path / "config.json").read_text())
    section = config["quantization_config"]
    assert section["quant_method"] == "compressed-tensors" and section["fastserve"]["scheme"] == scheme
    assert config["model_type"] == ("opt" if architecture == "gpt2" else "llama")  # GPT-2 as OPT: gpt2_ct.py

    ours = load_causal_lm(tmp_path)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert isinstance(ours.lm_head, QuantLinear)  # our kernels, not a dense fallback
    assert ours.config.model_type == architecture  # a GPT-2 comes back as GPT-2 for serving and export
    ids = torch.randint(0, 400, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine, theirs = ours(ids).logits, stock(ids).logits
        assert torch.equal(mine, in_memory(ids).logits)  # the file holds exactly what ran before saving
    # Same weights; the arithmetic differs (fbgemm per-tensor activations / bf16 int4 kernel vs fp32 fake-quant).
    assert (mine - theirs).norm() / theirs.norm() < 0.04
    assert (mine.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.9
    # The bf16 int4 kernel can flip near-ties of the random llama's logits; the tiny GPT-2's have none.
    if scheme != "weight_only_int4" or architecture == "gpt2":
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


def test_gpt2_to_opt_is_the_same_function(tiny_gpt2_dir):
    """The fp32 mapping alone: OPT with GPT-2's weights gives GPT-2's logits, and maps back bit for bit."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    from fastserve_cli.models import gpt2_ct

    gpt2 = load_causal_lm(tiny_gpt2_dir)
    state = {k: v.clone() for k, v in gpt2.state_dict().items()}
    tensors, config = gpt2_ct.to_opt(state, gpt2.config.to_dict(), quantized=set())
    opt = OPTForCausalLM(OPTConfig.from_dict(config)).eval()
    missing, unexpected = opt.load_state_dict(tensors, strict=False)
    assert not unexpected and not missing
    ids = torch.randint(0, 400, (3, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(opt(ids).logits, gpt2(ids).logits, atol=1e-5, rtol=1e-4)
    back, quantized = gpt2_ct.from_opt(tensors)
    assert quantized == [] and back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_gptq_gpt2_variant_loads_in_transformers_and_agrees(tiny_gpt2_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from fastserve_cli.optimize.gptq import gptq_model

    pytest.importorskip("compressed_tensors")
    model = load_causal_lm(tiny_gpt2_dir)
    generator = torch.Generator().manual_seed(3)
    batches = [{"input_ids": torch.randint(0, 400, (1, 64), generator=generator)} for _ in range(8)]
    modules = gptq_model(model, batches, group_size=32)
    assert "transformer.h.0.attn.c_attn" in modules and "lm_head" in modules
    save_quantized(model, "weight_only_int4", modules, tiny_gpt2_dir, tmp_path, {"method": "gptq", "group_size": 32})
    ours = load_causal_lm(tmp_path)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompt = torch.randint(0, 400, (1, 6), generator=generator)
    assert torch.equal(
        ours.generate(prompt, max_new_tokens=12, do_sample=False),
        stock.generate(prompt, max_new_tokens=12, do_sample=False),
    )


def test_gpt2_with_layers_left_in_fp32_loads_in_transformers(tmp_path):
    """48 wide: no int4 group divides it, so only mlp.c_proj (192 in) is quantized; the dense Conv1D layers
    become OPT Linears in the file, listed in `ignore` under their OPT names."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    pytest.importorskip("compressed_tensors")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=48, n_head=4, vocab_size=300, n_positions=64)).save_pretrained(
        tmp_path / "src"
    )
    model = load_causal_lm(tmp_path / "src")
    modules = quantize_model(model, "weight_only_int4", 128)
    assert modules == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
    save_quantized(model, "weight_only_int4", modules, tmp_path / "src", tmp_path, {"group_size": 128})
    section = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert "model.decoder.layers.0.self_attn.q_proj" in section["ignore"] and "lm_head" in section["ignore"]
    ours = load_causal_lm(tmp_path)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompt = torch.tensor([[3, 1, 4, 1, 5, 9]])
    with torch.no_grad():
        assert torch.equal(ours(prompt).logits, model(prompt).logits)
    assert torch.equal(
        ours.generate(prompt, max_new_tokens=10, do_sample=False),
        stock.generate(prompt, max_new_tokens=10, do_sample=False),
    )


def test_gpt2_without_an_opt_equivalent_keeps_the_fastserve_format(tiny_gpt2_dir, tmp_path):
    """scale_attn_by_inverse_layer_idx has no OPT counterpart: the variant stays in fastserve's format."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fastserve_cli.models.gpt2_ct import unmappable

    config = AutoConfig.from_pretrained(tiny_gpt2_dir)
    config.scale_attn_by_inverse_layer_idx = True
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir, config=config).eval()
    assert "scale_attn_by_inverse_layer_idx" in unmappable(model.config.to_dict())
    modules = quantize_model(model, "weight_only_int8")
    save_quantized(model, "weight_only_int8", modules, tiny_gpt2_dir, tmp_path)
    section = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert section["quant_method"] == "fastserve"
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(load_causal_lm(tmp_path)(ids).logits, model(ids).logits)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_gpt2_directories_of_the_old_format_still_load(tiny_gpt2_dir, tmp_path, scheme):
    """Variants written before issue 20 (quant_method: fastserve) load as they did."""
    import torch

    from fastserve_cli.models.quantized import copy_side_files, save_fastserve

    model = load_causal_lm(tiny_gpt2_dir)
    modules = quantize_model(model, scheme, group_size=128)
    save_fastserve(model, scheme, modules, tmp_path)
    copy_side_files(tiny_gpt2_dir, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant_method"] == "fastserve"
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(load_causal_lm(tmp_path)(ids).logits, model(ids).logits)


def test_unsupported_compressed_tensors_scheme_is_a_user_error(tiny_llama_dir, tmp_path):
    from fastserve_cli.core.errors import UserError

    _quantized_dir(tiny_llama_dir, tmp_path, "weight_only_int8")
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 6
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="no fastserve CPU kernel"):
        load_causal_lm(tmp_path)
