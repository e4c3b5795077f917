"""Turn a batch of last-position logits into one token per request.

Greedy rows take the argmax (so the server's greedy output equals `model.generate()` greedy); sampled rows
apply OpenAI's presence/frequency penalties, temperature, top-k and top-p, then draw with the request's own
`torch.Generator` (seeded per request, so a fixed `seed` reproduces the output whatever else is batched).
Logprobs are those of the penalized distribution before temperature, as OpenAI documents them.
Constrained requests (`req.grammar`, see grammar.py) have their rows masked first, so every sampling mode
and the logprobs see only the tokens the grammar allows.
"""

from __future__ import annotations

import os

from fastserve_cli.serve.logit_bias import apply_logit_bias
from fastserve_cli.serve.request import Request, SamplingParams


def make_generator(seed: int | None):
    import torch

    gen = torch.Generator()
    seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little")
    gen.manual_seed(seed & (2**64 - 1))  # torch takes [0, 2**64): any integer seed is folded to its low 64 bits
    return gen


def _penalize(row, req: Request):
    import torch

    p = req.params
    if not req.output_ids or (p.presence_penalty == 0 and p.frequency_penalty == 0):
        return row
    ids, counts = torch.tensor(req.output_ids).unique(return_counts=True)
    row = row.clone()
    row[ids] -= counts.to(row.dtype) * p.frequency_penalty + p.presence_penalty
    return row


def _filter_top_k_top_p(scaled, params: SamplingParams):
    import torch

    if params.top_k and 0 < params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > params.top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(0, order, sorted_logits)
    return scaled


def sample_row(row, req: Request) -> tuple[int, tuple[float, list[tuple[int, float]]] | None]:
    """One token for one request, plus (its logprob, top alternatives) when logprobs were asked for."""
    import torch

    params = req.params
    row = _penalize(apply_logit_bias(row, params.logit_bias), req)
    if params.greedy:
        token = int(row.argmax())
    else:
        scaled = _filter_top_k_top_p(row / params.temperature, params)
        probs = torch.softmax(scaled, dim=-1)
        token = int(torch.multinomial(probs, 1, generator=req.generator))
    if params.logprobs is None:
        return token, None
    logprobs = torch.log_softmax(row, dim=-1)
    top = []
    if params.logprobs > 0:
        values, ids = torch.topk(logprobs, params.logprobs)
        top = [
            (int(i), float(v)) for i, v in zip(ids, values) if v > float("-inf")
        ]  # masked tokens are not alternatives
    return token, (float(logprobs[token]), top)


def sample(logits, reqs: list[Request]) -> list[tuple[int, tuple | None]]:
    """Tokens for a batch; constrained rows are masked (one pass over the batch) and their matchers advanced."""
    if not any(r.grammar is not None for r in reqs):
        return _sample(logits, reqs)
    from fastserve_cli.serve.grammar import accept_tokens, mask_logits

    mask_logits(logits, reqs)
    out = _sample(logits, reqs)
    accept_tokens([token for token, _ in out], reqs)
    return out


def _sample(logits, reqs: list[Request]) -> list[tuple[int, tuple | None]]:
    """The all-greedy, no-extras case is one vectorized argmax."""
    plain = all(
        r.params.greedy
        and r.params.logprobs is None
        and r.params.presence_penalty == 0
        and r.params.frequency_penalty == 0
        and not r.params.logit_bias
        for r in reqs
    )
    if plain:
        return [(int(t), None) for t in logits.argmax(-1).tolist()]
    return [sample_row(logits[i], r) for i, r in enumerate(reqs)]
