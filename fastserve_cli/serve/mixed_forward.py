"""One forward for an iteration's decode batch and a prefill chunk (GPT-2 models on the torch backend).

Why: with chunked prefill an iteration runs the running streams' decode step and the long prompt's next
chunk. As two model calls, each reads every weight matrix once, and on a CPU a small model's step is bound
by exactly that read: a 16-token chunk cost as much as the 8-stream decode step beside it, so the streams'
inter-token latency doubled whatever the chunk size. Here the decode rows and the chunk's tokens go through
every Linear (and layer norm, GELU, residual add) as one [rows + chunk, width] matrix, as vLLM flattens an
iteration's tokens; only attention runs per part, each against its own KV cache:
- the decode rows against the pack (one query each, the pack's padding mask);
- the chunk against its request's cache (causal, offset by the tokens already cached).
Attention goes through the same interface and function the model itself would use (`_attn_implementation`:
SDPA, or fastserve's fp32 decode attention), and the caches are the backend's own growable caches, so the
result equals the two separate calls up to float rounding (tests compare them).

Only the GPT-2 architecture has this path (the architecture every stage builds by default); other models
run the two calls.
"""

from __future__ import annotations

from typing import Any


def supports_mixed_forward(model) -> bool:
    """A GPT-2 LM with its plain self-attention blocks and an attention function that takes boolean masks."""
    from fastserve_cli.models.kernels import DECODE_ATTENTION

    config = getattr(model, "config", None)
    return (
        config is not None
        and config.model_type == "gpt2"
        and hasattr(model, "transformer")
        and hasattr(model, "lm_head")
        and not getattr(config, "add_cross_attention", False)
        and config._attn_implementation in ("sdpa", DECODE_ATTENTION)
    )


def chunk_mask(past: int, new: int, device):
    """Boolean [1, 1, new, past + new]: query i sees the cached `past` keys and the chunk's keys up to its own;
    None with no past (SDPA then runs its causal kernel without a mask, as the model's own call does)."""
    import torch

    if past == 0:
        return None
    return torch.ones(new, past + new, dtype=torch.bool, device=device).tril(diagonal=past)[None, None]


def decode_mask(mask):
    """The decode rows' boolean [B, 1, 1, keys] mask from the pack's 0/1 [B, keys] one; None without padding."""
    return None if bool(mask.all()) else mask.bool()[:, None, None, :]


def mixed_forward(model, parts: list[tuple[Any, Any, Any, Any]]) -> list[Any]:
    """`parts` are (input ids [B, q], position ids [B, q], cache, boolean attention mask or None), e.g. the
    decode rows (q = 1) and a prefill chunk (B = 1); each cache grows by its part's tokens.
    -> per part, the logits of each row's last position [B, V], float32."""
    import torch
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.gpt2.modeling_gpt2 import eager_attention_forward

    body = model.transformer
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(model.config._attn_implementation, eager_attention_forward)
    shapes = [tuple(ids.shape) for ids, *_ in parts]
    with torch.inference_mode():
        ids = torch.cat([part[0].reshape(-1) for part in parts])
        positions = torch.cat([part[1].reshape(-1) for part in parts])
        hidden = body.wte(ids) + body.wpe(positions)
        for layer, block in enumerate(body.h):
            attn = block.attn
            query, key, value = attn.c_attn(block.ln_1(hidden)).split(attn.split_size, dim=-1)
            outputs, start = [], 0
            for (rows, q_len), (_, _, cache, mask) in zip(shapes, parts):
                size = rows * q_len
                q, k, v = (
                    t[start : start + size].reshape(rows, q_len, -1, attn.head_dim).transpose(1, 2)
                    for t in (query, key, value)
                )
                k, v = cache.layers[layer].update(k, v)
                out, _ = attend(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling)
                outputs.append(out.reshape(size, -1))
                start += size
            hidden = hidden + attn.c_proj(torch.cat(outputs) if len(outputs) > 1 else outputs[0])
            hidden = hidden + block.mlp(block.ln_2(hidden))
        ends, start = [], 0
        for rows, q_len in shapes:  # each row's last position
            ends.append(hidden[start + q_len - 1 : start + rows * q_len : q_len])
            start += rows * q_len
        logits = model.lm_head(body.ln_f(torch.cat(ends) if len(ends) > 1 else ends[0])).float()
    return list(logits.split([rows for rows, _ in shapes]))
