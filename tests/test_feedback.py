"""The feedback loop, whole: serve with a request log, chat, rate, then `fastserve run` fine-tunes on the log."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
import yaml

from fastserve_cli.testing.server import running_server

NAME = "tiny"
KEY = "sk-feedback"


def chat(url: str, content: str, **extra) -> dict:
    r = httpx.post(
        f"{url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
        json={"model": NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 8, **extra},
    )
    assert r.status_code == 200, r.text
    return r.json()


def feedback(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/feedback", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)


def test_feedback_disabled_by_default(tiny_gpt2_dir, tmp_path):
    with running_server(tiny_gpt2_dir, "--model-name", NAME, env={"FASTSERVE_API_KEY": KEY}) as (url, _):
        r = feedback(url, id="chatcmpl-x", rating=1)
        assert r.status_code == 404 and r.json()["error"]["code"] == "feedback_disabled"


@pytest.mark.slow
def test_served_conversations_feed_a_fine_tune(tiny_gpt2_dir, tmp_path):
    log = tmp_path / "requests.jsonl"
    with running_server(
        tiny_gpt2_dir, "--model-name", NAME, "--log-requests", str(log), env={"FASTSERVE_API_KEY": KEY}
    ) as (url, proc):
        good = [chat(url, f"question {i}") for i in range(4)]
        bad = chat(url, "a question answered badly")
        streamed = httpx.post(
            f"{url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=60,
            json={
                "model": NAME,
                "messages": [{"role": "user", "content": "stream me"}],
                "max_tokens": 4,
                "stream": True,
            },
        )
        stream_id = json.loads(streamed.text.splitlines()[0][len("data: ") :])["id"]
        for i, response in enumerate(good):
            extra = {"corrected_answer": "The right answer."} if i == 0 else {}
            r = feedback(url, id=response["id"], rating=5, **extra)
            assert r.status_code == 200 and r.json()["id"] == response["id"]
        assert feedback(url, id=bad["id"], rating=1).status_code == 200
        assert feedback(url, id=stream_id, rating=4).status_code == 200
        missing = feedback(url, id="chatcmpl-nope", rating=5)
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "id"
        malformed = feedback(url, id=bad["id"])
        assert malformed.status_code == 400 and malformed.json()["error"]["param"] == "rating"
        assert feedback(url, id=bad["id"], rating=1, key="x").status_code == 400  # unknown fields are refused
        assert httpx.post(f"{url}/v1/feedback", json={"id": bad["id"], "rating": 1}).status_code == 401

    records = [json.loads(line) for line in log.read_text().splitlines()]
    exchanges = [r for r in records if r["type"] == "exchange"]
    assert len(exchanges) == 6 and KEY not in log.read_text()
    first = next(r for r in exchanges if r["id"] == good[0]["id"])
    assert first["messages"] == [
        {"role": "user", "content": "question 0"},
        {"role": "assistant", "content": good[0]["choices"][0]["message"]["content"]},
    ]
    assert first["model"] == NAME and first["usage"] == good[0]["usage"] and first["created"]

    recipe = {
        "name": "loop",
        "run_dir": str(tmp_path / "run"),
        "data": {
            "paths": [str(log)],
            "min_feedback": 4,
            "messages_column": "messages",
            "mode": "sft",
            "block_size": 128,
            "validation_fraction": 0.2,
        },
        "tokenizer": {"path": str(tiny_gpt2_dir)},
        "model": {"pretrained": str(tiny_gpt2_dir)},
        "train": {
            "max_steps": 2,
            "per_device_train_batch_size": 2,
            "eval_steps": 2,
            "save_steps": 2,
            "warmup_steps": 0,
            "sample_prompts": [],
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = subprocess.run(
        [sys.executable, "-m", "fastserve_cli", "run", str(path), "--until", "train", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    pre = manifest["stages"]["preprocess"]["metrics"]
    assert pre["exchanges"] == 6 and pre["selected_by_feedback"] == 5 and pre["corrected_answers"] == 1
    assert pre["mode"] == "sft" and pre["documents"] == 5
    assert manifest["stages"]["train"]["status"] == "done"


def test_log_survives_a_torn_last_line(tmp_path):
    from fastserve_cli.core.feedback_log import rated_conversations
    from fastserve_cli.serve.feedback import FeedbackRequest, RequestLog

    path = tmp_path / "log.jsonl"
    exchange = {
        "type": "exchange",
        "id": "c1",
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
    }
    path.write_text(json.dumps(exchange) + '\n{"type": "feedback", "id": "c1", "rat')  # killed mid-write
    log = RequestLog(path)  # a restarted server
    log.add_feedback(FeedbackRequest(id="c1", rating=5, corrected_answer="better"))
    log.close()
    stats: dict = {}
    assert list(rated_conversations([str(path)], 5, stats)) == [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "better"}]}
    ]
    assert stats == {"exchanges": 1, "selected": 1, "corrected": 1}
