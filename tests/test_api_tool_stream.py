"""Streamed tool calls as vLLM and OpenAI send them: a head delta (index, id, type, name, arguments "")
once a call's name is known, then the arguments piece by piece. Checked on the incremental parser
(`ToolCallStream`) with exact texts, through the server with a scripted engine (content before the
calls, parallel calls, both call formats), and on a tiny model forced to call a tool."""

from __future__ import annotations

import json
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from helpers import TOOL_TEMPLATE, ScriptedStream, make_run_dir, serve
from sftflow.infer.requests import ChatResult, Completion
from sftflow.infer.toolcalls import ToolCallStream, parse_tool_calls

openai = pytest.importorskip("openai")

QUESTION = [{"role": "user", "content": "Plan my trip."}]
HERMES = (
    "Let me look that up for you. "
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2, 3], '
    '"unit": "celsius"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"zone": "Europe/Paris"}}\n</tool_call>'
)
LLAMA = (
    '[{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}, '
    '{"name": "get_time", "parameters": {}}]'
)
TRIP = {
    "type": "function",
    "function": {
        "name": "book_trip",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "nights": {"type": "integer"},
                "note": {"type": "string", "maxLength": 30},
            },
            "required": ["city", "nights", "note"],
            "additionalProperties": False,
        },
    },
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


def feed(text: str, fmt: str, step: int, parallel: bool = True) -> tuple[list[dict[str, Any]], str | None]:
    stream = ToolCallStream(fmt, parallel)  # type: ignore[arg-type]
    deltas = [d for i in range(0, len(text), step) for d in stream.feed(text[i : i + step])]
    return deltas + stream.finish(), stream.finish_reason("stop")


def gather(deltas: list[dict[str, Any]]) -> tuple[str, dict[int, dict[str, Any]]]:
    """Content and, per tool_calls index, its name, id and the arguments deltas (OpenAI's delta shape)."""
    content, calls = "", {}
    for delta in deltas:
        content += delta.get("content") or ""
        for part in delta.get("tool_calls") or []:
            if part["index"] not in calls:  # the head: everything but the arguments
                assert part["type"] == "function" and part["id"].startswith("call_")
                assert part["function"]["arguments"] == ""
                calls[part["index"]] = {"name": part["function"]["name"], "id": part["id"], "pieces": []}
            else:
                assert set(part) == {"index", "function"} and set(part["function"]) == {"arguments"}
                calls[part["index"]]["pieces"].append(part["function"]["arguments"])
    return content, calls


@pytest.mark.parametrize("step", [1, 4, 11, len(HERMES)])
def test_hermes_calls_stream_as_heads_then_argument_pieces(step):
    deltas, finish = feed(HERMES, "hermes", step)
    content, calls = gather(deltas)
    want_content, want = parse_tool_calls(HERMES, "hermes")
    assert content.strip() == want_content and finish == "tool_calls"
    assert sorted(calls) == [0, 1] and [calls[k]["name"] for k in (0, 1)] == [c.name for c in want]
    for k, call in enumerate(want):
        assert json.loads("".join(calls[k]["pieces"])) == json.loads(call.arguments)
    if step < 20:  # the arguments come as they are generated, not at the end
        assert len(calls[0]["pieces"]) > 2
    # content comes first, each call's head before its arguments, call 0 whole before call 1
    kinds = [-1 if "content" in d else d["tool_calls"][0]["index"] for d in deltas]
    assert kinds[0] == -1 and kinds == sorted(kinds)


def test_llama_json_list_streams_each_call_with_its_index():
    deltas, finish = feed(LLAMA, "json", 5)
    content, calls = gather(deltas)
    _, want = parse_tool_calls(LLAMA, "json")
    assert content == "" and finish == "tool_calls"
    assert [calls[k]["name"] for k in (0, 1)] == ["get_weather", "get_time"]
    assert [json.loads("".join(calls[k]["pieces"])) for k in (0, 1)] == [
        {"city": "Paris", "unit": "celsius"},
        {},
    ]
    assert [json.loads(c.arguments) for c in want] == [
        json.loads("".join(calls[k]["pieces"])) for k in (0, 1)
    ]


def test_a_call_written_arguments_first_is_sent_whole_when_it_closes():
    text = '<tool_call>{"arguments": {"zone": "UTC"}, "name": "get_time"}</tool_call>'
    deltas, finish = feed(text, "hermes", 3)
    _, calls = gather(deltas)
    assert calls[0]["name"] == "get_time" and calls[0]["pieces"] == ['{"zone": "UTC"}']
    assert finish == "tool_calls" and len(deltas) == 2


@pytest.mark.parametrize(
    ("text", "fmt"),
    [
        ("Paris is sunny today.", "hermes"),
        ("Sure <tool_call>not json</tool_call>", "hermes"),
        ('  {"answer": 4}', "json"),  # a JSON answer that is no call stays content
        ("It is 4 {braces}.", "json"),
    ],
)
def test_text_without_a_call_is_all_content(text, fmt):
    deltas, finish = feed(text, fmt, 3)
    content, calls = gather(deltas)
    assert content == text and not calls and finish == "stop"
    assert parse_tool_calls(text, fmt) == (text, [])  # type: ignore[arg-type]


def test_parallel_off_streams_the_first_call_only():
    _, calls = gather(feed(HERMES, "hermes", 4, parallel=False)[0])
    assert list(calls) == [0] and calls[0]["name"] == "get_weather"


def test_a_call_cut_off_keeps_the_generations_finish_reason():
    stream = ToolCallStream("hermes")
    deltas = stream.feed('<tool_call>{"name": "get_weather", "arguments": {"city": "Par')
    _, calls = gather(deltas)
    assert calls[0]["name"] == "get_weather" and "".join(calls[0]["pieces"]) == '{"city": "Par'
    assert stream.finish() == [] and stream.finish_reason("length") == "length"


# -- through the server ---------------------------------------------------------------------------


class ScriptedEngine:
    """The parts of ChatEngine the chat route uses, answering every request with `text`."""

    def __init__(self, text: str, template: str) -> None:
        self.text, self.model_name, self.held, self.max_queue = text, "scripted", 0, 4
        self.tokenizer = SimpleNamespace(chat_template=template, encode=lambda text, **_: [1, 2, 3])
        self.generating = SimpleNamespace(serve_max_body_bytes=2**20)
        self.thinking = None  # no reasoning template

    def prompt(self, messages: list[dict[str, Any]], tools: Any = None, requested: Any = None) -> str:
        return "prompt"

    def encode(self, messages: list[dict[str, Any]], tools: Any = None) -> list[int]:
        return [1, 2, 3]

    def stream_ids(self, prompt_ids: list[int], params: Any, index: int = 0) -> tuple[ScriptedStream, int]:
        return ScriptedStream(self.text, 3), len(prompt_ids)

    def stream_all(self, prompt_ids: list[int], params: Any) -> list[ScriptedStream]:
        return [ScriptedStream(self.text, 3) for _ in range(params.n)]

    def submit_ids(self, prompt_ids: list[int], params: Any) -> Future:
        future: Future = Future()
        future.set_result(ChatResult([Completion(self.text, "stop", 1)], len(prompt_ids)))
        return future


def stream_and_plain(text: str, template: str, **kwargs: Any) -> tuple[list[Any], Any]:
    from sftflow.infer.api import create_app

    with serve(create_app(ScriptedEngine(text, template))) as base_url:  # type: ignore[arg-type]
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
        request = {"model": "scripted", "messages": QUESTION, "tools": [WEATHER, CLOCK], **kwargs}
        chunks = list(client.chat.completions.create(stream=True, **request))
        return chunks, client.chat.completions.create(**request).choices[0]


def deltas_of(chunks: list[Any]) -> list[dict[str, Any]]:
    return [c.choices[0].delta.model_dump(exclude_none=True) for c in chunks if c.choices]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("text", "template"), [(HERMES, TOOL_TEMPLATE), (LLAMA, "{{ tools }}{{ messages }}")]
)
def test_server_streams_content_then_parallel_calls(text, template):
    chunks, plain = stream_and_plain(text, template)
    deltas = deltas_of(chunks)[1:]  # after the role delta
    content, calls = gather(deltas)
    assert plain.finish_reason == "tool_calls" and len(plain.message.tool_calls) == 2
    for k, call in enumerate(plain.message.tool_calls):
        assert calls[k]["name"] == call.function.name and calls[k]["id"].startswith("call_")
        assert json.loads("".join(calls[k]["pieces"])) == json.loads(call.function.arguments)
        assert len(calls[k]["pieces"]) > 1 or json.loads(call.function.arguments) == {}
    assert content.strip() == (plain.message.content or "")
    if plain.message.content:  # content arrives in pieces, before the first call's head
        pieces = [d["content"] for d in deltas if d.get("content")]
        first_call = next(i for i, d in enumerate(deltas) if d.get("tool_calls"))
        assert len(pieces) > 3 and all("content" not in d for d in deltas[first_call:])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


@pytest.mark.integration
def test_server_plain_answer_with_tools_streams_as_content():
    text = "No tool is needed: it is sunny."
    chunks, plain = stream_and_plain(text, TOOL_TEMPLATE)
    content, calls = gather(deltas_of(chunks))
    assert content == plain.message.content == text and not calls and plain.finish_reason == "stop"
    assert len([d for d in deltas_of(chunks) if d.get("content")]) > 3


@pytest.mark.integration
def test_server_parallel_tool_calls_false_streams_one_call():
    chunks, plain = stream_and_plain(HERMES, TOOL_TEMPLATE, parallel_tool_calls=False)
    _, calls = gather(deltas_of(chunks))
    assert list(calls) == [0] and [c.function.name for c in plain.message.tool_calls] == ["get_weather"]


# -- a tiny model forced to call ---------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    pytest.importorskip("llguidance")
    from transformers import AutoTokenizer

    from sftflow.config.run_dir import infer_args
    from sftflow.infer.api import create_app
    from sftflow.infer.engine import load_engine

    out: Path = make_run_dir(tiny_model_dir, tmp_path_factory.mktemp("run"))
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = TOOL_TEMPLATE
    tokenizer.save_pretrained(out)
    engine = load_engine(infer_args(str(out), []), batched=True)
    try:
        with serve(create_app(engine)) as base_url:
            yield base_url
    finally:
        engine.close()


@pytest.mark.integration
def test_forced_call_arguments_stream_to_the_non_streamed_json(server):
    client = openai.OpenAI(base_url=server, api_key="unused", max_retries=0)
    request = {
        "model": "sftflow",
        "messages": QUESTION,
        "tools": [TRIP],
        "tool_choice": {"type": "function", "function": {"name": "book_trip"}},
        "max_tokens": 120,
        "temperature": 0,
    }
    plain = client.chat.completions.create(**request).choices[0]
    (want,) = plain.message.tool_calls
    chunks = list(client.chat.completions.create(stream=True, **request))
    content, calls = gather(deltas_of(chunks))
    assert content == "" and list(calls) == [0] and calls[0]["name"] == "book_trip"
    assert len(calls[0]["pieces"]) > 5  # token by token, not one delta at the end
    assert json.loads("".join(calls[0]["pieces"])) == json.loads(want.function.arguments)
    assert set(json.loads(want.function.arguments)) == {"city", "nights", "note"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
