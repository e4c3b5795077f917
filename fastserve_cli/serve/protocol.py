"""OpenAI protocol: request models, validation into engine requests, response and chunk shapes, errors.

Kept apart from the FastAPI app so it can be read (and tested) without a server. Fields we do not
implement are rejected with a 400 that names them instead of being silently dropped.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from fastserve_cli.serve.request import SamplingParams
from fastserve_cli.serve.tools import template_message, tools_system_text

MAX_LOGPROBS = 20
# Fields OpenAI defines that we accept only at their "off" value; anything else is a 400 naming the field.
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "echo": (False,),
    "best_of": (1,),
    "suffix": ("",),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "parallel_tool_calls": (False,),
    "response_format": ({"type": "text"},),
    "store": (False,),
    "metadata": ({},),
    "modalities": (["text"],),
    "service_tier": ("auto", "default"),
    "reasoning_effort": (),
    "prediction": (),
    "audio": (),
    "web_search_options": (),
    "prompt_cache_key": (),
    "safety_identifier": (),
    "verbosity": (),
}


class OpenAIError(Exception):
    """Becomes `{"error": {"message", "type", "param", "code"}}` with the given HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code="invalid_value" if param else None)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


class _Common(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="allow", strict=True)  # JSON types as the spec says: no "1" -> 1, no false -> 0

    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=-1, description="vLLM extension; 0 or -1 = off.")
    n: int = Field(1, ge=1, le=16)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, description="Any integer; only its low 64 bits are used.")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating past EOS.")
    user: Optional[str] = None
    logit_bias: Optional[dict[str, Any]] = Field(
        None, description="Token id -> bias in [-100, 100] added to its logit."
    )
    # Structured outputs (serve/grammar.py): OpenAI's response_format, or one vLLM-style extra.
    response_format: Optional[dict[str, Any]] = None
    guided_json: Optional[Union[str, dict[str, Any]]] = Field(None, description="vLLM extension: a JSON schema.")
    guided_regex: Optional[str] = Field(None, description="vLLM extension: a regular expression.")
    guided_choice: Optional[list[str]] = Field(None, description="vLLM extension: one of these strings.")
    structured_outputs: Optional[dict[str, Any]] = Field(None, description="vLLM extension: {json|regex|choice}.")

    def unsupported_fields(self) -> list[str]:
        extra = self.model_extra or {}
        return [k for k, v in extra.items() if v is not None and v not in NEUTRAL_VALUES.get(k, ())]


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = Field(
        False,
        description="Return the prompt before the completion (with its logprobs when "
        "`logprobs` is set; `max_tokens` may then be 0): how lm-eval scores log-likelihood tasks.",
    )


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # JSON types as the spec says: no "1" -> 1, no false -> 0

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Optional[Union[str, list[dict[str, Any]]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None  # assistant turns that called tools
    tool_call_id: Optional[str] = None  # role "tool": which call this result answers


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None


# ------------------------------------------------------------------ validation


def check_supported(body: _Common) -> None:
    unsupported = body.unsupported_fields()
    if unsupported:
        name = unsupported[0]
        raise bad_request(f"'{name}' is not supported by this server; remove it from the request", param=name)


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > 4:
        raise bad_request("'stop' takes at most 4 sequences", param="stop")
    return stops


def sampling_params(body: _Common, max_tokens: int, logprobs: int | None) -> SamplingParams:
    temperature = 1.0 if body.temperature is None else body.temperature
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(0, body.top_k or 0),
        seed=body.seed,
        stop=stop_list(body.stop),
        ignore_eos=body.ignore_eos,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logprobs=logprobs,
    )


def completion_prompts(body: CompletionRequest, tokenizer) -> list[list[int]]:
    """The four prompt forms OpenAI allows -> a list of token-id lists."""
    prompt = body.prompt
    if isinstance(prompt, str):
        prompts = [tokenizer.encode(prompt, add_special_tokens=False)]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    elif prompt and all(isinstance(p, str) for p in prompt):
        prompts = [tokenizer.encode(p, add_special_tokens=False) for p in prompt]
    elif prompt and all(isinstance(p, list) for p in prompt):
        prompts = [list(p) for p in prompt]
    else:
        raise bad_request("'prompt' must be a non-empty string, list of strings, or list of token ids", param="prompt")
    vocab = len(tokenizer)
    for ids in prompts:
        if not ids:
            raise bad_request("'prompt' is empty after tokenization", param="prompt")
        if any(not 0 <= t < vocab for t in ids):
            raise bad_request(f"'prompt' has token ids outside the vocabulary (0..{vocab - 1})", param="prompt")
    return prompts


def chat_prompt(body: ChatCompletionRequest, tokenizer, tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Render messages (text content, tool calls and results) and `tools` with the tokenizer's chat template."""
    messages = []
    for i, m in enumerate(body.messages):
        content = m.content
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") != "text":
                    raise bad_request(
                        f"messages[{i}].content: only 'text' parts are supported, got '{part.get('type')}'",
                        param=f"messages[{i}].content",
                    )
                parts.append(str(part.get("text", "")))
            content = "".join(parts)
        if m.model_extra:
            name = next(iter(m.model_extra))
            raise bad_request(f"messages[{i}].{name} is not supported by this server", param=f"messages[{i}].{name}")
        message = {"role": m.role, "content": content or ""}
        if m.tool_calls:
            message = template_message({**message, "tool_calls": m.tool_calls})
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        messages.append(message)
    if tools and "tools" not in (tokenizer.chat_template or ""):  # a template without a tools section
        messages.insert(0, {"role": "system", "content": tools_system_text(tools)})
        tools = None
    try:
        ids = tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True, tokenize=True)
    except Exception as err:  # jinja errors from the template (e.g. a role it does not accept)
        raise bad_request(
            f"'messages' could not be rendered by the model's chat template: {err}", param="messages"
        ) from None
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def resolve_max_tokens(requested: int | None, prompt_len: int, context: int, default: int | None) -> int:
    if prompt_len >= context:
        raise bad_request(
            f"the prompt has {prompt_len} tokens but the model's context is {context}; shorten the prompt",
            param="prompt",
        )
    if requested is None:
        return default if default is not None and prompt_len + default <= context else context - prompt_len
    if requested < 1:
        raise bad_request(f"'max_tokens' must be at least 1, got {requested}", param="max_tokens")
    if prompt_len + requested > context:
        raise bad_request(
            f"prompt ({prompt_len} tokens) + max_tokens ({requested}) exceeds the model's context "
            f"of {context}; lower max_tokens or shorten the prompt",
            param="max_tokens",
        )
    return requested


# ------------------------------------------------------------------ response shapes


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class LogprobFormatter:
    """Token strings for logprobs, in the completions (legacy) or chat shape."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def text(self, token_id: int) -> str:
        if token_id not in self._cache:
            self._cache[token_id] = self.tokenizer.decode([token_id])
        return self._cache[token_id]

    def completion(self, entries: list[tuple[int, float, list[tuple[int, float]]]], offset: int) -> dict[str, Any]:
        tokens, offsets = [], []
        for token_id, _, _ in entries:
            tokens.append(self.text(token_id))
            offsets.append(offset)
            offset += len(tokens[-1])
        return {
            "tokens": tokens,
            "token_logprobs": [lp for _, lp, _ in entries],
            # None where there are no alternatives (the first prompt token when echoing a prompt)
            "top_logprobs": [None if top is None else {self.text(t): lp for t, lp in top} for _, _, top in entries],
            "text_offset": offsets,
        }

    def chat(self, entries: list[tuple[int, float, list[tuple[int, float]]]]) -> dict[str, Any]:
        def item(token_id: int, logprob: float) -> dict[str, Any]:
            text = self.text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {
            "content": [{**item(t, lp), "top_logprobs": [item(a, alp) for a, alp in top]} for t, lp, top in entries]
        }


def now_s() -> int:
    return int(time.time())
