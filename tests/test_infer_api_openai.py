"""The OpenAI surface beyond plain chat, driven by the official `openai` client on a real server (tiny
model + LoRA adapter, a ChatML template with tool support): tools (forced, plain and streamed, tool
results in the history), response_format json_object / json_schema, logprobs + top_logprobs,
/v1/completions with echo and logprobs (lm-eval's local-completions payload), /health, 429 when the
queue is full, refused fields, and a disconnecting client that cancels its request."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import TOOL_TEMPLATE, make_run_dir, post, serve
from sftflow.config.run_dir import infer_args
from sftflow.infer.engine import load_engine
from sftflow.infer.requests import SamplingParams

openai = pytest.importorskip("openai")
pytest.importorskip("llguidance")
pytestmark = pytest.mark.integration  # every test talks to a uvicorn server

QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 4}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    out = make_run_dir(tiny_model_dir, tmp_path_factory.mktemp("run"))
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = TOOL_TEMPLATE
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def engine(run_dir):
    engine = load_engine(infer_args(str(run_dir), ["serve_max_queue=3"]), batched=True)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def server(engine) -> Iterator[str]:
    from sftflow.infer.api import create_app

    with serve(create_app(engine)) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key="unused", max_retries=0)


def test_health(server):
    with urllib.request.urlopen(server.removesuffix("/v1") + "/health", timeout=10) as response:
        body = json.loads(response.read())
    assert response.status == 200 and body["status"] == "ok" and body["max_queue"] == 3


def test_forced_tool_call_is_parsed_back(client):
    response = client.chat.completions.create(
        model="sftflow",
        messages=QUESTION,
        tools=[WEATHER, CLOCK],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=75,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city"} and len(arguments["city"]) <= 4
    required = client.chat.completions.create(
        model="sftflow", messages=QUESTION, tools=[WEATHER, CLOCK], tool_choice="required", max_tokens=75
    )
    assert required.choices[0].message.tool_calls[0].function.name in {"get_weather", "get_time"}


def test_streamed_tool_call_deltas_accumulate_to_the_call(client):
    stream = client.chat.completions.create(
        model="sftflow",
        messages=QUESTION,
        tools=[WEATHER],
        tool_choice="required",
        max_tokens=75,
        stream=True,
    )
    name, arguments, finish, content = "", "", None, ""
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for part in delta.tool_calls or []:
            name += part.function.name or ""
            arguments += part.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert name == "get_weather" and "city" in json.loads(arguments)
    assert finish == "tool_calls" and "<tool_call>" not in content


def test_tool_results_in_the_history_are_rendered(client, engine):
    history = [
        *QUESTION,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    response = client.chat.completions.create(
        model="sftflow", messages=history, tools=[WEATHER], max_tokens=4
    )
    assert response.choices[0].finish_reason in ("stop", "length")
    from sftflow.infer.protocol import Message

    rendered = [Message(**m).to_template() for m in history]  # what the server hands the template
    prompt = engine.tokenizer.decode(engine.encode(rendered, [WEATHER]))
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in prompt
    assert "sunny, 21 C" in prompt and "get_weather" in prompt.split("<|im_start|>user")[0]


def test_tools_on_a_template_without_tool_support_get_400(tiny_model_dir, tmp_path):
    from sftflow.infer.api import create_app

    plain = load_engine(infer_args(str(make_run_dir(tiny_model_dir, tmp_path)), []))
    try:
        with serve(create_app(plain)) as base_url:
            client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
            with pytest.raises(openai.BadRequestError, match="does not render tools") as info:
                client.chat.completions.create(model="sftflow", messages=QUESTION, tools=[WEATHER])
            assert info.value.body["param"] == "tools"
    finally:
        plain.close()


def test_response_format_json_schema_and_json_object(client):
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer"}, "sure": {"type": "boolean"}},
        "required": ["answer", "sure"],
        "additionalProperties": False,
    }
    response = client.chat.completions.create(
        model="sftflow",
        messages=QUESTION,
        max_tokens=80,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
    )
    value = json.loads(response.choices[0].message.content)
    assert (
        set(value) == {"answer", "sure"}
        and isinstance(value["answer"], int)
        and isinstance(value["sure"], bool)
    )
    free = client.chat.completions.create(
        model="sftflow", messages=QUESTION, max_tokens=75, response_format={"type": "json_object"}, seed=3
    )
    if free.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(free.choices[0].message.content), dict)
    else:
        assert free.choices[0].message.content.lstrip().startswith("{")
    with pytest.raises(openai.BadRequestError, match="cannot be enforced") as info:
        client.chat.completions.create(
            model="sftflow",
            messages=QUESTION,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
        )
    assert info.value.body["param"] == "response_format.json_schema.schema"


def test_chat_logprobs_and_top_logprobs(client, engine):
    response = client.chat.completions.create(
        model="sftflow", messages=QUESTION, max_tokens=5, logprobs=True, top_logprobs=3
    )
    items = response.choices[0].logprobs.content
    assert len(items) == response.usage.completion_tokens == 5
    expected = engine.generate(QUESTION, SamplingParams(max_new_tokens=5, logprobs=True, top_logprobs=3))
    for item, reference in zip(items, expected.choices[0].logprobs, strict=True):
        assert item.token == reference.token and item.logprob == pytest.approx(reference.logprob)
        assert len(item.top_logprobs) == 3 and item.top_logprobs[0].logprob >= item.logprob - 1e-6
    streamed = client.chat.completions.create(
        model="sftflow", messages=QUESTION, max_tokens=5, logprobs=True, stream=True
    )
    got = [
        t.logprob
        for chunk in streamed
        for t in ((chunk.choices[0].logprobs or None) and chunk.choices[0].logprobs.content or [])
    ]
    assert got == pytest.approx([i.logprob for i in items])


def test_completions_echo_logprobs_like_lm_eval(client, engine):
    import torch

    context = engine.tokenizer.encode("Paris is the capital of", add_special_tokens=False)
    continuation = engine.tokenizer.encode(" France", add_special_tokens=False)
    ids = context + continuation
    # lm-eval local-completions' loglikelihood payload
    response = client.completions.create(
        model="sftflow", prompt=[ids], temperature=0, max_tokens=1, logprobs=1, seed=1234, echo=True
    )
    choice = response.choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.token_logprobs) == len(ids) + 1 and logprobs.token_logprobs[0] is None
    with torch.no_grad():
        reference = torch.log_softmax(engine.model(torch.tensor([ids])).logits[0].float(), dim=-1)
    want = sum(float(reference[p - 1, ids[p]]) for p in range(len(context), len(ids)))
    assert sum(logprobs.token_logprobs[len(context) : -1]) == pytest.approx(want, abs=1e-3)
    for p in range(1, len(ids)):
        assert max(logprobs.top_logprobs[p].values()) == pytest.approx(
            float(reference[p - 1].max()), abs=1e-4
        )
    assert choice.text.startswith(engine.tokenizer.decode(ids))
    text = client.completions.create(model="sftflow", prompt="The quick brown", max_tokens=4, temperature=0)
    assert text.choices[0].finish_reason in ("stop", "length") and text.usage.completion_tokens <= 4
    streamed = client.completions.create(
        model="sftflow", prompt="The quick brown", max_tokens=4, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text.choices[0].text
    with pytest.raises(openai.BadRequestError, match="vocabulary") as info:
        client.completions.create(model="sftflow", prompt=[[10**6]], max_tokens=1)
    assert info.value.body["param"] == "prompt"


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"messages": QUESTION, "functions": []}, "functions", "unknown field"),
        ({"messages": QUESTION, "presence_penalty": 0.5}, "presence_penalty", "only 0"),
        ({"messages": QUESTION, "logit_bias": {"5": 1}}, "logit_bias", "not supported"),
        ({"messages": QUESTION, "top_logprobs": 2}, None, "needs logprobs"),
        ({"messages": QUESTION, "tool_choice": "auto"}, None, "needs tools"),
        ({"messages": QUESTION, "response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
        (
            {
                "messages": QUESTION,
                "tools": [WEATHER],
                "tool_choice": {"type": "function", "function": {"name": "nope"}},
            },
            "tool_choice",
            "not in tools",
        ),
    ],
)
def test_refused_fields_name_the_field(server, body, param, message):
    status, error = post(server, body)
    assert status == 400, error
    assert error["error"]["param"] == param and message in error["error"]["message"]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4o", messages=QUESTION, max_tokens=1)


def test_full_queue_answers_429_with_retry_after(server, engine):
    streams = [engine.stream(QUESTION, SamplingParams(max_new_tokens=400))[0] for _ in range(3)]
    try:
        request = urllib.request.Request(
            f"{server}/chat/completions",
            json.dumps({"messages": QUESTION, "max_tokens": 2}).encode(),
            {"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=30)
        assert info.value.code == 429 and int(info.value.headers["Retry-After"]) >= 1
        assert json.loads(info.value.read())["error"]["type"] == "rate_limit_error"
    finally:
        for stream in streams:
            stream.close()


def test_streamed_n_past_the_queue_is_refused_before_any_event(server, engine):
    body = {"messages": QUESTION, "max_tokens": 4, "temperature": 0.8, "n": 4, "stream": True}
    request = urllib.request.Request(
        f"{server}/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as info:  # 4 answers, serve_max_queue=3: never admitted
        urllib.request.urlopen(request, timeout=30)
    assert info.value.code == 400 and json.loads(info.value.read())["error"]["param"] == "n"
    assert engine.held == 0  # nothing was queued
    body["n"] = 3  # fits: all three stream, each chunk naming its choice
    request = urllib.request.Request(
        f"{server}/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        events = [line for line in response.read().decode().splitlines() if line.startswith("data: {")]
    finishes = [c["index"] for e in events for c in json.loads(e[6:])["choices"] if c["finish_reason"]]
    assert finishes == [0, 1, 2]


def test_disconnecting_client_cancels_its_request(server, engine):
    import http.client

    host, port = server.removeprefix("http://").removesuffix("/v1").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    body = json.dumps({"model": "sftflow", "messages": QUESTION, "max_tokens": 400, "stream": True})
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    response.readline()  # the first event: generation has started
    assert engine.held == 1
    connection.close()
    deadline = time.monotonic() + 20
    while engine.held and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine.held == 0  # the slot is free
