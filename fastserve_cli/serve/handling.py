"""Request handling shared by the HTTP server (api.py) and batch inference (fastserve_cli.batch).

A validated OpenAI body becomes a `Plan` (prompts, sampling params, choice indices, logit bias, the grammar
that constrains it, whether tool calls are parsed) and then engine `Request`s; finished choices become
OpenAI response bodies. Both front ends go through these functions, so a request means the same thing (and
fails with the same 400) whether it came over HTTP or from a batch file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from fastserve_cli.serve.grammar import GrammarCache, GrammarError, GrammarSpec, request_spec
from fastserve_cli.serve.logit_bias import parse_logit_bias
from fastserve_cli.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LogprobFormatter,
    OpenAIError,
    bad_request,
    chat_prompt,
    check_supported,
    completion_prompts,
    resolve_max_tokens,
    sampling_params,
    usage,
)
from fastserve_cli.serve.request import Request, SamplingParams
from fastserve_cli.serve.sampling import make_generator
from fastserve_cli.serve.tools import ToolError, grammar_spec, parse_tool_calls, tool_config

GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "structured_outputs")


@dataclass
class Loaded:
    """Everything the endpoints need once the model is up."""

    engine: Any
    tokenizer: Any
    max_context: int
    kv_bytes_per_token: int
    kv_budget: int
    logprobs: LogprobFormatter = field(init=False)
    grammars: GrammarCache = field(init=False)

    def __post_init__(self) -> None:
        self.logprobs = LogprobFormatter(self.tokenizer)
        # A local engine knows its backend; the cluster ingress's RemoteEngine reports the replicas' vocabulary
        # and stop tokens (the ingress compiles grammars to validate requests; replicas compile their own).
        vocab, eos = self.engine.grammar_vocab()
        self.grammars = GrammarCache(self.tokenizer, vocab or len(self.tokenizer), sorted(eos))


@dataclass
class Plan:
    """A validated request: one (prompt ids, params, first choice index) per prompt; `n` choices each."""

    kind: str  # "completion" or "chat"
    body: Any
    prompts: list[tuple[list[int], SamplingParams, int]]
    logit_bias: dict[int, float] | None = None
    spec: GrammarSpec | None = None  # what constrains decoding; compiled into `grammar` by `compile_plan`
    grammar: Any = None  # grammar.CompiledSpec: each choice gets its own matcher
    parse_tools: bool = False  # chat with tools offered: tool calls are parsed out of the text

    @property
    def prompt_tokens(self) -> int:
        return sum(len(ids) for ids, _, _ in self.prompts)


def check_model(model: str, model_name: str) -> None:
    if model != model_name:
        raise OpenAIError(
            404,
            f"model '{model}' does not exist; this server serves '{model_name}'",
            param="model",
            code="model_not_found",
        )


def check_common(body, model_name: str) -> None:
    """Checks both endpoints make before tokenizing: unsupported fields, the model name, stream options."""
    check_supported(body)
    check_model(body.model, model_name)
    if body.stream_options is not None and not body.stream:
        raise bad_request("'stream_options' is only allowed with 'stream': true", param="stream_options")


def constraint(body) -> GrammarSpec | None:
    """The grammar a request asks for: `response_format`, or one vLLM-style guided field."""
    try:
        return request_spec(body.response_format, {k: getattr(body, k) for k in GUIDED_FIELDS})
    except GrammarError as err:
        raise bad_request(str(err), param=err.param) from None


def new_plan(kind: str, body, loaded: Loaded) -> Plan:
    """An empty plan with the request's logit bias; prompts are added by the planners (or `Job.add_prompt`)."""
    return Plan(kind, body, [], logit_bias=parse_logit_bias(getattr(body, "logit_bias", None), len(loaded.tokenizer)))


def plan_completion(body: CompletionRequest, loaded: Loaded, model_name: str) -> Plan:
    check_common(body, model_name)
    prompts = completion_prompts(body, loaded.tokenizer)
    plan = new_plan("completion", body, loaded)
    plan.spec = constraint(body)
    for i, ids in enumerate(prompts):
        max_tokens = resolve_max_tokens(body.max_tokens, len(ids), loaded.max_context, 16)
        add_prompt(plan, loaded, ids, sampling_params(body, max_tokens, body.logprobs), i * body.n)
    return plan


def plan_chat(body: ChatCompletionRequest, loaded: Loaded, model_name: str) -> Plan:
    check_common(body, model_name)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    try:
        tools = tool_config(body.tools, body.tool_choice, body.parallel_tool_calls)
    except ToolError as err:
        raise bad_request(str(err), param=err.param) from None
    ids = chat_prompt(body, loaded.tokenizer, tools.tools if tools.active else None)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = resolve_max_tokens(requested, len(ids), loaded.max_context, None)
    plan = new_plan("chat", body, loaded)
    plan.parse_tools = tools.active
    spec, tool_spec = constraint(body), grammar_spec(tools)
    if spec is not None and tool_spec is not None:
        raise bad_request(f"'{spec.param}' cannot be combined with tool_choice '{tools.choice}'", param="tool_choice")
    plan.spec = spec or tool_spec
    add_prompt(
        plan, loaded, ids, sampling_params(body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None), 0
    )
    return plan


def add_prompt(plan: Plan, loaded: Loaded, ids: list[int], params: SamplingParams, first_index: int) -> None:
    """One more prompt (with `n` choices from `first_index`), refused when it cannot fit the KV budget."""
    budget_tokens = loaded.kv_budget // loaded.kv_bytes_per_token
    if len(ids) + params.max_new_tokens > budget_tokens:
        raise bad_request(
            f"prompt + max_tokens = {len(ids) + params.max_new_tokens} tokens do not fit in the "
            f"KV-cache budget ({budget_tokens} tokens); lower max_tokens or raise --kv-cache-memory",
            param="max_tokens",
        )
    plan.prompts.append((list(ids), params, first_index))


def compile_plan(plan: Plan, loaded: Loaded) -> None:
    """Compile the plan's grammar (cached per spec; a cold schema takes a while: callers on an event loop run
    this in a thread). A spec the engine cannot compile is a 400 naming the problem."""
    if plan.spec is None:
        return
    try:
        plan.grammar = loaded.grammars.get(plan.spec)
    except GrammarError as err:
        raise bad_request(str(err), param=err.param) from None


def engine_requests(
    plan: Plan, prompts: list[tuple[list[int], SamplingParams, int]], on_output: Callable[[int], Callable[[Any], None]]
) -> list[tuple[int, Request]]:
    """One engine request per choice (`n` per prompt), each seeded `seed + k`; `on_output(index)` is its callback."""
    now = time.perf_counter()
    out = []
    for ids, params, first_index in prompts:
        for k in range(plan.body.n):
            seed = None if params.seed is None else params.seed + k
            choice = SamplingParams(**{**params.__dict__, "seed": seed, "logit_bias": plan.logit_bias})
            req = Request(prompt_ids=list(ids), params=choice, arrival_time=now)
            req.generator = make_generator(seed)
            req.grammar = plan.grammar.new_state() if plan.grammar is not None else None
            req.grammar_spec = plan.spec if plan.grammar is not None else None  # what a remote replica compiles
            req.on_output = on_output(first_index + k)
            out.append((first_index + k, req))
    return out


def make_choice(
    plan: Plan, loaded: Loaded, index: int, text: str, entries: list, reason: str | None, final: bool, offset: int = 0
) -> dict[str, Any]:
    """A choice (final) or a streamed delta, in the completions or chat shape (tool calls parsed when offered)."""
    body = plan.body
    logprobs = None
    if plan.kind == "completion":
        if body.logprobs is not None:
            logprobs = loaded.logprobs.completion(entries, offset)
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
    if body.logprobs:
        logprobs = loaded.logprobs.chat(entries)
    if final:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        calls: list[dict[str, Any]] = []
        if plan.parse_tools:
            message["content"], calls = parse_tool_calls(text)
        if calls:
            message["tool_calls"] = calls
            reason = "tool_calls" if reason == "stop" else reason
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason}
    delta = {"content": text} if text else {}
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}


def response_body(plan: Plan, id_: str, created: int, choices: list, completion_tokens: int) -> dict[str, Any]:
    """The non-streaming response object."""
    obj = "text_completion" if plan.kind == "completion" else "chat.completion"
    return {
        "id": id_,
        "object": obj,
        "created": created,
        "model": plan.body.model,
        "choices": choices,
        "usage": usage(plan.prompt_tokens, completion_tokens),
    }
