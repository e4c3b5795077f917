"""Kernel swaps: the same math through faster kernels, for training (the idea behind Liger kernels) and serving.

On a CPU the matmuls of a small model already run near peak; what is left is elementwise traffic over
the two largest activations of a step:
- GPT-2's `gelu_new` is written out in Python (pow, mul, add, tanh: ~7 forward and ~10 backward passes
  over batch x seq x 4*width). `F.gelu(approximate="tanh")` is the same function in one pass each way.
- The loss materializes batch x seq x vocab logits, then log-softmax, then a dense gradient of the same
  size. `linear_cross_entropy` computes logits, loss and both gradients chunk by chunk, so a chunk's
  logits stay in cache and are never stored for the backward.

Neither changes the model's parameters, config or saved files; `train.fused_kernels: false` turns both off.

For serving on a CPU, `onednn_linears` runs every fp32 Linear (and GPT-2's Conv1D) through oneDNN with the
weight packed once at load (the ops inductor's CPU freezing uses). torch's default fp32 path is MKL sgemm,
which is slow for decode shapes (a few rows against a large weight): on this 2-core machine a
768 x 3072 layer takes 955 us at 16 rows through MKL and 387 us packed; the 50257-wide head 28 vs 9 ms
(`serve.fast_kernels: false` turns it off). bf16 layers are packed the same way on CPUs with native bf16
(avx512_bf16/AMX): torch's own bf16 Linear re-reads an unpacked weight each call and measured 1.5-3x slower
than the packed one on decode shapes here (numbers in docs/perf.md).
`decode_attention` computes fp32 single-query (decode) attention of large batches with two batched matmuls and a
softmax instead of SDPA's CPU flash kernel, which is built for long query blocks: at batch 64 and 1 thread the
plain math took 0.58 vs 1.10 ms per layer at 40 keys, 11.5 vs 12.8 ms at 300 (small batches keep SDPA:
`MATH_ATTENTION_MIN_ROWS`). Prefills keep SDPA, and so does bf16: there the
math was 3-5x faster too, but torch's CPU bf16 matmul rounds the scores to bf16 (SDPA accumulates them in
fp32), which cost greedy agreement with fp32 (tests/test_serve_bf16.py).
oneDNN builds and caches one kernel (~0.65 MB) per distinct row count, in two caches of 1024 entries each
by default: a server that saw every prompt length grew by ~250 MB on a 2-layer model in its first minute.
So the packed layers pad their rows to a small set of sizes (`onednn_padded_rows`) and `onednn_linears`
bounds both caches to `ONEDNN_CACHE_ENTRIES` (unless the environment already sets them).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any, Iterator

from fastserve_cli.core.batches import IGNORE_INDEX

# Model types whose logits are exactly lm_head(final hidden state): no soft-capping or logit scaling.
LINEAR_HEAD_MODEL_TYPES = {"gpt2", "llama", "mistral", "qwen2", "qwen3"}

# oneDNN kernel-cache entries (ideep's LRU_CACHE_CAPACITY and oneDNN's primitive cache): ~170 MB at most.
ONEDNN_CACHE_ENTRIES = 256

# Elements of one chunk's logits (16 MB of fp32): about half of this CPU's L3.
CHUNK_ELEMENTS = 4 * 2**20


def fuse_activations(model) -> int:
    """Replace Python-composed tanh-GELUs with torch's fused one; returns how many were replaced."""
    import torch
    from transformers.activations import NewGELUActivation

    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, NewGELUActivation):
                setattr(module, name, torch.nn.GELU(approximate="tanh"))
                replaced += 1
    return replaced


def onednn_linears(model) -> int:
    """Swap fp32 (and, with native bf16, bf16) CPU Linear/Conv1D layers for `OneDnnLinear`; returns how many were
    swapped (0 without oneDNN).

    Exact types only: quantized, weight-only-int and other Linear subclasses keep their own kernels.
    Inference only (the swapped layers have no trainable parameters). A head tied to the input embedding
    gets its own packed copy of the weight; the embedding keeps the dense one.
    """
    import torch
    from transformers.pytorch_utils import Conv1D

    bound_onednn_caches()
    if not _onednn_linear_works():
        return 0
    layer_class = _onednn_linear_class()
    dtypes = (torch.float32, torch.bfloat16) if _onednn_bf16_linear_works() else (torch.float32,)
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            kind = type(child)
            if (
                kind not in (torch.nn.Linear, Conv1D)
                or child.weight.dtype not in dtypes
                or child.weight.device.type != "cpu"
            ):
                continue
            weight = child.weight.detach().t() if kind is Conv1D else child.weight.detach()  # Conv1D stores [in, out]
            setattr(module, name, layer_class(weight, None if child.bias is None else child.bias.detach()))
            swapped += 1
    return swapped


def fuse_linear_gelu(model) -> int:
    """Fold a GPT-2-style MLP's GELU into the packed linear before it (oneDNN post-op), so the 4x-wide
    activation is written once instead of written, read and written again; returns how many were fused.
    Needs `onednn_linears` and `fuse_activations` first (a packed `c_fc` followed by torch's GELU)."""
    import torch

    layer_class = _onednn_linear_class()
    fused = 0
    for module in list(model.modules()):
        fc, act = getattr(module, "c_fc", None), getattr(module, "act", None)
        if isinstance(fc, layer_class) and isinstance(act, torch.nn.GELU) and fc.post is None:
            if _onednn_gelu_works(fc.weight.dtype):
                fc.post = ("gelu", "tanh" if act.approximate == "tanh" else "none")
                module.act = torch.nn.Identity()
                fused += 1
    return fused


@functools.cache
def _onednn_gelu_works(dtype) -> bool:
    import torch

    try:
        weight, x = torch.randn(8, 4).to(dtype), torch.randn(3, 4).to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "gelu", [], "tanh")
        want = torch.nn.functional.gelu((x @ weight.t()).float(), approximate="tanh")
        return bool(torch.allclose(y.float(), want, rtol=2e-2, atol=2e-2))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@functools.cache
def _onednn_linear_works() -> bool:
    """The packed-weight ops are torch internals (what inductor's CPU freezing uses): check they run here."""
    import torch

    try:
        if not torch.backends.mkldnn.is_available():
            return False
        weight, x = torch.randn(8, 4), torch.randn(3, 4)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return bool(torch.allclose(y, x @ weight.t(), rtol=1e-4, atol=1e-5))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@functools.cache
def _onednn_bf16_linear_works() -> bool:
    """Packed bf16 matmuls only where the CPU has bf16 dot products (elsewhere oneDNN emulates them)."""
    import torch

    from fastserve_cli.models.precision import cpu_supports_bf16

    if not cpu_supports_bf16():
        return False
    try:
        weight, x = torch.randn(8, 4).bfloat16(), torch.randn(3, 4).bfloat16()
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return bool(torch.allclose(y.float(), (x @ weight.t()).float(), rtol=2e-2, atol=2e-2))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def onednn_padded_rows(rows: int) -> int:
    """The row count a packed matmul runs with: exact up to 16 (decode batches), then a multiple of 4 up
    to 64 and of 16 beyond (prefills), so a layer needs ~30 kernels up to 512 tokens instead of 512."""
    if rows <= 16:
        return rows
    step = 4 if rows <= 64 else 16
    return -(-rows // step) * step


def bound_onednn_caches(entries: int = ONEDNN_CACHE_ENTRIES) -> None:
    """Cap oneDNN's kernel caches; both read these variables at their first use, so call it before that."""
    import os

    for name in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(entries))


@functools.cache
def _onednn_linear_class():
    import torch

    class OneDnnLinear(torch.nn.Module):
        """y = x @ weight.T + bias through oneDNN, with the weight [out, in] packed once for it."""

        def __init__(self, weight, bias) -> None:
            super().__init__()
            self.in_features, self.out_features = int(weight.shape[1]), int(weight.shape[0])
            self.register_buffer(
                "weight", torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None), persistent=False
            )
            self.register_buffer("bias", None if bias is None else bias.contiguous(), persistent=False)
            self.post: tuple[str, str] | None = None  # a fused activation: (oneDNN post-op, its algorithm)

        def forward(self, x):
            flat = x.reshape(-1, self.in_features)
            rows = flat.shape[0]
            padded = onednn_padded_rows(rows)
            if padded > rows:
                flat = torch.nn.functional.pad(flat, (0, 0, 0, padded - rows))
            attr, algorithm = self.post or ("none", "")
            y = torch.ops.mkldnn._linear_pointwise(flat, self.weight, self.bias, attr, [], algorithm)
            return y[:rows].view(*x.shape[:-1], self.out_features)

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    return OneDnnLinear


DECODE_ATTENTION = "fastserve_decode_sdpa"

# Below this many (sequence, head) rows a decode step keeps SDPA: one parallel region instead of four (two matmuls,
# mask, softmax), which is what costs at small batches -- each region wakes the OpenMP threads, ~40 us apiece
# under OMP_WAIT_POLICY=PASSIVE (batch 1, 12 heads, 64 keys, 2 threads: SDPA 41 us, the matmuls 136 us; with
# spinning threads 8.5 vs 20 us). At batch 64 the matmuls win (515 vs 735 us).
MATH_ATTENTION_MIN_ROWS = 32 * 12


def decode_attention(model) -> int:
    """Route a model's SDPA attention through `_decode_attention` (single-query steps) and SDPA (the rest);
    returns 1 when switched, 0 for models on another attention implementation (eager, flash, ...) or not in fp32."""
    import torch

    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return 0
    if any(p.dtype != torch.float32 for p in model.parameters()):
        return 0  # bf16/fp16 scores would be rounded by the matmul (see the module docstring)
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(DECODE_ATTENTION, _decode_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(DECODE_ATTENTION, sdpa_mask)  # the same boolean masks as SDPA
    for sub in {id(c): c for c in (config, *(getattr(m, "config", None) for m in model.modules())) if c}.values():
        if getattr(sub, "_attn_implementation", None) == "sdpa":
            sub._attn_implementation = DECODE_ATTENTION
    return 1


def _decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """softmax(q k^T * scale + mask) v for one fp32 query row per sequence; grouped-query heads
    share their key/value head by folding the group into the query rows (no repeat of the cache)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    if (
        q_len != 1
        or batch * heads < MATH_ATTENTION_MIN_ROWS
        or query.dtype != torch.float32
        or module.training
        or kwargs.get("position_bias") is not None
        or kwargs.get("softcap")
    ):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    group = heads // kv_heads
    q = query.reshape(batch, kv_heads, group, dim)
    scores = torch.matmul(q, key.transpose(-1, -2)) * (scaling if scaling is not None else dim**-0.5)
    if attention_mask is not None:  # [batch or 1, 1, 1, keys]: shared by every head
        mask = attention_mask[:, :, -1:, :]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, value).reshape(batch, heads, 1, dim)
    return out.transpose(1, 2).contiguous(), None


def supports_fused_loss(model) -> bool:
    """True for plain (not peft-wrapped) models whose head is a bias-free Linear applied to the last hidden state."""
    import torch

    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return (
        config is not None
        and getattr(config, "model_type", None) in LINEAR_HEAD_MODEL_TYPES
        and isinstance(head, torch.nn.Linear)
        and head.bias is None
        and not getattr(config, "final_logit_softcapping", None)
    )


@contextmanager
def head_bypassed(model) -> Iterator[Any]:
    """Within the block the model's forward returns final hidden states as `logits`; yields the real head."""
    import torch

    head = model.get_output_embeddings()
    model.set_output_embeddings(torch.nn.Identity())
    try:
        yield head
    finally:
        model.set_output_embeddings(head)


@functools.cache
def _linear_cross_entropy_function():
    """The autograd.Function, defined on first use (keeps `import fastserve_cli.models.kernels` free of torch)."""
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, targets, chunk: int):
            rows = hidden.shape[0]
            grad_hidden = torch.empty_like(hidden)
            # The weight gradient sums over every chunk: in fp32 even for bf16 inputs.
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            exact = weight.dtype == torch.float32
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, rows, chunk):
                h, t = hidden[start : start + chunk], targets[start : start + chunk]
                logits = (h @ weight.t()).float()
                valid = t != IGNORE_INDEX
                safe = torch.where(valid, t, torch.zeros_like(t))
                lse = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, safe[:, None]).squeeze(1)
                total += ((lse - picked) * valid).sum()
                # d(loss)/d(logits) = softmax - onehot, zero on ignored rows; computed in place.
                grad = logits.sub_(lse[:, None]).clamp_(min=-80.0).exp_()  # no denormals (slow on CPUs)
                grad.scatter_add_(1, safe[:, None], torch.full_like(picked[:, None], -1.0))
                grad.mul_(valid[:, None].to(grad.dtype))
                grad = grad.to(hidden.dtype)
                grad_hidden[start : start + chunk] = grad @ weight
                if exact:
                    grad_weight.addmm_(grad.t(), h)
                else:
                    grad_weight.add_(grad.t() @ h)
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
            return total

        @staticmethod
        def backward(ctx, grad_output):
            grad_hidden, grad_weight = ctx.saved_tensors
            return grad_hidden * grad_output, grad_weight * grad_output, None, None

    return LinearCrossEntropy


def linear_cross_entropy(hidden, weight, labels, chunk_rows: int | None = None, dtype=None):
    """Summed next-token cross-entropy of `hidden @ weight.T` against `labels` shifted by one.

    hidden: [batch, seq, width]; weight: [vocab, width]; labels: [batch, seq] with -100 = ignored.
    Equals `summed_token_loss(hidden @ weight.T, labels)`, value and gradients, without storing the logits.
    With `dtype` (bf16 mixed precision) both operands are cast to it for the matmuls; the log-softmax, the
    loss and the weight gradient's sum stay fp32, and autograd casts the gradients back to the inputs' dtypes.
    """
    import torch.nn.functional as F

    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()
    flat = hidden.flatten(0, 1)
    if dtype is not None:
        flat, weight = flat.to(dtype), weight.to(dtype)
    chunk = chunk_rows or max(64, CHUNK_ELEMENTS // weight.shape[0])
    return _linear_cross_entropy_function().apply(flat, weight, targets, chunk)
