"""No one request can hurt the server or the other clients (#28, findings 8-15): the API key is checked
before the body is read, bodies are size-limited, a request's sampling settings cannot fail its
batch-mates, admission is all or nothing, stop strings are bounded, prompt scoring reads logits in chunks,
SIGTERM ends a server mid-stream within seconds, odd values get 400s, the docs sit behind the key, a
loopback server checks the Host header; and a seeded fuzz of 1,000 bad requests gets no 5xx."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import QUESTION, free_port, make_run_dir
from sftflow.config.run_dir import infer_args
from sftflow.infer.engine import load_engine
from sftflow.infer.requests import SamplingParams

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

KEY = "s3cret"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models decode ~20x faster on one thread than on two threads fighting over 2 shared cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return make_run_dir(tiny_model_dir, tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def engine(run_dir):
    engine = load_engine(infer_args(str(run_dir), ["serve_max_queue=8", "onednn_linear=false"]), batched=True)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def client(engine):
    from fastapi.testclient import TestClient

    from sftflow.infer.api import create_app

    with TestClient(create_app(engine), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def keyed_client(engine):
    from fastapi.testclient import TestClient

    from sftflow.infer.api import create_app

    with TestClient(create_app(engine, api_key=KEY), raise_server_exceptions=False) as client:
        yield client


@contextlib.contextmanager
def serve(app) -> Iterator[int]:
    """A real uvicorn server for `app` on a free loopback port (yields the port)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def raw_response(
    port: int, head: bytes, body_chunks: Iterator[bytes] | None = None, timeout: float = 10
) -> str:
    """Send a hand-written request (its body may stop short of its Content-Length) and read the answer:
    the server must answer without the rest of the body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        with contextlib.suppress(OSError):  # the server may answer and close before the body is all sent
            for chunk in body_chunks or ():
                sock.sendall(chunk)
        data = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
                more = sock.recv(65536)
                if not more:
                    break
                data += more
    return data.decode("latin-1")


# -- 8: authentication before the body, and a body size limit ------------------------------------------


@pytest.mark.integration
@pytest.mark.integration
def test_a_keyless_request_gets_401_before_its_body_is_read(engine):
    from sftflow.infer.api import create_app

    with serve(create_app(engine, api_key=KEY)) as port:
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 160000000\r\n\r\n"
        )
        started = time.monotonic()
        answer = raw_response(port, head)  # 160 MB announced, none sent: the server must not wait for it
        assert answer.startswith("HTTP/1.1 401"), answer[:200]
        assert time.monotonic() - started < 5
        assert "authentication_error" in answer


@pytest.mark.integration
@pytest.mark.integration
def test_a_body_over_the_limit_gets_413_from_its_content_length(engine):
    from sftflow.infer.api import create_app

    limit = engine.generating.serve_max_body_bytes
    with serve(create_app(engine, api_key=KEY)) as port:
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {limit + 1}\r\n\r\n"
        ).encode()
        answer = raw_response(port, head)
    assert answer.startswith("HTTP/1.1 413"), answer[:200]
    error = json.loads(answer.split("\r\n\r\n", 1)[1])["error"]
    assert "serve_max_body_bytes" in error["message"] and str(limit) in error["message"]


@pytest.mark.integration
@pytest.mark.integration
def test_a_chunked_body_over_the_limit_gets_413_while_it_streams_in(engine):
    from sftflow.infer.api import create_app

    limit = engine.generating.serve_max_body_bytes
    piece = b'{"messages": [' + b" " * (2**16 - 14)

    def chunks() -> Iterator[bytes]:
        sent = 0
        while sent <= 3 * limit:  # far more than the limit, if the server went on reading
            yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
            sent += len(piece)
        yield b"0\r\n\r\n"

    with serve(create_app(engine)) as port:
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        answer = raw_response(port, head, chunks())
    assert answer.startswith("HTTP/1.1 413"), answer[:200]
    assert "serve_max_body_bytes" in answer


@pytest.mark.integration
@pytest.mark.integration
def test_tokenizing_a_long_prompt_does_not_stall_the_other_clients(engine):
    import urllib.request

    from sftflow.infer.api import create_app

    body = json.dumps({"messages": [{"role": "user", "content": "fox " * 600_000}], "max_tokens": 1})
    with serve(create_app(engine)) as port:
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        answers: list[str] = []
        sender = threading.Thread(
            target=lambda: answers.append(raw_response(port, head + body.encode(), timeout=120))
        )
        sender.start()
        time.sleep(0.5)  # the 2.4 MB prompt is being templated and tokenized (seconds)
        started = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=60) as health:
            assert json.loads(health.read())["status"] == "ok"
        took = time.monotonic() - started
        sender.join(timeout=120)
    assert took < 1.0, f"/health waited {took:.1f} s behind another request's tokenization"
    assert answers[0].startswith("HTTP/1.1 400") and "context length" in answers[0]


def test_a_smaller_body_limit_is_a_config_key(run_dir):
    from fastapi.testclient import TestClient

    from sftflow.infer.api import create_app

    small = load_engine(infer_args(str(run_dir), ["serve_max_body_bytes=100"]), batched=True)
    try:
        with TestClient(create_app(small)) as client:
            body = {"messages": [{"role": "user", "content": "x" * 200}], "max_tokens": 1}
            response = client.post("/v1/chat/completions", json=body)
            assert response.status_code == 413 and "100 bytes" in response.json()["error"]["message"]
            body = {"messages": QUESTION, "max_tokens": 1}
            assert client.post("/v1/chat/completions", json=body).status_code == 200
    finally:
        small.close()


# -- 9: one request's sampling settings cannot fail its batch-mates ----------------------------------


def test_a_tiny_temperature_is_greedy_and_fails_nobody(engine, client):
    prompt = engine.encode(QUESTION)
    params = [SamplingParams(max_new_tokens=4, temperature=t) for t in (1.0, 1e-300, 0.7, 1.0)]
    futures = [engine.submit_ids(prompt, p) for p in params]  # sent together: they share a batch
    results = [f.result(timeout=120) for f in futures]
    greedy = engine.generate(QUESTION, SamplingParams(max_new_tokens=4, temperature=0))
    assert results[1].choices[0].text == greedy.choices[0].text  # below 1e-5: greedy, as in vLLM
    body = {"messages": QUESTION, "max_tokens": 2, "temperature": 1e-300}
    assert client.post("/v1/chat/completions", json=body).status_code == 200


def test_a_row_whose_sampling_fails_fails_only_its_own_request(engine, monkeypatch):
    from sftflow.infer.dynamic import DynamicPath

    draw = DynamicPath.draw

    def fragile(self, logits, temperature, top_p):
        if temperature == 0.5:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return draw(self, logits, temperature, top_p)

    monkeypatch.setattr(DynamicPath, "draw", fragile)
    prompt = engine.encode(QUESTION)
    futures = [
        engine.submit_ids(prompt, SamplingParams(max_new_tokens=3, temperature=t)) for t in (1.0, 0.5, 0.9)
    ]
    with pytest.raises(RuntimeError, match="probability tensor"):
        futures[1].result(timeout=120)
    assert futures[0].result(timeout=120).choices and futures[2].result(timeout=120).choices
    assert engine.held == 0


# -- 10: a refused request leaves nothing queued -----------------------------------------------------


def test_a_refused_multi_prompt_completion_leaves_nothing_queued(engine, client):
    running = [engine.stream(QUESTION, SamplingParams(max_new_tokens=400))[0] for _ in range(3)]
    try:  # 3 held + 6 prompts > serve_max_queue 8: a 429, and none of the 6 stays queued
        body = {"prompt": ["The quick brown"] * 6, "max_tokens": 400, "temperature": 1.0}
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 429, response.text
        assert engine.held == 3
    finally:
        for stream in running:
            stream.close()
    assert engine.held == 0
    body = {"prompt": ["The quick brown"] * 9, "max_tokens": 2, "temperature": 1.0}  # never fits: a 400
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    assert "serve_max_queue=8" in response.json()["error"]["message"]
    body = {"prompt": "The quick brown", "max_tokens": 2, "n": 3, "temperature": 1.0}
    assert client.post("/v1/completions", json=body).status_code == 200


# -- 11: stop strings are bounded ---------------------------------------------------------------------


@pytest.mark.parametrize("stop", ["x" * 600_000, ["a", "b" * 257]])
def test_long_stop_strings_get_400_naming_stop(client, stop):
    response = client.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2, "stop": stop})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "stop" and "256 characters" in error["message"]


def test_the_stop_buffer_cost_stays_small_at_the_limit():
    from sftflow.infer.protocol import MAX_STOP_CHARS, MAX_STOPS
    from sftflow.infer.requests import StopBuffer

    stops = ["a" * (MAX_STOP_CHARS - 1) + "b"] * MAX_STOPS  # every held tail is a prefix: the worst case
    buffer = StopBuffer(stops)
    started = time.perf_counter()
    for _ in range(400):
        buffer.feed("a")
    assert time.perf_counter() - started < 1.0


# -- 12: prompt logprobs are read in chunks -----------------------------------------------------------


def test_echo_logprobs_read_the_prompt_in_chunks(engine, client, monkeypatch):
    import torch

    from sftflow.infer import exact

    monkeypatch.setattr(exact, "PROMPT_LOGITS_ELEMENTS", 64 * len(engine.tokenizer))  # 64 positions a pass
    monkeypatch.setattr(exact, "PROMPT_CHUNK_MIN", 16)
    ids = engine.tokenizer.encode(
        "The quick brown fox jumps over the lazy dog. " * 20, add_special_tokens=False
    )
    assert len(ids) > 150
    widest: list[int] = []
    hook = engine.model.register_forward_hook(lambda m, a, out: widest.append(out.logits.shape[-2]))
    try:
        body = {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1}
        response = client.post("/v1/completions", json=body)
    finally:
        hook.remove()
    assert response.status_code == 200, response.text
    assert max(widest) <= 64  # never the whole prompt's logits at once
    logprobs = response.json()["choices"][0]["logprobs"]
    with torch.no_grad():
        reference = torch.log_softmax(engine.model(torch.tensor([ids])).logits[0].float(), dim=-1)
    want = [float(reference[p - 1, ids[p]]) for p in range(1, len(ids))]
    assert logprobs["token_logprobs"][0] is None
    assert logprobs["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
    tops = [max(t.values()) for t in logprobs["top_logprobs"][1:]]
    assert tops == pytest.approx([float(reference[p - 1].max()) for p in range(1, len(ids))], abs=1e-4)


# -- 14: odd values get correct answers or 400s ---------------------------------------------------------


def test_max_tokens_0_with_echo_scores_the_prompt(engine, client):
    body = {"prompt": "The quick brown fox", "max_tokens": 0, "echo": True, "logprobs": 1}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    ids = engine.tokenizer.encode("The quick brown fox", add_special_tokens=False)
    assert choice["text"] == engine.tokenizer.decode(ids)
    assert len(choice["logprobs"]["token_logprobs"]) == len(ids)
    assert response.json()["usage"]["completion_tokens"] == 0


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": QUESTION, "seed": 2**70}, "seed"),
        ({"messages": QUESTION, "seed": -(2**64)}, "seed"),
        ({"messages": [{"role": "user", "content": "hi \ud800"}]}, "messages.0.content"),
        ({"messages": QUESTION, "user": "\udfff"}, "user"),
        (
            {
                "messages": QUESTION,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"\ud800": 1}},
                },
            },
            "response_format.json_schema.schema",
        ),
    ],
)
def test_huge_seeds_and_lone_surrogates_get_400(client, body, param):
    response = client.post(
        "/v1/chat/completions", content=json.dumps(body), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_a_seed_at_the_64_bit_bound_is_answered(client):
    body = {"messages": QUESTION, "max_tokens": 2, "seed": 2**63 - 1, "temperature": 1.0, "n": 2}
    assert client.post("/v1/chat/completions", json=body).status_code == 200


# -- 15: docs behind the key, Host check on loopback, strict booleans, tool_call_id --------------------


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json", "/v1/models"])
def test_with_a_key_the_docs_are_behind_it(keyed_client, path):
    assert keyed_client.get(path).status_code == 401
    assert keyed_client.get(path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert keyed_client.get(path, headers={"Authorization": b"Bearer s3cr\xe9t"}).status_code == 401
    assert keyed_client.get("/health").status_code == 200  # liveness stays open


def test_a_loopback_server_answers_only_loopback_host_headers(engine):
    from fastapi.testclient import TestClient

    from sftflow.cli.api import trusted_hosts
    from sftflow.infer.api import create_app

    assert trusted_hosts("0.0.0.0") is None
    with TestClient(create_app(engine, allowed_hosts=trusted_hosts("127.0.0.1"))) as client:
        for host in ("evil.example", "attacker.test:8000", "127.0.0.1.nip.io"):
            assert client.get("/v1/models", headers={"Host": host}).status_code == 400
        for host in ("127.0.0.1:8000", "localhost", "[::1]:8000"):
            assert client.get("/v1/models", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": QUESTION, "stream": "yes"}, "stream"),
        ("/v1/chat/completions", {"messages": QUESTION, "logprobs": "true"}, "logprobs"),
        ("/v1/chat/completions", {"messages": QUESTION, "logprobs": 1}, "logprobs"),
        ("/v1/completions", {"prompt": "hi", "echo": "yes"}, "echo"),
        ("/v1/completions", {"prompt": "hi", "stream": "on"}, "stream"),
    ],
)
def test_booleans_are_strict(client, route, body, param):
    response = client.post(route, json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_a_tool_message_needs_tool_call_id(client):
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "42"},
    ]
    response = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages.2.tool_call_id"


# -- 13: SIGTERM mid-stream ends the server within seconds ---------------------------------------------


@pytest.mark.integration
@pytest.mark.integration
def test_sigterm_during_a_stream_exits_within_seconds(run_dir, tmp_path):
    port = free_port()
    env = {**os.environ, "API_PORT": str(port), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("API_KEY", None)
    env.pop("API_HOST", None)
    # one row at a time (serve_max_batch_tokens=1): 16 answers of 460 tokens take about a minute to generate
    argv = [sys.executable, "-m", "sftflow.cli", "api", str(run_dir), "serve_max_batch_tokens=1"]
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while b"serving" not in (line := proc.stdout.readline()):
            assert line and time.monotonic() < deadline, "the server did not start"
        body = {"messages": QUESTION, "max_tokens": 460, "n": 16, "temperature": 1.0, "stream": True}
        data = json.dumps(body).encode()
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.1)
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        first = sock.recv(65536)
        if b"data: " not in first:
            first += sock.recv(65536)
        assert b"data: " in first, first  # streaming has started
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        took = time.monotonic() - started
        sock.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"exited {took:.1f} s after SIGTERM")
    assert took < 15, f"the server took {took:.1f} s to exit after SIGTERM"


# -- the fuzz: 1,000 bad requests, no 5xx, a healthy server afterwards -------------------------------

NASTY = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2,
    3,
    2**31,
    2**63,
    2**64 + 1,
    10**30,
    -(10**30),
    1e308,
    -1e308,
    1e-300,
    5e-324,
    0.5,
    "",
    " ",
    "yes",
    "null",
    "\ud800",
    "\udfff x",
    "\x00",
    "\u202e\u200b",
    "🙂" * 50,
    "x" * 5000,
    [],
    [None],
    [1, "a"],
    [[1, 2], "x"],
    [[]],
    [-1],
    [10**9],
    {},
    {"a": 1},
    {"type": "text"},
    {"type": "json_schema"},
    {"type": "function", "function": {"name": "x"}},
    [{"role": "user"}],
    [{"role": "tool", "content": "x"}],
    [{"role": "assistant", "content": "x"}],
    [{"role": "system", "content": "x"}, {"role": "system", "content": "y"}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
    [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
]
CHAT_FIELDS = [
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop",
    "stream", "stream_options", "seed", "logprobs", "top_logprobs", "response_format", "tools",
    "tool_choice", "parallel_tool_calls", "user", "presence_penalty", "logit_bias", "bogus",
]  # fmt: skip
COMPLETION_FIELDS = [
    "model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "stream", "seed", "echo",
    "logprobs", "best_of", "suffix", "stream_options", "user", "bogus",
]  # fmt: skip


def fuzz_request(rng: random.Random) -> tuple[str, str, bytes, dict[str, str]]:
    """One bad (or odd) request: method, path, body bytes, headers."""
    headers = {"Content-Type": "application/json"}
    kind = rng.random()
    if kind < 0.06:  # wrong method or path
        method = rng.choice(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
        path = rng.choice(["/v1/chat/completions", "/v1/completions", "/v1/nope", "/health/x", "/%ff", "/.."])
        return method, path, b"", headers
    chat = rng.random() < 0.6
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if kind < 0.16:  # malformed bytes
        raw = rng.choice(
            [
                b"{",
                b'{"messages": [',
                b"\xff\xfe\x00",
                b"[" * 5000 + b"]" * 5000,
                b'{"a": ' * 3000,
                b"NaN",
                b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}",
                b'{"prompt": "\\ud800"}',
                b'{"messages": [{"role": "user", "content": "\\udc00hi"}]}',
                bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))),
                b'{"prompt": "x"}{"prompt": "y"}',
                b'{"prompt": "x", "prompt": [1, 2]}',
                b'{"prompt": "x", "max_tokens": Infinity}',
            ]
        )
        if rng.random() < 0.2:
            headers["Content-Type"] = rng.choice(["text/plain", "application/x-www-form-urlencoded", ""])
        return "POST", path, raw, headers
    fields = CHAT_FIELDS if chat else COMPLETION_FIELDS
    body: dict = {"messages": QUESTION} if chat else {"prompt": "The quick brown"}
    body["max_tokens"] = rng.choice([1, 2])
    for _ in range(rng.randint(1, 3)):
        body[rng.choice(fields)] = rng.choice(NASTY)
    if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 3:
        body["max_tokens"] = rng.choice([1, 2, 10**6, -5])  # a valid request stays short to generate
    if isinstance(body.get("max_completion_tokens"), int) and body["max_completion_tokens"] > 3:
        body["max_completion_tokens"] = 2
    if body.get("stream") is True and rng.random() < 0.5:
        body["stream"] = False
    return "POST", path, json.dumps(body).encode(), headers


AUTHORIZATIONS = [
    b"",
    b"Bearer",
    b"Bearer ",
    b"bearer " + KEY.encode(),
    b"Basic " + KEY.encode(),
    b"Bearer " + KEY.encode() + b"x",
    b"Bearer s3cr\xe9t",
    b"Bearer \xff\xfe",
    b"Bearer " + b"k" * 8000,
    b"Bearer " + KEY.encode(),
]


def test_a_thousand_bad_requests_get_no_5xx_and_leave_the_server_healthy(client, keyed_client, engine):
    """Every 5th request goes to a server with an API key, with an odd (or the right) Authorization."""
    rng = random.Random(28)
    statuses: dict[int, int] = {}
    fives: list[tuple[str, str, bytes, str]] = []
    started = time.monotonic()
    for i in range(1000):
        method, path, raw, headers = fuzz_request(rng)
        target = client
        if i % 5 == 4:
            target, headers = keyed_client, {**headers, "Authorization": rng.choice(AUTHORIZATIONS)}
        response = target.request(method, path, content=raw, headers=headers)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        if response.status_code >= 500 or (
            response.status_code == 200 and "generation failed" in response.text
        ):
            fives.append((method, path, raw[:300], response.text[:300]))
    took = time.monotonic() - started
    print(f"fuzz: 1000 requests in {took:.1f} s, statuses {dict(sorted(statuses.items()))}")
    assert not fives, fives[:5]
    assert engine.held == 0
    assert client.get("/health").json()["status"] == "ok"
    answer = client.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2})
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["role"] == "assistant"
