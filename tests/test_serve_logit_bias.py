"""`logit_bias` on completions and chat, for the torch and the onnx backend, through the official openai client."""

from __future__ import annotations

import httpx
import pytest

NAME = "tiny"


@pytest.fixture
def served(tiny_server):
    return tiny_server


def greedy_ranking(model_dir, prompt: str) -> tuple[list[int], list[int]]:
    """Prompt ids and the next-token ids ranked by the reference model's logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(prompt).input_ids
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    return ids, logits.argsort(descending=True).tolist()


def test_plus_100_forces_a_token_under_greedy(served, tiny_gpt2_dir):
    from transformers import AutoTokenizer

    _, client, _ = served
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    forced = tok.encode(" return", add_special_tokens=False)[0]
    out = client.completions.create(
        model=NAME,
        prompt="x =",
        max_tokens=5,
        temperature=0,
        logit_bias={str(forced): 100},
        extra_body={"ignore_eos": True},
    )
    assert out.choices[0].text == tok.decode([forced] * 5)
    chat = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        logit_bias={str(forced): 100},
        extra_body={"ignore_eos": True},
    )
    assert chat.choices[0].message.content == tok.decode([forced] * 4)
    sampled = client.completions.create(
        model=NAME,
        prompt="x =",
        max_tokens=6,
        temperature=1.0,
        n=2,
        seed=3,
        logit_bias={str(forced): 100},
        extra_body={"ignore_eos": True},
    )
    assert all(c.text == tok.decode([forced] * 6) for c in sampled.choices)


def test_minus_100_bans_the_greedy_token(served, tiny_gpt2_dir):
    from transformers import AutoTokenizer

    _, client, _ = served
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    prompt = "def foo(x):\n    return"
    _, ranked = greedy_ranking(tiny_gpt2_dir, prompt)
    plain = client.completions.create(
        model=NAME, prompt=prompt, max_tokens=1, temperature=0, extra_body={"ignore_eos": True}
    )
    assert plain.choices[0].text == tok.decode([ranked[0]])
    # ban the top tokens up to the first one (after the greedy one) that decodes to whole characters alone
    k = next(i for i in range(1, 50) if tok.decode([ranked[i]]).strip("\ufffd") == tok.decode([ranked[i]]) != "")
    banned = client.completions.create(
        model=NAME,
        prompt=prompt,
        max_tokens=1,
        temperature=0,
        logit_bias={str(t): -100 for t in ranked[:k]},
        extra_body={"ignore_eos": True},
    )
    assert banned.choices[0].text == tok.decode([ranked[k]])


BAD_BIASES = [{"abc": 1}, {"99999999": 1}, {"-1": 1}, {"5": 101}, {"5": -100.5}, {"5": "x"}, {"5": None}, [1, 2]]


def test_bad_logit_bias_is_400(served):
    url = served[0]
    for bias in BAD_BIASES:
        for path, extra in [
            ("/v1/completions", {"prompt": "x"}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
        ]:
            r = httpx.post(
                f"{url}{path}", json={"model": NAME, "logit_bias": bias, "max_tokens": 1, **extra}, timeout=60
            )
            assert r.status_code == 400, (bias, r.text)
            assert r.json()["error"]["param"].startswith("logit_bias")
