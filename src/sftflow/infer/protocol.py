"""The request bodies of sftflow's OpenAI-compatible routes (pydantic models, vLLM's protocol as the
reference). Every part refuses fields it does not know, and values the server cannot honour are refused
by validators, so nothing a client sends is silently ignored. Booleans are strict (`"yes"` is refused), and
text holding a lone surrogate (`"\\ud800"`, which json.loads lets through) is refused where it stands.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

MAX_N = 16
MAX_STOPS = 4
MAX_STOP_CHARS = 256
MAX_TOP_LOGPROBS = 20
MAX_SEED = 2**63 - 1  # a seed is a signed 64-bit integer (vLLM's bound; torch.manual_seed's range)
PYDANTIC_TYPES = {"str", "int", "float", "bool", "list", "dict", "none"}


class Strict(BaseModel):
    """Request parts refuse fields they do not know (nothing is silently ignored)."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _unicode(cls, value: Any, info: ValidationInfo) -> Any:
        where = lone_surrogate(value, str(info.field_name))
        if where is not None:  # (the outermost field fails first: `where` is the path from the body)
            raise PydanticCustomError(
                "lone_surrogate", "a lone surrogate is not unicode text", {"param": where}
            )
        return value


class TextPart(Strict):
    """A text part of a message's content list (images and audio are not supported)."""

    type: Literal["text"]
    text: str


class FunctionCall(Strict):
    name: str
    arguments: str


class ToolCallIn(Strict):
    """An assistant message's earlier tool call (sent back in the history)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Strict):
    """One chat message of a request (`developer` is taken as `system`)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = Field(None, validate_default=True)
    reasoning_content: str | None = None  # an earlier answer's thought, as this server sends it

    @field_validator("tool_call_id")
    @classmethod
    def _tool_call_id(cls, value: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("role") == "tool" and not value:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return value

    @model_validator(mode="after")
    def _thought_on_answers(self) -> Message:
        if self.reasoning_content is not None and self.role != "assistant":
            raise ValueError("reasoning_content is only taken on assistant messages")
        return self

    def to_template(self) -> dict[str, Any]:
        """The message as chat templates take it (tool-call arguments as objects when they are JSON)."""
        text = self.content if isinstance(self.content, str) or self.content is None else ""
        if isinstance(self.content, list):
            text = "".join(part.text for part in self.content)
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_calls:
            calls = []
            for call in self.tool_calls:
                try:
                    arguments: Any = json.loads(call.function.arguments)
                except json.JSONDecodeError:
                    arguments = call.function.arguments
                calls.append(
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.function.name, "arguments": arguments},
                    }
                )
            out["tool_calls"] = calls
        if self.reasoning_content is not None:
            out["reasoning_content"] = self.reasoning_content
        if self.role == "tool":
            out["tool_call_id"] = self.tool_call_id
            if self.name:
                out["name"] = self.name
        return out


class StreamOptions(Strict):
    """`stream_options`: include_usage adds a last chunk with the usage counts."""

    include_usage: StrictBool = False


class FunctionDef(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(Strict):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object with name and schema")
        return self


class SamplingFields(Strict):
    """Fields both completion routes share."""

    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-MAX_SEED - 1, le=MAX_SEED)
    user: str | None = None  # an end-user id (OpenAI: for abuse monitoring); logged, changes nothing
    frequency_penalty: float = 0
    presence_penalty: float = 0
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(
                f"stop takes up to {MAX_STOPS} non-empty strings of up to {MAX_STOP_CHARS} characters"
            )
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> None:
        if value:
            raise ValueError("logit_bias is not supported by this server")
        return None

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _penalty(cls, value: float) -> float:
        if value != 0:
            raise ValueError("only 0 is supported (set repetition_penalty in the server's config instead)")
        return 0.0


class ChatCompletionRequest(SamplingFields):
    """The body of POST /v1/chat/completions; out-of-range or unsupported values are refused with 400."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True
    # extra chat template variables (vLLM's field), e.g. {"enable_thinking": false}; checked against the
    # template by the engine (infer/reasoning.py: template_kwargs)
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _combinations(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.tool_choice is not None and not self.tools:
            raise ValueError("tool_choice needs tools")
        forced = self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)
        if forced and self.response_format is not None and self.response_format.type != "text":
            raise ValueError(
                "response_format json_object/json_schema cannot be combined with a forced tool_choice"
            )
        return self


class CompletionRequest(SamplingFields):
    """The body of POST /v1/completions (OpenAI's legacy completions, as lm-eval's local-completions uses)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    echo: StrictBool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _combinations(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix (fill in the middle) is not supported by this server")
        if self.best_of not in (None, self.n):
            raise ValueError("best_of other than n is not supported by this server")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 only makes sense with echo (scoring the prompt)")
        return self


def lone_surrogate(value: Any, path: str) -> str | None:
    """Where in `value` (a JSON value) a string holds a lone surrogate, which no tokenizer can encode: the
    path from `path` down, or None.

    >>> lone_surrogate({"a": ["ok", "\\ud800"]}, "x"), lone_surrogate("fine", "x")
    ('x.a.1', None)
    """
    stack = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return where
        elif isinstance(item, dict):
            stack += [(k, where) for k in item] + [(v, f"{where}.{k}") for k, v in item.items()]
        elif isinstance(item, list | tuple):
            stack += [(v, f"{where}.{i}") for i, v in enumerate(item)]
    return None


def field_path(loc: tuple[Any, ...]) -> str | None:
    """The request field a validation error names: "messages.0.role", without the union member names
    pydantic puts in the location ("str", "list[int]", "NamedToolChoice", ...).

    >>> field_path(("body", "tool_choice", "NamedToolChoice", "function", "name"))
    'tool_choice.function.name'
    """
    parts = [str(p) for p in loc]
    parts = parts[1:] if parts[:1] == ["body"] else parts
    keep = [p for p in parts if re.fullmatch(r"[a-z_][a-z0-9_]*|\d+", p) and p not in PYDANTIC_TYPES]
    return ".".join(keep) or None
