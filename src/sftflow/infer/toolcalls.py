"""Tool calling for the API: which chat templates render `tools`, how their tool calls look, parsing calls
back out of the generated text (whole, or as it streams: `ToolCallStream`), and the grammar that forces a
call (tool_choice required or named).

Two call formats cover the templates that render tools: `hermes` (Qwen2.5/3, Hermes, SmolLM3 and most
others: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call) and `json` (Llama 3.x:
the answer is a bare JSON object `{"name": ..., "parameters": {...}}`, or a list of them).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # (the API's light modules import this one)
    from transformers import PreTrainedTokenizerBase

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


def supports_tools(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's chat template renders a `tools` list (it mentions the variable)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = " ".join(template.values())
    return re.search(r"\btools\b", template) is not None


def call_format(tokenizer: PreTrainedTokenizerBase) -> Literal["hermes", "json"]:
    """`hermes` when the template writes `<tool_call>` blocks, else `json`."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = " ".join(template.values())
    return "hermes" if HERMES_OPEN in template else "json"


def _call(value: object) -> ToolCall | None:
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


_NAME_FIRST = re.compile(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")')
_ARGS_KEY = re.compile(r'\s*,\s*"(?:arguments|parameters)"\s*:\s*')


class _Depth:
    """JSON nesting over text that arrives in pieces (brackets inside strings do not count), to tell
    where a value that opens with `{` or `[` closes."""

    def __init__(self) -> None:
        self.depth, self.in_string, self.escape = 0, False, False

    def scan(self, text: str, start: int) -> int:
        """Read text[start:]; the index just past the bracket that closes the value, or -1 while open."""
        for i in range(start, len(text)):
            ch = text[i]
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        return -1


class _Call:
    """One call's JSON object while it is generated: text[start:end] once it closes."""

    def __init__(self, start: int) -> None:
        self.start, self.end, self.scanned = start, -1, start
        self.outer = _Depth()
        self.index: int | None = None  # its tool_calls index once its head is sent
        self.name = ""
        self.after_name = -1  # where the text after the name's string begins
        self.args = _Depth()
        self.args_from = -1  # arguments streamed up to here (-1: not streaming them)
        self.args_done = False


class ToolCallStream:
    """A streamed answer turned into OpenAI chat deltas as it is generated (vLLM's streamed tool calls).

    Content streams until a tool call may begin. Then, per call, a head delta (index, id, type, name,
    arguments "") is sent once the name is complete, and the arguments text as it is generated: the
    deltas of one index concatenate to its arguments JSON (the model's own spacing, so it parses as the
    same value `parse_tool_calls` returns). A call written arguments-first, or with arguments that are
    not an object or list, is sent whole when its object closes. If no call begins after all, the held
    text is sent as content when the answer ends, as without tools. A call whose name was sent is
    committed: text that later turns out not to be JSON leaves it incomplete (see `finish_reason`).

    >>> s = ToolCallStream("hermes")
    >>> [d for p in ['Hi <tool', '_call>{"name": "f", "arguments": {"x"', ': 1}}</tool_call>'] for d in s.feed(p)][0]
    {'content': 'Hi '}
    """

    def __init__(self, fmt: Literal["hermes", "json"], parallel: bool = True) -> None:
        self.fmt, self.parallel = fmt, parallel
        self.text = ""
        self.sent = 0  # content sent up to here
        self.region = -1  # where the calls begin (-1: not yet); content stops there
        self.plain = False  # json format: the answer is not a JSON value, so all of it is content
        self.is_list = False
        self.cursor = 0  # where to look for the next call
        self.call: _Call | None = None
        self.heads = 0  # calls whose head was sent
        self.complete = 0  # of those, the ones whose JSON parsed as a call
        self.over = False  # no further call is read

    def feed(self, piece: str) -> list[dict[str, Any]]:
        """The deltas that `piece` (the next generated text) completes, in order."""
        self.text += piece
        out: list[dict[str, Any]] = []
        if self.region < 0:
            safe = self._content_end()
            if safe > self.sent:
                out.append({"content": self.text[self.sent : safe]})
                self.sent = safe
        if self.region >= 0:
            out += self._calls()
        return out

    def finish(self) -> list[dict[str, Any]]:
        """The deltas left when the answer ends: the held text as content if no call began."""
        if self.heads == 0 and len(self.text) > self.sent:
            rest, self.sent = self.text[self.sent :], len(self.text)
            return [{"content": rest}]
        return []

    def finish_reason(self, generated: str | None) -> str | None:
        """`tool_calls` when every call sent is whole; else the generation's own reason (`length` for
        arguments cut off by max_tokens)."""
        return "tool_calls" if self.heads and self.complete == self.heads else generated

    def _content_end(self) -> int:
        """How much of the text is surely content; sets `region` once a call may begin."""
        text = self.text
        if self.fmt == "json":
            if self.plain:
                return len(text)
            stripped = text.lstrip()
            if not stripped:
                return 0  # leading blanks wait for the first character that decides
            if stripped[0] in "{[":
                self.region = self.cursor = len(text) - len(stripped)
                self.is_list = stripped[0] == "["
                if self.is_list:
                    self.cursor += 1
                return 0
            self.plain = True
            return len(text)
        start = text.find(HERMES_OPEN, self.sent)
        if start >= 0:
            self.region = self.cursor = start
            return start
        for k in range(len(HERMES_OPEN) - 1, 0, -1):  # a partial "<tool_call>" at the end waits
            if text.endswith(HERMES_OPEN[:k]):
                return len(text) - k
        return len(text)

    def _next_object(self) -> int:
        """Where the next call's `{` is (-1: not yet, or none will come); moves the cursor on."""
        text = self.text
        while True:
            if self.fmt == "hermes":
                tag = text.find(HERMES_OPEN, self.cursor)
                if tag < 0:
                    return -1
                j = tag + len(HERMES_OPEN)
            else:
                j = self.cursor
            while j < len(text) and (text[j].isspace() or (self.is_list and text[j] == ",")):
                j += 1
            if j == len(text):
                return -1
            if text[j] == "{":
                return j
            if self.fmt == "json":  # the list ended (or the single object did)
                self.over = True
                return -1
            self.cursor = j  # not a JSON object: the block is skipped, as parse_tool_calls does

    def _calls(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while not self.over:
            if self.call is None:
                start = self._next_object()
                if start < 0:
                    break
                self.call = _Call(start)
            out += self._advance(self.call)
            if self.call.end < 0:
                break
            self.cursor = self.call.end
            self.call = None
            if (self.fmt == "json" and not self.is_list) or (not self.parallel and self.heads):
                self.over = True
        return out

    def _head(self, call: _Call, name: str) -> dict[str, Any]:
        call.index, call.name = self.heads, name
        self.heads += 1
        head = {"index": call.index, "id": ToolCall(name, "").id, "type": "function"}
        return {"tool_calls": [{**head, "function": {"name": name, "arguments": ""}}]}

    def _args(self, call: _Call, text: str) -> dict[str, Any]:
        return {"tool_calls": [{"index": call.index, "function": {"arguments": text}}]}

    def _advance(self, call: _Call) -> list[dict[str, Any]]:
        text, out = self.text, []
        if call.end < 0:
            call.end = call.outer.scan(text, call.scanned)
            call.scanned = len(text)
        if call.index is None and call.end < 0 and (m := _NAME_FIRST.match(text, call.start)):
            try:
                name = json.loads(m.group(1))
            except json.JSONDecodeError:
                name = None
            if isinstance(name, str):
                out.append(self._head(call, name))
                call.after_name = m.end()
        if call.index is not None and call.after_name >= 0 and call.args_from < 0:
            key = _ARGS_KEY.match(text, call.after_name)
            if key and key.end() < len(text) and text[key.end()] in "{[":
                call.args_from = key.end()
        if call.args_from >= 0 and not call.args_done:
            close = call.args.scan(text, call.args_from)
            upto = len(text) if close < 0 else close
            if upto > call.args_from:
                out.append(self._args(call, text[call.args_from : upto]))
            call.args_from, call.args_done = upto, close >= 0
        if call.end >= 0:
            out += self._close(call)
        return out

    def _close(self, call: _Call) -> list[dict[str, Any]]:
        """The object closed: check that it is a call; send what was not streamed."""
        try:
            parsed = _call(json.loads(self.text[call.start : call.end]))
        except json.JSONDecodeError:
            parsed = None
        if call.index is None:  # arguments-first, or a name that was not a plain string
            if parsed is None:
                return []
            self.complete += 1
            return [self._head(call, parsed.name), self._args(call, parsed.arguments)]
        if parsed is None or parsed.name != call.name:
            return []
        self.complete += 1
        return [] if call.args_done else [self._args(call, parsed.arguments)]


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
