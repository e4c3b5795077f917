"""Request handling shared by the HTTP server (api.py) and batch inference (fastserve_cli.batch).

A validated OpenAI body becomes a `Plan` (prompts, sampling params, choice indices) and then engine
`Request`s; finished choices become OpenAI response bodies. Both front ends go through these functions,
so a request means the same thing (and fails with the same 400) whether it came over HTTP or from a
batch file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from fastserve_cli.serve.protocol import (
    ChatCompletionRequest, CompletionRequest, LogprobFormatter, bad_request, chat_prompt, check_supported,
    completion_prompts, resolve_max_tokens, sampling_params, usage)
from fastserve_cli.serve.request import Request, SamplingParams
from fastserve_cli.serve.sampling import make_generator


@dataclass
class Loaded:
    """Everything the endpoints need once the model is up."""

    engine: Any
    tokenizer: Any
    max_context: int
    kv_bytes_per_token: int
    kv_budget: int
    logprobs: LogprobFormatter = field(init=False)

    def __post_init__(self) -> None:
        self.logprobs = LogprobFormatter(self.tokenizer)


@dataclass
class Plan:
    """A validated request: one (prompt ids, params, first choice index) per prompt; `n` choices each."""

    kind: str  # "completion" or "chat"
    body: Any
    prompts: list[tuple[list[int], SamplingParams, int]]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(ids) for ids, _, _ in self.prompts)


def check_common(body, model_name: str) -> None:
    """Checks both endpoints make before tokenizing: unsupported fields, the model name, stream options."""
    check_supported(body)
    if body.model != model_name:
        raise bad_request(f"model '{body.model}' does not exist; this server serves '{model_name}'", param="model")
    if body.stream_options is not None and not body.stream:
        raise bad_request("'stream_options' is only allowed with 'stream': true", param="stream_options")


def plan_completion(body: CompletionRequest, loaded: Loaded, model_name: str) -> Plan:
    check_common(body, model_name)
    prompts = completion_prompts(body, loaded.tokenizer)
    plan = Plan("completion", body, [])
    for i, ids in enumerate(prompts):
        max_tokens = resolve_max_tokens(body.max_tokens, len(ids), loaded.max_context, 16)
        plan.prompts.append((ids, sampling_params(body, max_tokens, body.logprobs), i * body.n))
    _check_budget(plan, loaded)
    return plan


def plan_chat(body: ChatCompletionRequest, loaded: Loaded, model_name: str) -> Plan:
    check_common(body, model_name)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    ids = chat_prompt(body, loaded.tokenizer)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = resolve_max_tokens(requested, len(ids), loaded.max_context, None)
    params = sampling_params(body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None)
    plan = Plan("chat", body, [(ids, params, 0)])
    _check_budget(plan, loaded)
    return plan


def _check_budget(plan: Plan, loaded: Loaded) -> None:
    budget_tokens = loaded.kv_budget // loaded.kv_bytes_per_token
    for ids, params, _ in plan.prompts:
        if len(ids) + params.max_new_tokens > budget_tokens:
            raise bad_request(f"prompt + max_tokens = {len(ids) + params.max_new_tokens} tokens do not fit in the "
                              f"KV-cache budget ({budget_tokens} tokens); lower max_tokens or raise --kv-cache-memory",
                              param="max_tokens")


def engine_requests(plan: Plan, on_output: Callable[[int], Callable[[Any], None]]) -> list[tuple[int, Request]]:
    """One engine request per choice (`n` per prompt), each seeded `seed + k`; `on_output(index)` is its callback."""
    now = time.perf_counter()
    out = []
    for ids, params, first_index in plan.prompts:
        for k in range(plan.body.n):
            seed = None if params.seed is None else params.seed + k
            req = Request(prompt_ids=list(ids), params=SamplingParams(**{**params.__dict__, "seed": seed}),
                          arrival_time=now)
            req.generator = make_generator(seed)
            req.on_output = on_output(first_index + k)
            out.append((first_index + k, req))
    return out


def make_choice(plan: Plan, loaded: Loaded, index: int, text: str, entries: list, reason: str | None, final: bool,
                offset: int = 0) -> dict[str, Any]:
    """A choice (final) or a streamed delta, in the completions or chat shape."""
    body = plan.body
    logprobs = None
    if plan.kind == "completion":
        if body.logprobs is not None:
            logprobs = loaded.logprobs.completion(entries, offset)
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
    if body.logprobs:
        logprobs = loaded.logprobs.chat(entries)
    if final:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": reason}
    delta = {"content": text} if text else {}
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}


def response_body(plan: Plan, id_: str, created: int, choices: list, completion_tokens: int) -> dict[str, Any]:
    """The non-streaming response object."""
    obj = "text_completion" if plan.kind == "completion" else "chat.completion"
    return {"id": id_, "object": obj, "created": created, "model": plan.body.model, "choices": choices,
            "usage": usage(plan.prompt_tokens, completion_tokens)}
