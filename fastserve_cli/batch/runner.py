"""Run a batch file through the serving engine in-process: validate each line as the server would, keep the
engine's queue full, write each result as soon as its request finishes.

No HTTP and no event loop: the engine thread hands step outputs to per-line accumulators through the same
`on_output` callback the server uses, and a finished line is put on a queue the main thread drains while it
keeps reading, validating and tokenizing the next lines (tokenizing overlaps the engine's forward passes).
A window (`max_in_flight` engine requests) bounds memory on files of any size; it is far above the engine's
batch size, so the engine never waits for input.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fastserve_cli.batch.records import (
    CHAT_URL,
    EMBEDDINGS_URL,
    Line,
    ResultWriter,
    failure,
    line_error,
    read_lines,
    scan_input,
    success,
)


@dataclass
class BatchResult:
    total: int = 0
    skipped: int = 0  # answered by an earlier (killed) run of the same output
    succeeded: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0
    truncated_bytes: int = 0

    def metrics(self) -> dict[str, Any]:
        done = self.succeeded + self.failed
        torn = {"torn_tail_bytes_cut": self.truncated_bytes} if self.truncated_bytes else {}
        return {
            **torn,
            "requests": self.total,
            "resumed_skipped": self.skipped,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "elapsed_s": round(self.elapsed_s, 2),
            "requests_per_s": round(done / max(self.elapsed_s, 1e-9), 2),
            "completion_tokens_per_s": round(self.completion_tokens / max(self.elapsed_s, 1e-9), 1),
        }


@dataclass
class Pending:
    """One line in the engine: its choices' text, logprobs and finish reasons, filled by the engine thread."""

    line: Line
    plan: Any
    id: str
    created: int
    reqs: list = field(default_factory=list)
    texts: dict[int, list[str]] = field(default_factory=dict)
    entries: dict[int, list] = field(default_factory=dict)
    reasons: dict[int, str] = field(default_factory=dict)
    error: str | None = None
    remaining: int = 0


class BatchRun:
    """One pass over the input: owns the engine, the writer and the window of in-flight lines."""

    def __init__(
        self, loaded, model_name: str, writer: ResultWriter, max_in_flight: int, advance: Callable[[int, int], None]
    ) -> None:
        self.loaded, self.model_name, self.writer = loaded, model_name, writer
        self.max_in_flight = max_in_flight
        self.advance = advance  # (lines, completion tokens) -> progress display
        self.finished: queue.Queue[Pending] = queue.Queue()
        self.in_flight = 0
        self.result = BatchResult(truncated_bytes=writer.truncated_bytes)
        self._lock = threading.Lock()

    def run(self, input_path: Path) -> BatchResult:
        for line in read_lines(input_path):
            self.result.total += 1
            if line.key in self.writer.done:
                self.result.skipped += 1
                self.advance(1, 0)
                continue
            record = self.start(line)
            if record is not None:
                self.emit(record, failed=True)
            self.drain(block=self.in_flight >= self.max_in_flight)
        while self.in_flight:
            self.drain(block=True)
        return self.result

    # -- one line -------------------------------------------------------------------------------
    def start(self, line: Line) -> dict | None:
        """Validate and submit a line; a record right away when it cannot run."""
        from fastserve_cli.serve.protocol import OpenAIError

        if line.problem is not None:
            code = "invalid_url" if line.url is not None and "url" in line.problem else "invalid_request"
            return line_error(line, code, line.problem)
        if line.url == EMBEDDINGS_URL:
            return line_error(
                line,
                "unsupported_url",
                f"line {line.number}: this server has no /v1/embeddings "
                "endpoint for this model; send completions or chat completions",
            )
        try:
            plan = self.plan(line)
        except OpenAIError as err:
            return failure(line, err.status, err.body())
        self.submit(line, plan)
        return None

    def plan(self, line: Line):
        from pydantic import ValidationError

        from fastserve_cli.serve.handling import compile_plan, plan_chat, plan_completion
        from fastserve_cli.serve.protocol import ChatCompletionRequest, CompletionRequest, bad_request

        model = ChatCompletionRequest if line.url == CHAT_URL else CompletionRequest
        try:
            body = model.model_validate(line.body)
        except ValidationError as err:
            first = err.errors()[0]
            param = ".".join(str(p) for p in first.get("loc", ())) or None
            raise bad_request(f"{param or 'body'}: {first.get('msg', 'invalid request')}", param) from None
        if body.stream:
            raise bad_request("'stream' is not supported in a batch; remove it", param="stream")
        planner = plan_chat if line.url == CHAT_URL else plan_completion
        plan = planner(body, self.loaded, self.model_name)
        compile_plan(plan, self.loaded)  # structured outputs / forced tool calls: the server's grammar
        return plan

    def submit(self, line: Line, plan) -> None:
        from fastserve_cli.serve.handling import engine_requests
        from fastserve_cli.serve.protocol import new_id, now_s

        pending = Pending(line, plan, new_id("cmpl" if plan.kind == "completion" else "chatcmpl"), now_s())
        pairs = engine_requests(plan, plan.prompts, lambda index: lambda out: self.on_output(pending, index, out))
        pending.reqs = [req for _, req in pairs]
        for index, _ in pairs:
            pending.texts[index], pending.entries[index] = [], []
        pending.remaining = len(pairs)
        self.in_flight += len(pairs)
        self.loaded.engine.submit(pending.reqs)

    def on_output(self, pending: Pending, index: int, out) -> None:
        """Engine thread: accumulate; hand the line over once its last choice finished."""
        pending.texts[index].append(out.text)
        pending.entries[index].extend(out.logprobs)
        if out.error is not None:
            pending.error = out.error
        if out.finished:
            pending.reasons[index] = out.finish_reason
            pending.remaining -= 1
            if pending.remaining == 0:
                self.finished.put(pending)

    # -- results --------------------------------------------------------------------------------
    def drain(self, block: bool) -> None:
        """Write every finished line (waiting for at least one when `block`)."""
        while True:
            try:
                pending = self.finished.get(block=block, timeout=None if block else 0)
            except queue.Empty:
                return
            block = False
            self.in_flight -= len(pending.reqs)
            self.emit(*self.respond(pending))

    def respond(self, pending: Pending) -> tuple[dict, bool]:
        from fastserve_cli.serve.handling import make_choice, response_body
        from fastserve_cli.serve.protocol import OpenAIError

        if pending.error is not None:
            err = OpenAIError(500, f"generation failed: {pending.error}", type_="server_error")
            return failure(pending.line, 500, err.body()), True
        choices = [
            make_choice(
                pending.plan,
                self.loaded,
                i,
                "".join(pending.texts[i]),
                pending.entries[i],
                pending.reasons[i],
                final=True,
            )
            for i in sorted(pending.texts)
        ]
        generated = sum(r.num_generated for r in pending.reqs)
        self.result.prompt_tokens += pending.plan.prompt_tokens
        self.result.completion_tokens += generated
        body = response_body(pending.plan, pending.id, pending.created, choices, generated)
        return success(pending.line, body), False

    def emit(self, record: dict, failed: bool) -> None:
        self.writer.write(record)
        if failed:
            self.result.failed += 1
        else:
            self.result.succeeded += 1
        tokens = ((record.get("response") or {}).get("body") or {}).get("usage", {}).get("completion_tokens", 0)
        self.advance(1, tokens if not failed else 0)


def run_batch(
    target, cfg, input_path: Path, output_path: Path, max_in_flight: int = 1024, show_progress: bool = True
) -> BatchResult:
    """Answer every line of `input_path` not yet answered in `output_path` (appending to it)."""
    from fastserve_cli.serve import build_engine

    total = scan_input(input_path)
    writer = ResultWriter(output_path)
    try:
        if len(writer.done) >= total and all(line.key in writer.done for line in read_lines(input_path)):
            return BatchResult(total=total, skipped=total, truncated_bytes=writer.truncated_bytes)  # no model load
        pending_lines = total - len(writer.done)
        # the window bounds what waits; the engine's own queue limit must not turn it into errors
        loaded = build_engine(target, cfg.model_copy(update={"max_queue": 1 << 30}))
        loaded.engine.start()
        try:
            with _progress(total, len(writer.done), show_progress and pending_lines > 0) as advance:
                run = BatchRun(loaded, cfg.model_name or target.name, writer, max_in_flight, advance)
                started = time.perf_counter()
                result = run.run(input_path)
                result.elapsed_s = time.perf_counter() - started
        finally:
            loaded.engine.shutdown(0)
    finally:
        writer.close()
    return result


class _progress:
    """A rich progress bar on stderr (lines done of total, completion tokens/s, ETA), or nothing."""

    def __init__(self, total: int, already: int, enabled: bool) -> None:
        self.total, self.already, self.enabled = total, already, enabled
        self.tokens = 0
        self.started = time.perf_counter()

    def __enter__(self) -> Callable[[int, int], None]:
        if not self.enabled:
            return lambda lines, tokens: None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        from fastserve_cli.core.console import err_console

        self.bar = Progress(
            TextColumn("batch"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err_console(),
            transient=True,
        )
        self.bar.__enter__()
        self.task = self.bar.add_task("batch", total=self.total, rate="", completed=0)
        return self.advance

    def advance(self, lines: int, tokens: int) -> None:
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
        self.bar.update(self.task, advance=lines, rate=f"{rate:,.0f} tok/s")

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)
