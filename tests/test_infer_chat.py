"""`sftflow chat` on a tiny model + LoRA adapter: streamed answers, history, /clear, /exit, the command."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from helpers import make_run_dir
from sftflow.cli.chat import main
from sftflow.config.run_dir import infer_args
from sftflow.infer.chat import run_chat
from sftflow.infer.engine import load_engine


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return make_run_dir(tiny_model_dir, tmp_path_factory.mktemp("run"), max_new_tokens=4)


@pytest.fixture(scope="module")
def engine(run_dir):
    engine = load_engine(infer_args(str(run_dir), []))
    yield engine
    engine.close()


def scripted(lines: list[str]):
    """An `input` replacement that returns the lines in turn, then raises EOFError (Ctrl-D)."""
    queue = list(lines)

    def read(prompt: str) -> str:
        if not queue:
            raise EOFError
        return queue.pop(0)

    return read


def recording(engine, monkeypatch) -> list[list[dict]]:
    """Record the messages of every streamed request."""
    calls: list[list[dict]] = []
    original = engine.stream

    def stream(messages, params=None, index=0):
        calls.append([dict(m) for m in messages])
        return original(messages, params, index)

    monkeypatch.setattr(engine, "stream", stream)
    return calls


def test_history_clear_and_exit(engine, monkeypatch):
    calls = recording(engine, monkeypatch)
    out = io.StringIO()
    history = run_chat(
        engine, scripted(["Hello", "How are you?", "/clear", "Again", "/exit", "never read"]), out
    )

    first_answer = engine.generate([{"role": "user", "content": "Hello"}]).choices[0].text
    assert calls == [
        [{"role": "user", "content": "Hello"}],
        [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": first_answer},
            {"role": "user", "content": "How are you?"},
        ],
        [{"role": "user", "content": "Again"}],  # /clear forgot the first two turns
    ]
    again = engine.generate([{"role": "user", "content": "Again"}]).choices[0].text
    assert history == [{"role": "user", "content": "Again"}, {"role": "assistant", "content": again}]
    text = out.getvalue()
    assert text.count("Assistant: ") == 3 and "History cleared." in text
    assert f"Assistant: {first_answer}\n" in text  # the streamed pieces add up to the whole answer


def test_end_of_input_quits_and_system_message_leads(engine, monkeypatch):
    calls = recording(engine, monkeypatch)
    history = run_chat(engine, scripted(["Hi", "   "]), io.StringIO(), system="You are Wren.")
    assert calls == [[{"role": "system", "content": "You are Wren."}, {"role": "user", "content": "Hi"}]]
    assert [m["role"] for m in history] == ["user", "assistant"]  # the system message is not repeated


def test_too_long_question_is_reported_and_the_chat_goes_on(engine):
    out = io.StringIO()
    history = run_chat(engine, scripted(["fox " * 600, "Hi"]), out)
    assert "context length of 512" in out.getvalue()
    assert [m["content"] for m in history][0] == "Hi"


def test_chat_command_on_a_run_dir(run_dir, monkeypatch, capsys):
    monkeypatch.setattr("builtins.input", scripted(["Hello", "/exit"]))
    assert main([str(run_dir), "max_new_tokens=2"]) == 0
    printed = capsys.readouterr().out
    assert f"Chatting with {run_dir}." in printed and printed.count("Assistant: ") == 1


def test_chat_command_needs_a_model(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: sftflow chat" in err and "give a run dir, a config file or --model" in err
