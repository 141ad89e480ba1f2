"""Several runs behind one server: a request's `model` picks the run (a LoRA run and the bare base model
here, so their answers differ), /v1/models lists every name, /health reports each, an unknown or
missing model is refused naming the served ones; and how `sftflow api` turns its arguments into runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import pytest

from helpers import QUESTION, free_port, post, serve, wait_ready
from sftflow.cli import parse
from sftflow.cli.api import build_parser, served_runs
from sftflow.config.run_dir import infer_args
from sftflow.errors import SftflowError
from sftflow.infer.engine import load_engine
from sftflow.infer.requests import SamplingParams

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def engines(run_dir, tiny_model_dir):
    loaded = {
        "tuned": load_engine(infer_args(str(run_dir), []), batched=True),
        "base": load_engine(infer_args(None, [], model=str(tiny_model_dir)), batched=True),
    }
    yield loaded
    for engine in loaded.values():
        engine.close()


@pytest.fixture(scope="module")
def server(engines):
    from sftflow.infer.api import create_app

    with serve(create_app(engines)) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key="unused", max_retries=0)


@pytest.mark.integration
def test_models_lists_every_run(client):
    assert [m.id for m in client.models.list().data] == ["tuned", "base"]


@pytest.mark.integration
def test_model_picks_the_run(client, engines):
    scores = {}
    for name, engine in engines.items():
        sampled = {"max_tokens": 8, "temperature": 1.0, "seed": 7}
        response = client.chat.completions.create(model=name, messages=QUESTION, **sampled)
        expected = engine.generate(QUESTION, SamplingParams(max_new_tokens=8, temperature=1.0, seed=7))
        assert response.model == name and response.choices[0].message.content == expected.choices[0].text
        chunks = list(client.chat.completions.create(model=name, messages=QUESTION, stream=True, **sampled))
        assert {c.model for c in chunks} == {name}
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.choices[0].text
        # the prompt's own log-probabilities tell the two models apart even where greedy answers agree
        text = client.completions.create(
            model=name, prompt="The quick brown fox", max_tokens=1, echo=True, logprobs=1, temperature=0
        )
        assert text.model == name
        scores[name] = text.choices[0].logprobs.token_logprobs[1:-1]
    assert len(scores["tuned"]) == len(scores["base"]) > 2
    assert max(abs(a - b) for a, b in zip(scores["tuned"], scores["base"], strict=True)) > 1e-3


@pytest.mark.integration
@pytest.mark.parametrize("model", ["gpt-4o", "sftflow"])  # 'sftflow' names the only run; here there are two
def test_unknown_model_is_404_listing_the_runs(client, model):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model=model, messages=QUESTION, max_tokens=1)
    error = info.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "'tuned', 'base'" in error["message"] and "not served here" in error["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=model, prompt="Hi", max_tokens=1)


@pytest.mark.integration
def test_a_request_without_model_is_refused_when_several_runs_are_served(server):
    status, error = post(server, {"messages": QUESTION, "max_tokens": 1})
    assert status == 400 and error["error"]["param"] == "model"
    assert "'tuned', 'base'" in error["error"]["message"]


@pytest.mark.integration
def test_health_reports_each_run(server, engines):
    with urllib.request.urlopen(server.removesuffix("/v1") + "/health", timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "ok" and "model" not in body
    assert [(m["model"], m["held"], m["max_queue"]) for m in body["models"]] == [
        (name, 0, engine.max_queue) for name, engine in engines.items()
    ]


@pytest.mark.integration
def test_one_run_keeps_its_aliases_and_health_fields(engines):
    from sftflow.infer.api import create_app

    with serve(create_app({"tuned": engines["tuned"]})) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
        assert (
            client.chat.completions.create(model="sftflow", messages=QUESTION, max_tokens=1).model == "tuned"
        )
        assert post(base_url, {"messages": QUESTION, "max_tokens": 1})[0] == 200
        with urllib.request.urlopen(base_url.removesuffix("/v1") + "/health", timeout=10) as response:
            body = json.loads(response.read())
        assert body["model"] == "tuned" and [m["model"] for m in body["models"]] == ["tuned"]


# -- `sftflow api` arguments ----------------------------------------------------------------------


def runs_of(argv: list[str]) -> list[tuple[str, object]]:
    return served_runs(parse(build_parser(), argv))


def test_run_dirs_and_named_runs_with_shared_overrides(run_dir, tiny_model_dir):
    runs = runs_of([str(run_dir), "max_new_tokens=3", "--run", f"base={tiny_model_dir}"])
    assert [name for name, _ in runs] == [str(run_dir), "base"]
    assert [args.generating.max_new_tokens for _, args in runs] == [3, 3]
    assert runs[0][1].model.adapter_name_or_path == str(run_dir)
    assert runs[1][1].model.model_name_or_path == str(tiny_model_dir)
    positional = runs_of(["max_new_tokens=3", str(run_dir), str(tiny_model_dir)])
    assert [name for name, _ in positional] == [str(run_dir), str(tiny_model_dir)]
    only_flags = runs_of(["--run", f"a={run_dir}", "--run", f"b={run_dir}"])
    assert [(name, args.model.adapter_name_or_path) for name, args in only_flags] == [
        ("a", str(run_dir)),
        ("b", str(run_dir)),
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{run}", "{run}"], "both be served as model"),
        (["--run", "x={run}", "--run", "x={model}"], "both be served as model 'x'"),
        (["--run", "={run}"], "--run NAME=RUN_DIR"),
        (["--run", "x="], "--run NAME=RUN_DIR"),
        (["--adapter", "{run}", "--run", "{model}"], "--adapter needs a RUN_DIR or --model"),
        (["{run}", "nowhere/run"], "config file not found: nowhere/run"),
    ],
)
def test_bad_run_lists_are_refused(run_dir, tiny_model_dir, argv, message):
    argv = [a.format(run=run_dir, model=tiny_model_dir) for a in argv]
    with pytest.raises(SftflowError, match=message.replace("(", r"\(")):
        runs_of(argv)


@pytest.mark.integration
def test_duplicate_names_exit_2_before_loading(run_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sftflow.cli", "api", str(run_dir), "--run", str(run_dir)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "both be served as model" in proc.stderr and "--run NAME=RUN_DIR" in proc.stderr


@pytest.mark.integration
def test_sftflow_api_command_serves_two_runs(run_dir, tiny_model_dir, tmp_path):
    port = free_port()
    env = {**os.environ, "API_PORT": str(port), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("API_HOST", None)
    env.pop("API_KEY", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sftflow.cli",
            "api",
            f"--run=tuned={run_dir}",
            "--run",
            f"base={tiny_model_dir}",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base_url = f"http://127.0.0.1:{port}/v1"
        wait_ready(base_url, timeout=120, proc=proc)
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tuned", "base"]
        for name in ("tuned", "base"):
            response = client.chat.completions.create(model=name, messages=QUESTION, max_tokens=2)
            assert response.model == name and response.usage.completion_tokens <= 2
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert f"serving tuned, base at http://127.0.0.1:{port}/v1 (no API key)" in output
