"""Prompt log-probabilities for `/v1/completions` with `echo: true` (what lm-eval's `local-completions` asks for).

lm-eval scores multiple-choice and perplexity tasks by sending context + continuation as the prompt with
`echo: true, logprobs: 1, max_tokens: 1` and summing `token_logprobs[ctxlen:-1]`; vLLM answers with the prompt
tokens (first one's logprob null: nothing predicts it) followed by the generated token. We do the same:
- the prompt is scored by one forward that keeps the logits of every position (`Backend.prompt_logits`), run on
  the engine thread between two iterations (`Engine.call`), so it never overlaps a decode or touches the pack,
  and the event loop only awaits a future;
- any generated tokens come from the engine as for a plain completion, and are appended.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from fastserve_cli.serve.protocol import (
    CompletionRequest,
    OpenAIError,
    bad_request,
    new_id,
    now_s,
    resolve_max_tokens,
    sampling_params,
    usage,
)

# JSON has no -inf; a token the model gives no mass keeps a very negative finite logprob (as vLLM clamps).
MIN_LOGPROB = -9999.0

Entry = tuple[int, "float | None", "list[tuple[int, float]] | None"]


def prompt_entries(backend, ids: list[int], top: int | None) -> list[Entry]:
    """(token, logprob, top alternatives) for every prompt token; the first has neither (nothing predicts it).

    The top alternatives of a position are its `top` most likely tokens plus the prompt's own token, as vLLM
    returns them, so a client can tell whether the prompt token was the greedy choice.
    """
    import torch

    logits = backend.prompt_logits(ids)  # [T, V] float32
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)
    targets = torch.tensor(ids[1:], dtype=torch.long, device=logp.device)
    chosen = logp.gather(1, targets[:, None])[:, 0].clamp_min(MIN_LOGPROB).tolist()
    entries: list[Entry] = [(ids[0], None, None)]
    if top:
        values, indices = logp.topk(top, dim=-1)
        values, indices = values.clamp_min(MIN_LOGPROB).tolist(), indices.tolist()
    for t, token in enumerate(ids[1:]):
        alternatives = list(zip(indices[t], values[t])) if top else []
        if all(a != token for a, _ in alternatives):
            alternatives.append((token, chosen[t]))
        entries.append((token, chosen[t], alternatives))
    return entries


def prompt_logprobs(formatter, entries: list[Entry]) -> dict[str, Any]:
    """The prompt's part of a completions `logprobs` object: the completions shape from offset 0."""
    return formatter.completion(entries, 0)


def _prompt_texts(body: CompletionRequest, prompts: list[list[int]], tokenizer) -> list[str]:
    """The echoed text: the client's own strings when it sent strings, the decoded ids otherwise."""
    if isinstance(body.prompt, str):
        return [body.prompt]
    if all(isinstance(p, str) for p in body.prompt):
        return list(body.prompt)
    return [tokenizer.decode(ids) for ids in prompts]


def _join(prompt_text: str, prompt_lp: dict | None, choice: dict[str, Any]) -> dict[str, Any]:
    """Prefix a generated choice with its prompt (text and logprobs; the generated offsets move past the prompt)."""
    out = {**choice, "text": prompt_text + choice["text"]}
    if prompt_lp is not None:
        gen = choice.get("logprobs") or {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        out["logprobs"] = {
            "tokens": prompt_lp["tokens"] + gen["tokens"],
            "token_logprobs": prompt_lp["token_logprobs"] + gen["token_logprobs"],
            "top_logprobs": prompt_lp["top_logprobs"] + gen["top_logprobs"],
            "text_offset": prompt_lp["text_offset"] + [o + len(prompt_text) for o in gen["text_offset"]],
        }
    return out


async def echo_completion(
    loaded, body: CompletionRequest, prompts: list[list[int]], new_job: Callable[[], Any]
) -> dict[str, Any]:
    """A non-streaming completion whose choices start with the prompt (and its logprobs when asked)."""
    if body.stream:
        raise bad_request("'echo' with 'stream' is not supported; send 'stream': false", param="echo")
    if body.max_tokens == 0:
        for ids in prompts:
            if len(ids) > loaded.max_context:
                raise bad_request(
                    f"the prompt has {len(ids)} tokens but the model's context is {loaded.max_context}; "
                    "shorten the prompt",
                    param="prompt",
                )
        max_tokens = None
    else:
        max_tokens = [resolve_max_tokens(body.max_tokens, len(p), loaded.max_context, 16) for p in prompts]
    scored = None
    if body.logprobs is not None:
        backend = loaded.engine.backend
        future = loaded.engine.call(lambda: [prompt_entries(backend, ids, body.logprobs) for ids in prompts])
        try:
            scored = [prompt_logprobs(loaded.logprobs, e) for e in await asyncio.wrap_future(future)]
        except Exception as err:
            raise OpenAIError(
                500, f"scoring the prompt failed: {type(err).__name__}: {err}", type_="server_error"
            ) from None
    texts = _prompt_texts(body, prompts, loaded.tokenizer)
    if max_tokens is None:
        choices = [
            {
                "index": i * body.n + k,
                "text": texts[i],
                "logprobs": scored[i] if scored else None,
                "finish_reason": "length",
            }
            for i in range(len(prompts))
            for k in range(body.n)
        ]
        return {
            "id": new_id("cmpl"),
            "object": "text_completion",
            "created": now_s(),
            "model": body.model,
            "choices": choices,
            "usage": usage(sum(len(p) for p in prompts), 0),
        }
    job = new_job()
    for i, (ids, mt) in enumerate(zip(prompts, max_tokens)):
        job.add_prompt(ids, sampling_params(body, mt, body.logprobs), first_index=i * body.n)
    job.submit()
    response = await job.collect()
    response["choices"] = [
        _join(texts[c["index"] // body.n], scored[c["index"] // body.n] if scored else None, c)
        for c in response["choices"]
    ]
    return response
