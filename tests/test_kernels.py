"""The kernel swaps compute the same function (and, for training, gradients) as the code they replace."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from fastserve_cli.models.kernels import (
    decode_attention,
    fuse_activations,
    fuse_linear_gelu,
    head_bypassed,
    linear_cross_entropy,
    onednn_linears,
    onednn_padded_rows,
    supports_fused_loss,
)
from fastserve_cli.testing.models import TINY, gpt2_config, tiny_llama_config
from fastserve_cli.train.loop import summed_token_loss


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(
        gpt2_config(TINY, positions=64, vocab_size=96, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    )


@pytest.mark.parametrize("chunk_rows", [7, 64, None])
def test_linear_cross_entropy_matches_reference(chunk_rows):
    torch.manual_seed(0)
    hidden = torch.randn(3, 21, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    labels = torch.randint(0, 40, (3, 21))
    labels[0, 4:9] = -100  # ignored tokens inside a row
    labels[2] = -100  # and a whole row
    ref = summed_token_loss(hidden @ weight.t(), labels)
    ref.backward(torch.tensor(0.25))
    ref_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    out = linear_cross_entropy(hidden, weight, labels, chunk_rows=chunk_rows)
    out.backward(torch.tensor(0.25))
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(hidden.grad, ref_grads[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weight.grad, ref_grads[1], rtol=1e-4, atol=1e-5)


def test_linear_cross_entropy_in_bf16_matches_bf16_reference():
    """bf16 mixed precision: bf16 matmuls, fp32 loss, gradients back in the fp32 inputs' dtype."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 33, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 33))
    labels[1, :5] = -100
    ref = summed_token_loss(hidden.bfloat16() @ weight.bfloat16().t(), labels)
    ref.backward()
    ref_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    out = linear_cross_entropy(hidden, weight, labels, chunk_rows=8, dtype=torch.bfloat16)
    out.backward()
    assert out.dtype == torch.float32 and out.item() == pytest.approx(ref.item(), rel=1e-3)
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32
    torch.testing.assert_close(hidden.grad, ref_grads[0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(weight.grad, ref_grads[1], rtol=2e-2, atol=2e-2)


def test_peaked_logits_stay_finite():
    """Confident predictions push exp() toward denormals; the loss and gradients must stay exact."""
    hidden = torch.full((1, 4, 8), 30.0, requires_grad=True)
    weight = torch.eye(8)[:, :8].repeat(2, 1).requires_grad_()
    labels = torch.tensor([[0, 1, 2, 3]])
    out = linear_cross_entropy(hidden, weight, labels)
    out.backward()
    ref = summed_token_loss(hidden.detach() @ weight.detach().t(), labels)
    assert torch.isfinite(out) and out.item() == pytest.approx(ref.item(), abs=1e-4)
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()


def test_fused_model_step_matches_plain_model():
    """Fused GELU + bypassed head + chunked loss: same loss and parameter gradients as the plain model."""
    plain, fused = tiny_gpt2(), tiny_gpt2()
    assert fuse_activations(fused) == 2
    ids = torch.randint(0, 96, (2, 32))
    loss_plain = summed_token_loss(plain(input_ids=ids).logits, ids)
    loss_plain.backward()
    with head_bypassed(fused) as head:
        hidden = fused(input_ids=ids).logits
    assert hidden.shape == (2, 32, 64)
    loss_fused = linear_cross_entropy(hidden, head.weight, ids, chunk_rows=16)
    loss_fused.backward()
    assert fused.get_output_embeddings() is head  # restored after the forward
    assert loss_fused.item() == pytest.approx(loss_plain.item(), rel=1e-5)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_fused_activations_leave_saved_model_unchanged(tmp_path):
    model = tiny_gpt2()
    fuse_activations(model)
    model.save_pretrained(tmp_path)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path)
    assert reloaded.config.activation_function == "gelu_new"
    ids = torch.randint(0, 96, (1, 16))
    torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_supported_models():
    assert supports_fused_loss(tiny_gpt2())
    llama = LlamaForCausalLM(
        LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=50)
    )
    assert supports_fused_loss(llama)
    gemma_like = tiny_gpt2()
    gemma_like.config.model_type = "gemma2"  # soft-capped logits: not a plain linear head
    assert not supports_fused_loss(gemma_like)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(positions=64, vocab_size=96))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_onednn_linears_same_logits_and_greedy_tokens(make):
    """Every Linear/Conv1D is swapped (GPT-2: 4 per block + the tied head); logits and greedy generation match."""
    model, swapped_model = make().eval(), make().eval()
    swapped = onednn_linears(swapped_model)
    blocks = model.config.num_hidden_layers
    assert swapped == blocks * (4 if model.config.model_type == "gpt2" else 7) + 1
    assert not any(type(m) is torch.nn.Linear for m in swapped_model.modules())
    ids = torch.randint(0, 96, (2, 19))
    with torch.inference_mode():
        torch.testing.assert_close(swapped_model(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)
        want = model.generate(ids[:1], max_new_tokens=12, do_sample=False)
        assert torch.equal(swapped_model.generate(ids[:1], max_new_tokens=12, do_sample=False), want)
    assert swapped_model.get_input_embeddings().weight.layout == torch.strided  # the embedding keeps its dense weight


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_decode_attention_same_decode_logits_with_padding(make, monkeypatch):
    """The single-query path (grouped-query heads included) gives SDPA's logits on a left-padded batch."""
    from transformers import DynamicCache

    from fastserve_cli.models import kernels
    from fastserve_cli.models.compat import cache_kwargs

    monkeypatch.setattr(kernels, "MATH_ATTENTION_MIN_ROWS", 1)  # this small batch would keep SDPA otherwise

    model, switched = make().eval(), make().eval()
    assert decode_attention(switched) == 1
    ids = torch.randint(0, 96, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding on one row
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    step = torch.randint(0, 96, (3, 1))
    full = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
    with torch.inference_mode():
        outs = []
        for m in (model, switched):
            cache = DynamicCache()
            m(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **cache_kwargs(m, cache))
            pos = positions[:, -1:] + 1
            outs.append(m(input_ids=step, attention_mask=full, position_ids=pos, **cache_kwargs(m, cache)).logits)
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
        want = model.generate(ids[1:2], max_new_tokens=12, do_sample=False)
        assert torch.equal(switched.generate(ids[1:2], max_new_tokens=12, do_sample=False), want)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_gelu_folded_into_the_packed_linear_same_logits():
    """GPT-2's MLP GELU runs as the packed c_fc's post-op: one per block, the same logits; llama has none."""
    model, fused_model = tiny_gpt2().eval(), tiny_gpt2().eval()
    onednn_linears(fused_model)
    fuse_activations(fused_model)
    assert fuse_linear_gelu(fused_model) == model.config.n_layer
    assert all(isinstance(block.mlp.act, torch.nn.Identity) for block in fused_model.transformer.h)
    assert fuse_linear_gelu(fused_model) == 0  # already folded
    ids = torch.randint(0, 96, (2, 19))
    with torch.inference_mode():
        torch.testing.assert_close(fused_model(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)
    llama = tiny_llama().eval()
    onednn_linears(llama)
    assert fuse_linear_gelu(llama) == 0


def test_onednn_linears_leaves_quantized_layers_alone():
    model = tiny_llama().eval()
    quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    assert onednn_linears(quantized) == 0


def test_onednn_padded_rows_bounds_kernel_count_and_waste():
    """oneDNN caches a kernel per row count: padded sizes stay few, and padding wastes little."""
    sizes = {onednn_padded_rows(rows) for rows in range(1, 513)}
    assert len(sizes) <= 16 + 12 + 28
    for rows in range(1, 2049):
        padded = onednn_padded_rows(rows)
        assert rows <= padded <= rows + (0 if rows <= 16 else 3 if rows <= 64 else 15)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("rows", [1, 17, 63, 100, 257])
def test_onednn_linear_padded_rows_give_the_same_result(rows):
    layer = torch.nn.Linear(32, 48)
    swapped = torch.nn.Sequential(torch.nn.Linear(32, 48))
    swapped[0].load_state_dict(layer.state_dict())
    assert onednn_linears(swapped) == 1
    x = torch.randn(rows, 32)
    with torch.inference_mode():
        torch.testing.assert_close(swapped(x), layer(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(swapped(x.view(1, rows, 32)), layer(x).view(1, rows, 48), rtol=1e-4, atol=1e-5)
