"""Tool calling for the API: which chat templates render `tools`, how their tool calls look, parsing calls
back out of the generated text, and the grammar that forces a call (tool_choice required or named).

Two call formats cover the templates that render tools: `hermes` (Qwen2.5/3, Hermes, SmolLM3 and most
others: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call) and `json` (Llama 3.x:
the answer is a bare JSON object `{"name": ..., "parameters": {...}}`, or a list of them).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(HERMES_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(HERMES_CLOSE) + r"|$)", re.S)


@dataclass
class ToolCall:
    """One parsed call: the function's name and its arguments as a JSON string (OpenAI's shape)."""

    name: str
    arguments: str
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        if index is not None:
            out["index"] = index
        return out


def supports_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders a `tools` list (it mentions the variable)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = " ".join(template.values())
    return re.search(r"\btools\b", template) is not None


def call_format(tokenizer: Any) -> Literal["hermes", "json"]:
    """`hermes` when the template writes `<tool_call>` blocks, else `json`."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = " ".join(template.values())
    return "hermes" if HERMES_OPEN in template else "json"


def _call(value: Any) -> ToolCall | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return ToolCall(value["name"], arguments)


def parse_tool_calls(text: str, fmt: Literal["hermes", "json"]) -> tuple[str, list[ToolCall]]:
    """Split generated text into (content, tool calls); text without a well-formed call is all content.

    >>> parse_tool_calls('Sure.<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>', "hermes")
    ('Sure.', [ToolCall(name='f', arguments='{"x": 1}', id=...)])
    """
    if fmt == "hermes":
        start = text.find(HERMES_OPEN)
        if start < 0:
            return text, []
        calls = []
        for block in _BLOCK.findall(text[start:]):
            try:
                call = _call(json.loads(block))
            except json.JSONDecodeError:
                call = None
            if call is not None:
                calls.append(call)
        return (text[:start].strip(), calls) if calls else (text, [])
    stripped = text.strip()
    if not stripped.startswith(("{", "[")):
        return text, []
    try:
        value = json.loads(stripped)
    except json.JSONDecodeError:
        return text, []
    items = value if isinstance(value, list) else [value]
    calls = [c for c in (_call(item) for item in items) if c is not None]
    return ("", calls) if calls and len(calls) == len(items) else (text, [])


def may_start_call(text: str, fmt: Literal["hermes", "json"]) -> int:
    """Where a tool call may begin in streamed text (len(text) if nowhere yet): content before it can be
    streamed; from there on the text is held until the answer ends and is parsed."""
    if fmt == "json":
        stripped = text.lstrip()
        return 0 if not stripped or stripped[0] in "{[" else len(text)
    start = text.find(HERMES_OPEN)
    if start >= 0:
        return start
    for k in range(len(HERMES_OPEN) - 1, 0, -1):  # a partial "<tool_call>" at the end
        if text.endswith(HERMES_OPEN[:k]):
            return len(text) - k
    return len(text)


def forced_call_lark(tools: list[dict[str, Any]], name: str | None, fmt: Literal["hermes", "json"]) -> str:
    """Lark source for exactly one call to `name` (or to any of `tools` when None), in the template's
    format, its arguments matching the function's `parameters` schema."""
    options = []
    for tool in tools:
        function = tool["function"]
        if name is not None and function["name"] != name:
            continue
        parameters = function.get("parameters") or {"type": "object"}
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": function["name"]}, "arguments": parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    schema = {**schema, "x-guidance": {"whitespace_flexible": False}}  # compact JSON: no runs of spaces
    body = "%json " + json.dumps(schema)
    if fmt == "hermes":
        return f"start: {json.dumps(HERMES_OPEN + chr(10))} call {json.dumps(chr(10) + HERMES_CLOSE)}\ncall: {body}"
    return f"start: call\ncall: {body}"
