"""Structured outputs: grammar-constrained decoding on random-weight tiny models, engine-level and over HTTP."""

from __future__ import annotations

import json
import re
import time

import httpx
import jsonschema
import pytest
from serve_helpers import fcfs_server, openai_client

NAME = "tiny"
# Every instance is short (no free-length strings or numbers), so even a random model finishes well within
# the token budget: the grammar, not the model, decides when the output ends.
SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "size": {"type": "integer", "minimum": 0, "maximum": 99},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["ok", "size", "color"],
    "additionalProperties": False,
}
BUDGET = 40


def check_output(text: str, finish_reason: str) -> bool:
    """A finished output validates against SCHEMA; a cut one is a prefix. True when it finished."""
    if finish_reason == "length":
        return False
    assert finish_reason == "stop", finish_reason
    jsonschema.validate(json.loads(text), SCHEMA)
    return True


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_fifty_seeds_validate_on_both_backends(tiny_gpt2_dir, tmp_path, backend):
    """Temperature 1 on random weights, 50 seeds batched 16 at a time: every output is schema-valid JSON."""
    from fastserve_cli.serve.grammar import GrammarCache, GrammarSpec
    from fastserve_cli.serve.request import Request, SamplingParams
    from fastserve_cli.serve.sampling import make_generator
    from fastserve_cli.testing.engine import make_engine, run_until_finished

    model_dir = tiny_gpt2_dir
    if backend == "onnx":
        from fastserve_cli.export.onnx_graph import export_onnx

        export_onnx(tiny_gpt2_dir, tmp_path / "onnx", parity_steps=2)
        model_dir = tmp_path / "onnx"
    engine = make_engine(model_dir, backend=backend, max_batch_size=16)
    tok = engine.tokenizer
    cache = GrammarCache(tok, engine.backend.config["vocab_size"], sorted(engine.backend.eos_token_ids))
    compiled = cache.get(GrammarSpec.json_schema(SCHEMA))
    prompt = tok("Answer in JSON:").input_ids
    reqs = []
    for seed in range(50):
        req = Request(prompt, SamplingParams(max_new_tokens=BUDGET, temperature=1.0, seed=seed), time.perf_counter())
        req.generator, req.grammar = make_generator(seed), compiled.new_state()
        reqs.append(req)
    run_until_finished(engine, reqs)
    finished = [check_output(tok.decode(r.output_ids, skip_special_tokens=True), r.finish_reason) for r in reqs]
    assert sum(finished) >= 45  # the rest were cut by max_tokens ("length")
    assert all(r.output_ids[-1] in engine.backend.eos_token_ids for r in reqs if r.finish_reason == "stop")
    assert cache.get(GrammarSpec.json_schema(SCHEMA)) is compiled and cache.hits == 1


def test_grammar_cache_is_a_bounded_lru(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from fastserve_cli.serve.grammar import GrammarCache, GrammarSpec

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    cache = GrammarCache(tok, len(tok), [tok.eos_token_id], capacity=2)
    a, b, c = (GrammarSpec.choice([w], "guided_choice") for w in ("a", "b", "c"))
    first = cache.get(a)
    cache.get(b)
    assert cache.get(a) is first  # a hit refreshes a ...
    cache.get(c)  # ... so c evicts b
    assert cache.get(a) is first and (cache.hits, cache.misses) == (2, 3)
    cache.get(b)
    assert cache.misses == 4


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir, tmp_path_factory):
    yield from fcfs_server(tiny_gpt2_dir, NAME, tmp_path_factory.mktemp("serve") / "server.log")


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def chat(client, **kw):
    return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Give JSON"}], **kw)


def test_json_schema_chat_completions_and_stream(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
    out = chat(client, response_format=fmt, n=10, seed=7, temperature=1.0, max_tokens=BUDGET)
    assert sum(check_output(c.message.content, c.finish_reason) for c in out.choices) >= 8
    done = client.completions.create(
        model=NAME, prompt="{", max_tokens=BUDGET, seed=3, extra_body={"response_format": fmt}
    )
    check_output(done.choices[0].text, done.choices[0].finish_reason)
    chunks = list(chat(client, response_format=fmt, seed=1, max_tokens=BUDGET, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert check_output(text, chunks[-1].choices[0].finish_reason)


def test_parse_returns_a_pydantic_object(client):
    from typing import Literal

    from pydantic import BaseModel, Field

    class Reply(BaseModel):
        ok: bool
        mood: Literal["happy", "sad"]
        score: int = Field(ge=1, le=5)

    out = client.chat.completions.parse(
        model=NAME, messages=[{"role": "user", "content": "rate"}], response_format=Reply, seed=0, max_tokens=BUDGET
    )
    assert out.choices[0].finish_reason == "stop"
    assert isinstance(out.choices[0].message.parsed, Reply)


def test_greedy_logprobs_and_json_object(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}}
    out = chat(client, response_format=fmt, temperature=0, max_tokens=BUDGET, logprobs=True, top_logprobs=5)
    choice = out.choices[0]
    check_output(choice.message.content, choice.finish_reason)
    for entry in choice.logprobs.content:  # alternatives are grammar-allowed tokens only, never -inf
        assert entry.top_logprobs and all(alt.logprob > -1e30 for alt in entry.top_logprobs)
        assert entry.logprob == pytest.approx(max(alt.logprob for alt in entry.top_logprobs))
    obj = chat(client, response_format={"type": "json_object"}, seed=2, max_tokens=BUDGET, n=4)
    for c in obj.choices:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content), dict)


def test_max_tokens_cutting_json_is_length(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}}
    out = chat(client, response_format=fmt, max_tokens=3, seed=0)
    assert out.choices[0].finish_reason == "length" and out.choices[0].message.content.startswith("{")


def test_regex_and_choice_extras(client, server):
    regex = r"[0-9]{3}-[a-z]{2}"
    out = chat(client, seed=4, max_tokens=BUDGET, n=5, extra_body={"guided_regex": regex})
    assert all(c.finish_reason == "stop" and re.fullmatch(regex, c.message.content) for c in out.choices)
    choices = ["yes", "no", "maybe"]
    out = chat(client, seed=5, max_tokens=BUDGET, n=5, extra_body={"guided_choice": choices})
    assert all(c.message.content in choices for c in out.choices)
    out = client.completions.create(
        model=NAME, prompt="Q", max_tokens=BUDGET, n=4, seed=6, extra_body={"structured_outputs": {"choice": choices}}
    )
    assert all(c.text in choices and c.finish_reason == "stop" for c in out.choices)
    out = client.completions.create(
        model=NAME,
        prompt="Q",
        max_tokens=BUDGET,
        seed=6,
        extra_body={"structured_outputs": {"json": json.dumps(SCHEMA)}},
    )
    check_output(out.choices[0].text, out.choices[0].finish_reason)


@pytest.mark.parametrize(
    "extra, param, words",
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "t",
                        "schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
                    },
                }
            },
            "response_format.json_schema.schema",
            "missing",
        ),
        ({"guided_regex": "(abc"}, "guided_regex", "parenthesis"),
        ({"response_format": {"type": "yaml"}}, "response_format.type", "yaml"),
        ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_choice", "only one"),
        ({"structured_outputs": {"grammar": "root ::= x"}}, "structured_outputs.grammar", "not supported"),
    ],
)
def test_constraints_the_engine_cannot_compile_are_400(server, extra, param, words):
    r = httpx.post(
        f"{server}/v1/chat/completions",
        timeout=60,
        json={"model": NAME, "messages": [{"role": "user", "content": "x"}], **extra},
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error
