"""Tool calling: validate `tools`/`tool_choice`, constrain forced calls, parse calls out of the generated text.

Format: Hermes/Qwen style, which the ChatML template our tokenizer stage writes renders (see
core/tokenizer.py): each call is `<tool_call>\\n{"name": "...", "arguments": {...}}\\n</tool_call>`, calls are
separated by a newline. With `tool_choice` "required" or a named function the output is constrained by an
xgrammar structural tag, so it always parses and the arguments validate against the function's `parameters`;
with "auto" the model is free and calls are parsed when present. Streaming: text before a call is streamed as
`content` deltas; each call is sent as OpenAI sends tool-call deltas (id, type and name first, then the
arguments) once its closing tag has been generated.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastserve_cli.serve.grammar import GrammarSpec

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ToolError(ValueError):
    """A malformed `tools`/`tool_choice`/`parallel_tool_calls`; the message names the field (API: 400)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class ToolConfig:
    """The request's tools, normalized: OpenAI function-tool dicts and a choice of none/auto/required/<name>."""

    tools: list[dict[str, Any]] = field(default_factory=list)
    choice: str = "auto"  # "none" | "auto" | "required" | "function"
    forced_name: str | None = None
    parallel: bool = True

    @property
    def active(self) -> bool:
        """Whether tools are offered to the model (and calls parsed out of its output)."""
        return bool(self.tools) and self.choice != "none"


def tool_config(tools: Any, tool_choice: Any, parallel_tool_calls: Any) -> ToolConfig:
    """Validate the OpenAI tool fields; raises ToolError naming the bad field."""
    cfg = ToolConfig(parallel=True if parallel_tool_calls is None else bool(parallel_tool_calls))
    for i, tool in enumerate(tools or []):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ToolError(
                f"tools[{i}]: only {{'type': 'function', 'function': {{...}}}} tools are supported", f"tools[{i}]"
            )
        if not isinstance(fn.get("name"), str) or not _NAME_RE.match(fn["name"]):
            raise ToolError(
                f"tools[{i}].function.name: must be 1-64 letters, digits, '_' or '-'", f"tools[{i}].function.name"
            )
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ToolError(
                f"tools[{i}].function.parameters: must be a JSON Schema object", f"tools[{i}].function.parameters"
            )
        cfg.tools.append({"type": "function", "function": {**fn, "parameters": params}})
    names = [t["function"]["name"] for t in cfg.tools]
    if tool_choice is None:
        cfg.choice = "auto"
    elif tool_choice in ("none", "auto", "required"):
        cfg.choice = tool_choice
    elif isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        cfg.choice, cfg.forced_name = "function", tool_choice["function"].get("name")
        if cfg.forced_name not in names:
            raise ToolError(
                f"tool_choice: function '{cfg.forced_name}' is not among 'tools' ({', '.join(names) or 'none'})",
                "tool_choice",
            )
    else:
        raise ToolError(
            "tool_choice: use 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
            "tool_choice",
        )
    if cfg.choice in ("required", "function") and not cfg.tools:
        raise ToolError(f"tool_choice: '{cfg.choice}' needs at least one entry in 'tools'", "tool_choice")
    return cfg


def grammar_spec(cfg: ToolConfig) -> GrammarSpec | None:
    """An xgrammar structural tag forcing well-formed calls ("required" / named function); None otherwise."""
    if cfg.choice not in ("required", "function"):
        return None
    tools = [t for t in cfg.tools if cfg.choice == "required" or t["function"]["name"] == cfg.forced_name]
    tags = [
        {
            "type": "tag",
            "begin": f'{CALL_OPEN}\n{{"name": "{t["function"]["name"]}", "arguments": ',
            "content": {"type": "json_schema", "json_schema": t["function"]["parameters"], "max_whitespace_cnt": 1},
            "end": f"}}\n{CALL_CLOSE}",
        }
        for t in tools
    ]
    if cfg.choice == "function":
        fmt: dict[str, Any] = tags[0]
    else:
        fmt = {
            "type": "tags_with_separator",
            "tags": tags,
            "separator": "\n",
            "at_least_one": True,
            "stop_after_first": not cfg.parallel,
        }
    return GrammarSpec("structural_tag", json.dumps({"type": "structural_tag", "format": fmt}), "tools")


def tools_system_text(tools: list[dict[str, Any]]) -> str:
    """The Hermes tools preamble, for chat templates that do not render `tools` themselves."""
    sigs = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{sigs}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
        "<args-json-object>}\n</tool_call>"
    )


def template_message(msg: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI assistant message's tool_calls as chat templates expect them (arguments as a dict)."""
    calls = []
    for call in msg.get("tool_calls") or []:
        fn = dict(call.get("function") or {})
        if isinstance(fn.get("arguments"), str):
            try:
                fn["arguments"] = json.loads(fn["arguments"])
            except json.JSONDecodeError:
                pass  # templates print a string as it is
        calls.append({**call, "function": fn})
    return {**msg, "tool_calls": calls} if calls else msg


def _call(payload: str) -> dict[str, Any] | None:
    """One `{"name", "arguments"}` payload as an OpenAI tool call, or None when it does not parse."""
    try:
        obj = json.loads(payload)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)},
    }


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Split generated text into (content, tool calls); unparseable blocks stay in the content."""
    calls, kept, pos = [], [], 0
    for m in _CALL_RE.finditer(text):
        call = _call(m.group(1))
        if call is None:
            continue
        kept.append(text[pos : m.start()])
        calls.append(call)
        pos = m.end()
    kept.append(text[pos:])
    content = "".join(kept).strip() if calls else text
    return (content or None), calls


class ToolCallStreamer:
    """Turns streamed text into chat deltas: content outside calls, one tool-call delta pair per closed call."""

    def __init__(self) -> None:
        self.buffer = ""
        self.in_call = False
        self.num_calls = 0

    def feed(self, text: str, final: bool = False) -> list[dict[str, Any]]:
        self.buffer += text
        deltas: list[dict[str, Any]] = []
        while True:
            if self.in_call:
                end = self.buffer.find(CALL_CLOSE)
                if end == -1:
                    break
                payload = self.buffer[:end]
                self.buffer, self.in_call = self.buffer[end + len(CALL_CLOSE) :].lstrip("\n"), False
                deltas += self._call_deltas(payload)
                continue
            start = self.buffer.find(CALL_OPEN)
            if start == -1:
                keep = 0 if final else _partial_suffix(self.buffer, CALL_OPEN)
                out, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep :]
                if out.strip() or (out and not self.num_calls):
                    deltas.append({"content": out})
                break
            if self.buffer[:start].strip() or (start and not self.num_calls):
                deltas.append({"content": self.buffer[:start]})
            self.buffer, self.in_call = self.buffer[start + len(CALL_OPEN) :], True
        if final and self.in_call and self.buffer:  # cut off inside a call (length): hand the raw text back
            deltas.append({"content": CALL_OPEN + self.buffer})
            self.buffer = ""
        return deltas

    def _call_deltas(self, payload: str) -> list[dict[str, Any]]:
        call = _call(payload.strip())
        if call is None:
            return [{"content": f"{CALL_OPEN}{payload}{CALL_CLOSE}"}]
        index, self.num_calls = self.num_calls, self.num_calls + 1
        head = {
            "index": index,
            "id": call["id"],
            "type": "function",
            "function": {"name": call["function"]["name"], "arguments": ""},
        }
        body = {"index": index, "function": {"arguments": call["function"]["arguments"]}}
        return [{"tool_calls": [head]}, {"tool_calls": [body]}]


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker` (held back while streaming)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0
