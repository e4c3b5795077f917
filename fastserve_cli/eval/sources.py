"""The artifacts the eval stage evaluates, as lm-eval models.

- a torch directory (the trained model, an optimize variant): loaded with our loader (`load_causal_lm`, which
  also reads int8/int4 and head-pruned variants) and handed to lm-eval's `hf` model as an instance;
- an ONNX directory (the export, or an ONNX-quantized variant): `OnnxEvalLM`;
- `via: server`: `fastserve serve DIR` as a child process on a free port, and lm-eval's `local-completions`
  (log-likelihood tasks go through `echo` + `logprobs`, exactly as against vLLM).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from fastserve_cli.core.errors import UserError
from fastserve_cli.core.rundir import RunDir

SERVER_START_TIMEOUT_S = 300.0


@dataclass
class Source:
    label: str  # the key in results: `model`, `int8`, `onnx`, `onnx@server`
    source: str
    via: str
    model_dir: Path
    backend: str  # torch or onnx


def resolve_source(run: RunDir, source: str, via: str) -> Source:
    if source == "model":
        model_dir = run.model_dir
    elif source == "onnx":
        model_dir = run.onnx_dir
    else:
        model_dir = run.variant_dir(source)
    if not (model_dir / "config.json").is_file():
        known = (
            ["model", "onnx", *sorted(p.name for p in run.optimized_dir.iterdir() if p.is_dir())]
            if run.optimized_dir.is_dir()
            else ["model", "onnx"]
        )
        raise UserError(
            f"eval.sources: {source!r}: nothing to evaluate at {model_dir} (no config.json); run the stage "
            f"that writes it, or pick one of: {', '.join(known)}"
        )
    backend = "onnx" if (model_dir / "model.onnx").is_file() else "torch"
    return Source(source + ("@server" if via == "server" else ""), source, via, model_dir, backend)


def context_length(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return int(config.get("n_positions") or config.get("max_position_embeddings") or 2048)


def in_process_model(src: Source, batch_size: int, max_length: int | None):
    """An lm-eval `LM` running the artifact in this process."""
    if src.backend == "onnx":
        from fastserve_cli.eval.onnx_lm import OnnxEvalLM

        return OnnxEvalLM(src.model_dir, max_length=max_length, batch_size=batch_size)
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from fastserve_cli.models.loader import load_causal_lm

    model = load_causal_lm(src.model_dir, device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(src.model_dir)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def server_model(src: Source, url: str, batch_size: int, max_length: int | None):
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    # lm-eval keeps one position for the generated token: max_length - 1 prompt tokens at most
    return LocalCompletionsAPI(
        model=src.label,
        base_url=f"{url}/v1/completions",
        tokenizer=str(src.model_dir),
        tokenizer_backend="huggingface",
        tokenized_requests=True,
        batch_size=batch_size,
        max_length=max_length or context_length(src.model_dir),
        max_retries=1,
        timeout=600,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def running_server(src: Source, log_path: Path) -> Iterator[str]:
    """`fastserve serve` on the source's directory (fcfs: no start-up profiling); SIGTERM on exit."""
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "fastserve_cli",
        "serve",
        str(src.model_dir),
        "--backend",
        src.backend,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model-name",
        src.label,
        "--scheduler",
        "fcfs",
    ]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
        try:
            deadline = time.monotonic() + SERVER_START_TIMEOUT_S
            while not _healthy(url):
                if proc.poll() is not None:
                    raise UserError(
                        f"eval.sources: {src.label}: `fastserve serve` exited with {proc.returncode} "
                        f"before it was ready; see {log_path}"
                    )
                if time.monotonic() > deadline:
                    raise UserError(
                        f"eval.sources: {src.label}: the server was not ready after "
                        f"{SERVER_START_TIMEOUT_S:.0f} s; see {log_path}"
                    )
                time.sleep(0.3)
            yield url
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
