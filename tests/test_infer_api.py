"""The OpenAI-compatible server, driven by the official `openai` client against a real uvicorn server on
a free port (tiny model + LoRA adapter): models, plain and streamed completions, usage, n, stop, 4xx
validation, the API key, concurrent requests, and the `sftflow api` command itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from helpers import QUESTION, free_port, post, serve, wait_ready
from sftflow.config.run_dir import infer_args
from sftflow.infer.engine import load_engine
from sftflow.infer.requests import SamplingParams

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def engine(run_dir):
    engine = load_engine(infer_args(str(run_dir), []), batched=True)
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


@pytest.mark.integration
def test_models_lists_the_served_model(client, engine):
    models = client.models.list()
    assert [m.id for m in models.data] == [engine.model_name]


@pytest.mark.integration
def test_plain_completion_with_the_openai_client(client, engine):
    response = client.chat.completions.create(
        model=engine.model_name, messages=QUESTION, max_tokens=6, temperature=1.0, seed=7
    )
    expected = engine.generate(QUESTION, SamplingParams(max_new_tokens=6, temperature=1.0, seed=7))
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    assert len(response.choices) == 1
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.choices[0].text
    assert choice.finish_reason == expected.choices[0].finish_reason
    assert response.usage.prompt_tokens == len(engine.encode(QUESTION))
    assert response.usage.completion_tokens == expected.choices[0].completion_tokens
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


@pytest.mark.integration
def test_n_and_stop(client):
    response = client.chat.completions.create(
        model="sftflow", messages=QUESTION, max_tokens=6, temperature=1.0, seed=1, n=3
    )
    texts = [c.message.content for c in response.choices]
    assert [c.index for c in response.choices] == [0, 1, 2] and len(set(texts)) > 1
    finish = [c.finish_reason for c in response.choices]
    assert set(finish) <= {"stop", "length"} and 3 <= response.usage.completion_tokens <= 18
    if finish == ["length"] * 3:  # every answer used its whole max_tokens budget
        assert response.usage.completion_tokens == 18
    full = client.chat.completions.create(
        model="sftflow", messages=QUESTION, max_tokens=6, temperature=1.0, seed=1
    )
    text = full.choices[0].message.content
    stop = text[2:4]
    cut = client.chat.completions.create(
        model="sftflow", messages=QUESTION, max_tokens=6, temperature=1.0, seed=1, stop=[stop]
    )
    assert stop and cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


@pytest.mark.integration
def test_streaming_with_the_openai_client(client, engine):
    plain = client.chat.completions.create(
        model="sftflow", messages=QUESTION, max_tokens=8, temperature=1.0, seed=2
    )
    chunks = list(
        client.chat.completions.create(
            model="sftflow",
            messages=QUESTION,
            max_tokens=8,
            temperature=1.0,
            seed=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([d for d in deltas if d]) > 1  # tokens arrive as they are generated, not at once
    assert "".join(deltas) == plain.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == plain.usage.total_tokens


@pytest.mark.integration
def test_streamed_n_answers_are_told_apart_by_index(client):
    stream = client.chat.completions.create(
        model="sftflow", messages=QUESTION, max_tokens=5, temperature=1.0, seed=4, n=2, stream=True
    )
    texts, finished = ["", ""], []
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.append(choice.index)
    assert finished == [0, 1] and all(texts)


@pytest.mark.integration
def test_sse_wire_format_ends_with_done(server):
    status, text = post(server, {"messages": QUESTION, "max_tokens": 3, "stream": True})
    assert status == 200
    events = [line for line in text.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0].removeprefix("data: "))
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}


@pytest.mark.integration
@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        (b"{not json", None, "not valid JSON"),
        ({"messages": []}, "messages", "at least 1 item"),
        (
            {"messages": [{"role": "wizard", "content": "hi"}]},
            "messages.0.role",
            "'system', 'developer', 'user', 'assistant' or 'tool'",
        ),
        ({"messages": [{"role": "user", "content": " "}]}, "messages.0.content", "empty"),
        ({"messages": QUESTION, "temperature": 2.5}, "temperature", "less than or equal to 2"),
        ({"messages": QUESTION, "top_p": 0}, "top_p", "greater than 0"),
        ({"messages": QUESTION, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"messages": QUESTION, "n": 99}, "n", "less than or equal to 16"),
        ({"messages": QUESTION, "stop": ["a", "b", "c", "d", "e"]}, "stop", "up to 4"),
        ({"messages": [{"role": "user", "content": "fox " * 600}]}, "messages", "context length of 512"),
        ({"messages": QUESTION, "max_tokens": 600}, "max_tokens", "context length is 512"),
        ({"messages": QUESTION, "max_tokens": 600, "stream": True}, "max_tokens", "context length is 512"),
    ],
)
def test_invalid_requests_get_400_in_openai_shape(server, body, param, message):
    status, error = post(server, body)
    assert status == 400, error
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["param"] == param
    assert message in error["error"]["message"]


@pytest.mark.integration
def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="sftflow", messages=[{"role": "wizard", "content": "hi"}])


@pytest.mark.integration
def test_concurrent_requests_do_not_mix(client, engine):
    prompts = [[{"role": "user", "content": f"Tell me about number {i}."}] for i in range(6)]
    expected = [
        engine.generate(p, SamplingParams(max_new_tokens=6, temperature=1.0, seed=i)).choices[0].text
        for i, p in enumerate(prompts)
    ]
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        kwargs = {"model": "sftflow", "messages": prompts[i], "max_tokens": 6, "temperature": 1.0, "seed": i}
        if i % 2:
            results[i] = "".join(
                c.choices[0].delta.content or ""
                for c in client.chat.completions.create(stream=True, **kwargs)
            )
        else:
            results[i] = client.chat.completions.create(**kwargs).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [results.get(i) for i in range(6)] == expected


@pytest.mark.integration
def test_api_key_is_required_when_set(engine):
    from sftflow.infer.api import create_app

    with serve(create_app(engine, api_key="s3cret"), key="s3cret") as base_url:
        status, error = post(base_url, {"messages": QUESTION, "max_tokens": 2})
        assert status == 401 and error["error"]["type"] == "authentication_error"
        assert post(base_url, {"messages": QUESTION, "max_tokens": 2}, key="wrong")[0] == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=base_url, api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model="sftflow", messages=QUESTION, max_tokens=2).choices


def test_host_and_port_come_from_flags_then_env(monkeypatch):
    from sftflow.cli.api import host_and_port
    from sftflow.errors import SftflowError

    monkeypatch.delenv("API_HOST", raising=False)
    monkeypatch.delenv("API_PORT", raising=False)
    assert host_and_port(None, None) == ("127.0.0.1", 8000)
    monkeypatch.setenv("API_HOST", "0.0.0.0")
    monkeypatch.setenv("API_PORT", "9001")
    assert host_and_port(None, None) == ("0.0.0.0", 9001)
    assert host_and_port("localhost", 9002) == ("localhost", 9002)
    monkeypatch.setenv("API_PORT", "http")
    with pytest.raises(SftflowError, match="API_PORT must be a port number"):
        host_and_port(None, None)


@pytest.mark.integration
def test_sftflow_api_command_serves_a_run_dir(run_dir, tmp_path):
    """`sftflow api RUN_DIR` with API_PORT and API_KEY from the environment, used by the openai client."""
    port = free_port()
    env = {**os.environ, "API_PORT": str(port), "API_KEY": "k3y", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("API_HOST", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sftflow.cli", "api", str(run_dir), "max_new_tokens=3"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base_url = f"http://127.0.0.1:{port}/v1"
        wait_ready(base_url, timeout=90, key="k3y", proc=proc)
        client = openai.OpenAI(base_url=base_url, api_key="k3y", max_retries=0)
        response = client.chat.completions.create(model="sftflow", messages=QUESTION)
        assert response.usage.completion_tokens <= 3  # max_new_tokens=3 from the command line
        assert response.choices[0].finish_reason in ("stop", "length")
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert f"serving {run_dir} at http://127.0.0.1:{port}/v1 (API key required)" in output
