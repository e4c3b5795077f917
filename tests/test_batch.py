"""`fastserve batch` as users run it: real JSONL files, the real CLI in a child process, a real SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

NAME = "tiny"


def write_requests(path: Path, lines: list) -> Path:
    with open(path, "w") as handle:
        for line in lines:
            handle.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


def chat(cid: str, content: str, **body) -> dict:
    return {
        "custom_id": cid,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": NAME, "messages": [{"role": "user", "content": content}], **body},
    }


def completion(cid: str, prompt: str, **body) -> dict:
    return {
        "custom_id": cid,
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": NAME, "prompt": prompt, **body},
    }


def batch_cmd(model_dir: Path, requests: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fastserve_cli",
        "batch",
        str(model_dir),
        str(requests),
        "-o",
        str(out),
        "--model-name",
        NAME,
        *extra,
    ]


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batch_answers_good_and_bad_lines(tiny_gpt2_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    requests = write_requests(
        tmp_path / "in.jsonl",
        [
            completion("greedy", "def foo(x):\n    return", max_tokens=12, temperature=0, ignore_eos=True),
            chat("chat", "hello", max_tokens=6, n=2, seed=3),
            "{not json",
            {"custom_id": "bad-url", "method": "POST", "url": "/v1/images", "body": {}},
            {"custom_id": "embed", "method": "POST", "url": "/v1/embeddings", "body": {"model": NAME, "input": "x"}},
            completion("too-long", "x", max_tokens=100000),
            completion("wrong-model", "x", model="gpt-4"),
            chat("no-messages", "x", messages=[]),
            completion("stream", "x", stream=True),
        ],
    )
    out = tmp_path / "out.jsonl"
    proc = subprocess.run(
        batch_cmd(tiny_gpt2_dir, requests, out, "--json"), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)["metrics"]
    assert summary["requests"] == 9 and summary["succeeded"] == 2 and summary["failed"] == 7
    records = {r["custom_id"] or f"line-{r['error']['line']}": r for r in read_records(out)}
    assert len(records) == 9

    greedy = records["greedy"]["response"]
    assert greedy["status_code"] == 200 and greedy["body"]["object"] == "text_completion"
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    ids = torch.tensor([tok("def foo(x):\n    return").input_ids])
    ref = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, eos_token_id=None
    )
    assert greedy["body"]["choices"][0]["text"] == tok.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)
    assert greedy["body"]["usage"]["completion_tokens"] == 12

    body = records["chat"]["response"]["body"]
    assert body["object"] == "chat.completion" and [c["index"] for c in body["choices"]] == [0, 1]
    assert records["chat"]["error"] is None

    assert records["line-3"]["response"] is None and "not valid JSON" in records["line-3"]["error"]["message"]
    assert records["bad-url"]["error"]["code"] == "invalid_url"
    assert records["embed"]["error"]["code"] == "unsupported_url"
    for cid, param, status in [
        ("too-long", "max_tokens", 400),
        ("wrong-model", "model", 404),
        ("no-messages", "messages", 400),
        ("stream", "stream", 400),
    ]:
        response = records[cid]["response"]
        assert response["status_code"] == status, cid
        assert response["body"]["error"]["param"] == param and response["body"]["error"]["message"], cid


def test_batch_user_errors_are_one_line(tiny_gpt2_dir, tmp_path):
    dup = write_requests(tmp_path / "dup.jsonl", [completion("a", "x"), completion("a", "y")])
    cases = [(tmp_path / "missing.jsonl", "no such batch input file"), (dup, "repeats custom_id 'a'")]
    for requests, message in cases:
        proc = subprocess.run(
            batch_cmd(tiny_gpt2_dir, requests, tmp_path / "o.jsonl"), capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text("hello\nworld\n")
    ok = write_requests(tmp_path / "ok.jsonl", [completion("a", "x")])
    proc = subprocess.run(batch_cmd(tiny_gpt2_dir, ok, foreign), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not a batch result record" in proc.stderr
    assert foreign.read_text() == "hello\nworld\n"  # never truncated: it is not a file we wrote


@pytest.mark.slow
def test_batch_killed_mid_run_resumes_exactly_once(tiny_gpt2_dir, tmp_path):
    ids = [f"req-{i:03d}" for i in range(60)]
    lines = [
        completion(cid, f"def f{i}(x):", max_tokens=48, temperature=0.8, seed=i, ignore_eos=True)
        if i % 2
        else chat(cid, f"question {i}", max_tokens=48, ignore_eos=True)
        for i, cid in enumerate(ids)
    ]
    lines.insert(10, "not json at all")
    requests = write_requests(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    cmd = batch_cmd(tiny_gpt2_dir, requests, out, "--max-batch-size", "2", "--threads", "1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 8:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = out.read_bytes().count(b"\n")
    assert 8 <= first < 61
    with open(out, "ab") as handle:  # what a kill in the middle of a write would leave
        handle.write(b'{"id":"batch_req_x","custom_id":"req-0')
    done = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads(done.stdout)["metrics"]
    assert metrics["resumed_skipped"] == first and metrics["succeeded"] + metrics["failed"] == 61 - first
    records = read_records(out)  # every line parses: the torn tail was cut off
    counts = Counter(r["custom_id"] for r in records)
    assert sorted(k for k in counts if k) == ids and set(counts.values()) == {1}
    assert counts[None] == 1  # the bad line, answered once, keyed by its line number
    assert all(r["response"]["status_code"] == 200 for r in records if r["custom_id"])
