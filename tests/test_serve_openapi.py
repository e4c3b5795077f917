"""The served /openapi.json tells the truth: schemathesis (all default checks) over a live server finds nothing.

The server runs a 16-token-context model, so every generated request finishes in a few decode steps and
the run (a few hundred requests over every operation) stays well under a minute.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from serve_helpers import make_short_context_model

from fastserve_cli.testing.server import running_server

KEY = "sk-spec"
CONFIG = Path(__file__).with_name("schemathesis.toml")


def test_spec_documents_errors_streams_and_metrics(tiny_gpt2_dir, tmp_path):
    with running_server(
        tiny_gpt2_dir,
        "--model-name",
        "tiny",
        "--scheduler",
        "fcfs",
        env={"FASTSERVE_API_KEY": KEY},
        log_path=tmp_path / "log",
    ) as (url, _):
        spec = httpx.get(f"{url}/openapi.json").json()
    paths = spec["paths"]
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/responses"):
        responses = paths[path]["post"]["responses"]
        assert {"400", "401", "404", "429", "503"} <= set(responses) and "422" not in responses
        assert responses["429"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/ErrorResponse"
        assert "text/event-stream" in responses["200"]["content"]
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert paths["/v1/embeddings"]["post"]["security"] == [{"bearer": []}]
    assert spec["components"]["schemas"]["CompletionRequest"]["properties"]["model"]["enum"] == ["tiny"]


@pytest.mark.slow
def test_schemathesis_finds_nothing(tiny_tokenizer_dir, tmp_path):
    model = make_short_context_model(tiny_tokenizer_dir, tmp_path / "ctx16", 16)
    log = tmp_path / "server.log"
    with running_server(model, "--model-name", "tiny", env={"FASTSERVE_API_KEY": KEY}, log_path=log) as (url, _):
        cmd = [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "--config-file",
            str(CONFIG),
            "run",
            f"{url}/openapi.json",
            "-H",
            f"Authorization: Bearer {KEY}",
            "--max-examples",
            "15",
            "--seed",
            "1",
            "--no-color",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)  # its cache goes there
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "Traceback" not in log.read_text()
