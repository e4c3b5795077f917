"""POST /v1/embeddings through the official openai client, on the torch backend and the ONNX export."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest

NAME = "tiny"
TEXTS = ["def foo(x):\n    return x + 1", "import json", "a"]


def reference(model_dir, texts: list[str]) -> np.ndarray:
    """Mean over tokens of transformers' last hidden state, L2-normalized, one text at a time (no padding)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
            mean = model(ids, output_hidden_states=True).hidden_states[-1][0].mean(0)
            rows.append((mean / mean.norm()).numpy())
    return np.stack(rows)


def test_float_base64_and_reference(tiny_server, tiny_gpt2_dir):
    url, client, _ = tiny_server
    floats = client.embeddings.create(model=NAME, input=TEXTS, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1, 2] and floats.model == NAME
    vectors = np.array([d.embedding for d in floats.data], dtype=np.float32)
    assert vectors.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors, reference(tiny_gpt2_dir, TEXTS), atol=1e-4)  # batched + padded == alone
    decoded = client.embeddings.create(model=NAME, input=TEXTS)  # the client asks for base64 and decodes it
    np.testing.assert_array_equal(np.array([d.embedding for d in decoded.data], dtype=np.float32), vectors)
    raw = httpx.post(
        f"{url}/v1/embeddings", json={"model": NAME, "input": TEXTS, "encoding_format": "base64"}, timeout=60
    ).json()
    from_b64 = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in raw["data"]])
    np.testing.assert_array_equal(from_b64, vectors)
    assert raw["usage"]["prompt_tokens"] == raw["usage"]["total_tokens"] == floats.usage.prompt_tokens > 3


def test_string_and_token_id_inputs_agree(tiny_server, tiny_gpt2_dir):
    from transformers import AutoTokenizer

    _, client, _ = tiny_server
    ids = [AutoTokenizer.from_pretrained(tiny_gpt2_dir).encode(t, add_special_tokens=False) for t in TEXTS]
    one = client.embeddings.create(model=NAME, input=TEXTS[0], encoding_format="float")
    by_ids = client.embeddings.create(model=NAME, input=ids[0], encoding_format="float")
    many = client.embeddings.create(model=NAME, input=ids, encoding_format="float")
    assert len(one.data) == len(by_ids.data) == 1 and len(many.data) == 3
    assert one.usage.prompt_tokens == len(ids[0])
    np.testing.assert_allclose(one.data[0].embedding, by_ids.data[0].embedding, atol=1e-6)
    np.testing.assert_allclose(many.data[0].embedding, one.data[0].embedding, atol=1e-5)


def test_many_inputs_batched(tiny_server):
    _, client, _ = tiny_server
    texts = [("x = " + "y" * (i % 37)) for i in range(120)]
    out = client.embeddings.create(model=NAME, input=texts, encoding_format="float")
    assert [d.index for d in out.data] == list(range(120))
    same = [i for i in range(120) if texts[i] == texts[0]]
    assert all(np.allclose(out.data[i].embedding, out.data[0].embedding, atol=1e-5) for i in same)


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"input": []}, 400, "input"),
        ({"input": ""}, 400, "input"),
        ({"input": ["ok", ""]}, 400, "input[1]"),
        ({"input": [[1, 2], []]}, 400, "input[1]"),
        ({"input": [999999]}, 400, "input"),
        ({"input": "x " * 600}, 400, "input"),
        ({"input": "x", "dimensions": 3}, 400, "dimensions"),
        ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"input": "x", "frobnicate": 1}, 400, "frobnicate"),
        ({"input": "x", "model": "other"}, 404, "model"),
        ({}, 400, "input"),
    ],
)
def test_bad_requests(tiny_server, body, status, param):
    url = tiny_server[0]
    r = httpx.post(f"{url}/v1/embeddings", json={"model": NAME, **body}, timeout=60)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_embeddings_beside_generation(tiny_server):
    """Embeddings run in a worker thread next to the engine: a concurrent greedy completion is unchanged and
    both answer."""
    import asyncio

    url, client, _ = tiny_server
    body = {"model": NAME, "prompt": "for i in", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    alone = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
    texts = [("x = " + "y" * i) for i in range(200)]

    async def both():
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(
                http.post(f"{url}/v1/completions", json=body),
                http.post(f"{url}/v1/embeddings", json={"model": NAME, "input": texts}),
            )

    completion, embeddings = asyncio.run(both())
    assert completion.status_code == embeddings.status_code == 200
    assert completion.json()["choices"][0]["text"] == alone
    assert len(embeddings.json()["data"]) == 200
