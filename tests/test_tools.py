"""Tool calling: template rendering, call parsing and streaming, and forced calls from a random tiny model over HTTP."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from serve_helpers import fcfs_server, openai_client

from fastserve_cli.serve.tools import ToolCallStreamer, parse_tool_calls

NAME = "tiny"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Oslo", "Lima"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER}},
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"utc": {"type": "boolean"}},
                "required": ["utc"],
                "additionalProperties": False,
            },
        },
    },
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
TEXT = (
    'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"utc": true}}\n</tool_call>'
)


def test_parse_and_stream_hermes_calls():
    content, calls = parse_tool_calls(TEXT)
    assert content == "Sure." and [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo", "days": 2}
    assert parse_tool_calls("no calls <tool_call>{broken</tool_call>") == (
        "no calls <tool_call>{broken</tool_call>",
        [],
    )
    for step in (1, 3, 7):  # any split of the text into stream pieces gives the same deltas
        streamer, deltas = ToolCallStreamer(), []
        pieces = [TEXT[i : i + step] for i in range(0, len(TEXT), step)]
        for k, piece in enumerate(pieces):
            deltas += streamer.feed(piece, final=k == len(pieces) - 1)
        assert "".join(d.get("content", "") for d in deltas).strip() == "Sure."
        heads = [d["tool_calls"][0] for d in deltas if "tool_calls" in d and "id" in d["tool_calls"][0]]
        assert [h["function"]["name"] for h in heads] == ["get_weather", "get_time"] and streamer.num_calls == 2


def test_chatml_template_renders_tools_calls_and_results(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    text = tok.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools") and text.count("Be brief.") == 1
    assert json.dumps(TOOLS[0]) in text
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n</tool_call><|im_end|>' in text
    )
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n" in text
    plain = tok.apply_chat_template(messages[:2], tokenize=False)
    assert plain == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWeather in Oslo?<|im_end|>\n"


@pytest.fixture(scope="module")
def long_context_model(tiny_tokenizer_dir, tmp_path_factory):
    """A tiny random Llama with a 2048-token context (RoPE: only the config limit changes), since the tools
    preamble alone is ~600 tokens of the 512-token test tokenizer."""
    from conftest import make_tiny_model

    path = make_tiny_model("llama", tiny_tokenizer_dir, tmp_path_factory.mktemp("model-llama-2k"))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2048}))
    return path


@pytest.fixture(scope="module")
def server(long_context_model, tmp_path_factory):
    yield from fcfs_server(long_context_model, NAME, tmp_path_factory.mktemp("serve") / "server.log")


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def ask(client, **kw):
    return client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "Weather?"}],
        tools=TOOLS,
        temperature=1.0,
        **{"max_tokens": 100, **kw},
    )


def assert_valid_calls(message, names=tuple(SCHEMAS)):
    assert message.tool_calls
    for call in message.tool_calls:
        assert call.type == "function" and call.id and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_and_named_tool_choice_force_valid_calls(client):
    # A random model spells the forced text in many small tokens (45-90 a call): max_tokens may still cut one.
    out = ask(client, tool_choice="required", parallel_tool_calls=False, n=12, seed=0)
    done = [c for c in out.choices if c.finish_reason != "length"]
    assert len(done) >= 10
    for choice in done:
        assert choice.finish_reason == "tool_calls"
        assert_valid_calls(choice.message)
        assert len(choice.message.tool_calls) == 1 and not choice.message.content
    named = {"type": "function", "function": {"name": "get_weather"}}
    out = ask(client, tool_choice=named, n=6, seed=1, max_tokens=120)
    assert sum(c.finish_reason == "tool_calls" for c in out.choices) >= 5
    for choice in out.choices:
        if choice.finish_reason == "tool_calls":
            assert_valid_calls(choice.message, names=("get_weather",))
    parallel = ask(client, tool_choice="required", n=4, seed=2, max_tokens=160)
    for choice in parallel.choices:  # several calls allowed; finished ones all validate
        if choice.finish_reason == "tool_calls":
            assert_valid_calls(choice.message)


def test_streamed_tool_calls_accumulate_like_openai(client):
    stream = ask(client, tool_choice={"type": "function", "function": {"name": "get_time"}}, seed=3, stream=True)
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in stream:
        for choice in chunk.choices:
            reasons.append(choice.finish_reason)
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"id": delta.id, "name": delta.function.name, "arguments": ""})
                entry["arguments"] += delta.function.arguments or ""
    assert reasons[-1] == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "get_time" and calls[0]["id"].startswith("call_")
    jsonschema.validate(json.loads(calls[0]["arguments"]), SCHEMAS["get_time"])


def test_conversation_with_tool_results_continues(client):
    first = ask(client, tool_choice="required", parallel_tool_calls=False, seed=4)
    call = first.choices[0].message.tool_calls[0]
    messages = [
        {"role": "user", "content": "Weather?"},
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"forecast": "sunny"})},
    ]
    follow = client.chat.completions.create(model=NAME, messages=messages, tools=TOOLS, max_tokens=8, seed=5)
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert follow.usage.prompt_tokens > first.usage.prompt_tokens
    none = client.chat.completions.create(
        model=NAME, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=8, seed=5
    )
    assert none.choices[0].message.tool_calls is None


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools[0]"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ],
)
def test_bad_tool_requests_are_400(server, extra, param):
    body = {"model": NAME, "messages": [{"role": "user", "content": "x"}], "tools": TOOLS, **extra}
    r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
