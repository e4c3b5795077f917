"""POST /v1/responses through the official openai client (`client.responses.create`, streaming too)."""

from __future__ import annotations

import httpx
import pytest

NAME = "tiny"


@pytest.fixture
def torch_server(tiny_torch_server):
    """The Responses API runs the chat path, which is the same on every backend: tested on torch."""
    return tiny_torch_server


def test_text_in_text_out_equals_chat(torch_server):
    _, client, _ = torch_server
    resp = client.responses.create(
        model=NAME, input="def foo(x):", instructions="You write Python.", max_output_tokens=12, temperature=0
    )
    chat = client.chat.completions.create(
        model=NAME,
        max_tokens=12,
        temperature=0,
        messages=[{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def foo(x):"}],
    )
    assert resp.object == "response" and resp.id.startswith("resp_") and resp.model == NAME
    assert resp.output_text == chat.choices[0].message.content
    assert resp.output[0].type == "message" and resp.output[0].role == "assistant"
    assert resp.usage.input_tokens == chat.usage.prompt_tokens
    assert resp.usage.output_tokens == chat.usage.completion_tokens <= 12
    assert resp.instructions == "You write Python." and resp.max_output_tokens == 12
    assert resp.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    if resp.status == "incomplete":
        assert resp.incomplete_details.reason == "max_output_tokens"


def test_message_items_and_sampling(torch_server):
    _, client, _ = torch_server
    items = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "hello"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hi"}]},
        {"role": "user", "content": "again"},
    ]
    resp = client.responses.create(model=NAME, input=items, max_output_tokens=5, temperature=1.5, top_p=0.9)
    assert resp.temperature == 1.5 and resp.top_p == 0.9 and resp.usage.output_tokens <= 5


def test_streaming_event_sequence(torch_server):
    _, client, _ = torch_server
    whole = client.responses.create(model=NAME, input="import", max_output_tokens=8, temperature=0)
    events = list(client.responses.create(model=NAME, input="import", max_output_tokens=8, temperature=0, stream=True))
    kinds = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * len(deltas),
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[-1].response.status == whole.status
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(d.delta for d in deltas)
    assert text == whole.output_text == events[-4].text == events[-3].part.text
    assert (
        events[-1].response.output_text == text and events[-1].response.usage.output_tokens == whole.usage.output_tokens
    )
    assert len({e.item_id for e in deltas} | {events[2].item.id}) == 1
    with client.responses.stream(model=NAME, input="import", max_output_tokens=8, temperature=0) as stream:
        assert stream.get_final_response().output_text == text


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"store": True}, "store"),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"text": {"format": {"type": "json_object"}}}, "text"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "input[0]"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]},
            "input[0].content[0]",
        ),
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"temperature": 3}, "temperature"),
    ],
)
def test_unsupported_fields_are_400_naming_them(torch_server, extra, param):
    url = torch_server[0]
    r = httpx.post(f"{url}/v1/responses", json={"model": NAME, "input": "x", **extra}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_openai_client_errors(torch_server):
    import openai

    _, client, _ = torch_server
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=NAME, input="x", tools=[{"type": "web_search"}])
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="gpt-5", input="x")
