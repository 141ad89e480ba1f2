"""Reasoning models through predict, chat, the API and export (issue #24, items 5-7).

The answer is split into its thought and its answer as the chat template writes them (`ThoughtSplitter`,
checked streamed in every chunking against the whole split); the prompt follows the run's
`enable_thinking` unless a request's `chat_template_kwargs` say otherwise; the official `openai` client
reads `reasoning_content` (plain and streamed) from a scripted engine and from the tiny model served with
the built-in qwen3 template; `sftflow chat` shows thoughts apart and keeps them out of its history;
predictions keep the thought beside the answer and score the answer; export writes the run's mode as the
chat template's default.
"""

from __future__ import annotations

import io
import json
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import yaml

from helpers import ScriptedStream, make_run_dir, post, serve
from sftflow.config.run_dir import infer_args
from sftflow.data.template import apply_template
from sftflow.data.thinking import Thinking, resolve_thinking, template_with_mode
from sftflow.errors import SftflowError
from sftflow.infer.reasoning import ThoughtSplitter, split_answer, template_kwargs
from sftflow.infer.requests import ChatResult, Completion, RequestError

BLOCK = "<think>\n\n</think>\n\n"
SYSTEM = "You are Wren."
PROMPT = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
QUESTION = [{"role": "user", "content": "What is two plus two?"}]
SPOKEN = "<think>\nadd two\nand two\n</think>\n\nIt is 4."
# a template that writes thoughts inline and knows nothing of enable_thinking
INLINE_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}{# answers may start with <think> #}"
)


def chunkings(text: str) -> list[list[str]]:
    """Every way of cutting `text` into pieces of one size, for sizes 1..len."""
    return [[text[i : i + size] for i in range(0, len(text), size)] for size in range(1, len(text) + 1)]


def streamed(thinking: Thinking | None, prompt: str, pieces: list[str]) -> tuple[str | None, str]:
    splitter = ThoughtSplitter(thinking, prompt)
    parts = [p for piece in pieces for p in splitter.feed(piece)] + splitter.finish()
    reasoning = "".join(t for k, t in parts if k == "reasoning")
    content = "".join(t for k, t in parts if k == "content")
    assert (splitter.reasoning or "") == reasoning and splitter.content == content
    return splitter.reasoning, content


@pytest.mark.parametrize(
    ("prompt", "text", "expected"),
    [
        (PROMPT, SPOKEN, ("add two\nand two", "It is 4.")),  # the model opens the thought
        (PROMPT + "<think>\n", "sum\n\n</think>\n\n4", ("sum", "4")),  # the prompt opened it
        (PROMPT + BLOCK, "<think>x</think>4", (None, "<think>x</think>4")),  # thinking off: all answer
        (PROMPT, "4 is the answer", (None, "4 is the answer")),
        (PROMPT, "<think>\nstill thinking\n\n", ("still thinking", "")),  # cut off mid-thought
        (PROMPT, "<think>\n\n</think>\n\n4", ("", "4")),  # the empty block, written by the model
        (PROMPT, "<thi", (None, "<thi")),  # an opening tag that never completed
        (PROMPT, "  <think>a</think>b", ("a", "b")),
    ],
)
def test_split_is_the_same_streamed_in_any_chunking(prompt, text, expected):
    assert split_answer(text, Thinking(), prompt) == expected
    for pieces in chunkings(text):
        assert streamed(Thinking(), prompt, pieces) == expected, pieces


def test_without_a_reasoning_template_everything_is_answer():
    assert split_answer(SPOKEN, None, PROMPT) == (None, SPOKEN)


def test_template_kwargs_default_to_the_run_and_requests_win():
    qwen = "{% if enable_thinking is defined %}{% endif %}{{ custom_flag }}"
    assert template_kwargs(Thinking(enable=False), qwen, None) == {"enable_thinking": False}
    assert template_kwargs(Thinking(enable=None), qwen, None) == {}
    assert template_kwargs(Thinking(enable=False), qwen, {"enable_thinking": True}) == {
        "enable_thinking": True
    }
    assert template_kwargs(Thinking(enable=False), qwen, {"enable_thinking": None}) == {}
    assert template_kwargs(Thinking(), qwen, {"custom_flag": 1}) == {
        "enable_thinking": True,
        "custom_flag": 1,
    }
    for bad, words in [
        ({"other": 1}, "does not read other"),
        ({"add_generation_prompt": False}, "set by the server"),
        ({"enable_thinking": "no"}, "true, false or null"),
    ]:
        with pytest.raises(RequestError, match=words):
            template_kwargs(Thinking(), qwen, bad)
    with pytest.raises(RequestError, match="has no thinking"):
        template_kwargs(None, "", {"enable_thinking": False})


# -- the engine's prompt (tiny model, the built-in qwen3 template) ------------------------------------


def make_thinking_run(model_dir: Path, out: Path, enable: bool | None, **keys: Any) -> Path:
    """A LoRA run dir (as test_infer_engine.make_run_dir) trained with the qwen3 template, `enable_thinking`
    and `keys`."""
    run = make_run_dir(model_dir, out, max_new_tokens=12)
    trained = yaml.safe_load((run / "sftflow_args.yaml").read_text())
    trained |= {"template": "qwen3", "enable_thinking": enable, **keys}
    (run / "sftflow_args.yaml").write_text(yaml.safe_dump(trained))
    return run


@pytest.fixture(scope="module")
def no_think_run(tiny_model_dir, tmp_path_factory) -> Path:
    return make_thinking_run(tiny_model_dir, tmp_path_factory.mktemp("nothink"), False, default_system=SYSTEM)


@pytest.fixture(scope="module")
def engine(no_think_run):
    from sftflow.infer.engine import load_engine

    engine = load_engine(infer_args(str(no_think_run), []), batched=True)
    yield engine
    engine.close()


def test_a_run_trained_without_thinking_serves_without_it(engine):
    assert engine.thinking is not None and engine.thinking.enable is False
    assert engine.prompt(QUESTION).startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n")  # default_system
    assert engine.prompt(QUESTION).endswith("<|im_start|>assistant\n" + BLOCK)
    assert engine.prompt(QUESTION, requested={"enable_thinking": True}).endswith("<|im_start|>assistant\n")
    assert engine.prompt(QUESTION, requested={"enable_thinking": None}).endswith("<|im_start|>assistant\n")
    with pytest.raises(RequestError, match="does not read"):
        engine.prompt(QUESTION, requested={"reasoning_effort": "high"})


def test_earlier_thoughts_sent_back_are_rendered_as_the_template_takes_them(engine, tiny_tokenizer):
    said = {"role": "assistant", "content": "It is 4.", "reasoning_content": "add two and two"}
    tool = {"role": "tool", "content": "4", "tool_call_id": "c1"}
    # after the last user message the qwen3 template renders the thought (the field)
    assert "<think>\nadd two and two\n</think>\n\nIt is 4." in engine.prompt([*QUESTION, said, tool])
    # before it, the template drops it (as it drops history thoughts)
    later = engine.prompt([*QUESTION, said, {"role": "user", "content": "And 5?"}])
    assert "add two" not in later and "It is 4." in later
    # an inline template gets it inline, with its tags
    from sftflow.infer.reasoning import template_messages

    inline = template_messages([said], Thinking(reads_field=False))
    assert inline == [{"role": "assistant", "content": "<think>\nadd two and two\n</think>\n\nIt is 4."}]
    assert template_messages([said], None) == [{"role": "assistant", "content": "It is 4."}]


def test_an_inline_template_gets_the_empty_block_when_thinking_is_off(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from sftflow.infer.engine import ChatEngine

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = INLINE_TEMPLATE
    fake = SimpleNamespace(tokenizer=tokenizer, thinking=resolve_thinking(tokenizer, False, False))
    prompt = ChatEngine.prompt(fake, QUESTION)  # type: ignore[arg-type]
    assert prompt.endswith("<|im_start|>assistant\n" + BLOCK)


# -- the API ---------------------------------------------------------------------------------------


class ThinkingEngine:
    """The parts of ChatEngine the chat route uses, with the qwen3 template's thinking, answering `text`."""

    def __init__(self, text: str) -> None:
        self.text, self.model_name, self.held, self.max_queue = text, "scripted", 0, 4
        self.tokenizer = SimpleNamespace(chat_template="", encode=lambda text, **_: [1, 2, 3])
        self.generating = SimpleNamespace(serve_max_body_bytes=2**20)
        self.thinking = Thinking()
        self.requests: list[Any] = []

    def prompt(self, messages: list[dict[str, Any]], tools: Any = None, requested: Any = None) -> str:
        self.requests.append((messages, requested))
        return PROMPT

    def stream_ids(self, prompt_ids: list[int], params: Any, index: int = 0) -> tuple[Any, int]:
        return ScriptedStream(self.text, 3), len(prompt_ids)

    def stream_all(self, prompt_ids: list[int], params: Any) -> list[ScriptedStream]:
        return [ScriptedStream(self.text, 3) for _ in range(params.n)]

    def submit_ids(self, prompt_ids: list[int], params: Any) -> Future:
        future: Future = Future()
        future.set_result(ChatResult([Completion(self.text, "stop", 1)], len(prompt_ids)))
        return future


@pytest.mark.integration
def test_openai_client_reads_reasoning_content_plain_and_streamed():
    openai = pytest.importorskip("openai")
    from sftflow.infer.api import create_app

    engine = ThinkingEngine(SPOKEN)
    with serve(create_app(engine)) as base_url:  # type: ignore[arg-type]
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
        history = [
            *QUESTION,
            {"role": "assistant", "content": "4", "reasoning_content": "two and two"},
            {"role": "user", "content": "Sure?"},
        ]
        extra = {"chat_template_kwargs": {"enable_thinking": True}}
        message = client.chat.completions.create(model="scripted", messages=history, extra_body=extra)
        message = message.choices[0].message
        chunks = list(client.chat.completions.create(model="scripted", messages=QUESTION, stream=True))
    assert message.content == "It is 4."
    assert message.reasoning_content == "add two\nand two" == message.model_extra["reasoning_content"]
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    thought = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    answer = "".join(d.content or "" for d in deltas)
    assert (thought, answer) == ("add two\nand two", "It is 4.")
    # the thought comes first, the answer after it, never mixed in one delta
    kinds = [
        ("r" if getattr(d, "reasoning_content", None) else "c")
        for d in deltas
        if d.content or getattr(d, "reasoning_content", None)
    ]
    assert "".join(kinds) == "r" * kinds.count("r") + "c" * kinds.count("c")
    sent, kwargs = engine.requests[0]
    assert sent[1] == {"role": "assistant", "content": "4", "reasoning_content": "two and two"}
    assert kwargs == {"enable_thinking": True}


@pytest.mark.integration
def test_the_tiny_model_served_without_thinking(engine):
    """A run trained with enable_thinking false: the empty block ends the prompt, so nothing the model
    writes is a thought (reasoning_content null); a request turns thinking back on."""
    openai = pytest.importorskip("openai")
    from sftflow.infer.api import create_app

    with serve(create_app(engine)) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
        plain = client.chat.completions.create(model="sftflow", messages=QUESTION, max_tokens=6)
        status, body = post(base_url, {"messages": QUESTION, "chat_template_kwargs": {"nope": 1}})
        on = client.chat.completions.create(
            model="sftflow",
            messages=QUESTION,
            max_tokens=6,
            extra_body={"chat_template_kwargs": {"enable_thinking": True}},
        )
    choice = plain.choices[0]
    assert choice.message.model_extra["reasoning_content"] is None and choice.message.content
    assert plain.usage.prompt_tokens == len(engine.encode(QUESTION))
    assert on.usage.prompt_tokens == len(
        engine.encode(QUESTION, requested := None, {"enable_thinking": True})
    )
    assert requested is None and on.usage.prompt_tokens < plain.usage.prompt_tokens
    assert status == 400 and body["error"]["param"] == "chat_template_kwargs.nope"
    print(json.dumps(plain.model_dump(), indent=1))


def test_reasoning_content_is_refused_on_other_roles():
    from pydantic import ValidationError

    from sftflow.infer.protocol import ChatCompletionRequest

    with pytest.raises(ValidationError, match="only taken on assistant"):
        ChatCompletionRequest(messages=[{"role": "user", "content": "hi", "reasoning_content": "x"}])
    with pytest.raises(RequestError, match="reasoning_content must be a string"):
        from sftflow.infer.requests import validate_messages

        validate_messages([{"role": "assistant", "content": "a", "reasoning_content": 3}, QUESTION[0]])


# -- sftflow chat ----------------------------------------------------------------------------------


class ChatStub:
    """What run_chat uses of ChatEngine, answering with the thought and answer of SPOKEN."""

    model_name, context_length = "stub", 10_000
    generating = SimpleNamespace(max_new_tokens=8)
    thinking = Thinking()

    def __init__(self) -> None:
        self.seen: list[list[dict[str, Any]]] = []

    def encode(self, messages: list[dict[str, Any]]) -> list[int]:
        return [1]

    def prompt(self, messages: list[dict[str, Any]]) -> str:
        return PROMPT

    def stream(self, messages: list[dict[str, Any]], params: Any) -> tuple[Any, int]:
        self.seen.append(messages)
        return iter([SPOKEN[i : i + 4] for i in range(0, len(SPOKEN), 4)]), 1


def reader(lines: list[str]) -> Any:
    left = iter(lines)

    def read(_: str) -> str:
        line = next(left, None)
        if line is None:
            raise EOFError
        return line

    return read


def test_chat_shows_the_thought_apart_and_keeps_it_out_of_history():
    from sftflow.infer.chat import DIM, RESET, run_chat

    for tty, shown in [
        (False, "Assistant: \nThinking: add two\nand two\n\nAnswer: It is 4.\n"),
        (True, f"Assistant: {DIM}add two\nand two{RESET}\n\nIt is 4.\n"),
    ]:
        out = io.StringIO()
        out.isatty = lambda tty=tty: tty  # type: ignore[method-assign]
        stub = ChatStub()
        history = run_chat(stub, read=reader(["What is two plus two?", "Sure?"]), out=out)  # type: ignore[arg-type]
        assert shown in out.getvalue()
        assert history[1] == {"role": "assistant", "content": "It is 4."}
        assert stub.seen[1][1] == {"role": "assistant", "content": "It is 4."}


# -- predict ---------------------------------------------------------------------------------------


def test_predictions_keep_the_thought_beside_the_answer_and_score_the_answer(tiny_tokenizer, tmp_path):
    from datasets import Dataset

    from sftflow.data.prepare import tokenize_prompts
    from sftflow.infer.predict import generate_predictions, read_jsonl

    tokenizer = qwen3_tokenizer(tiny_tokenizer)
    thinking = resolve_thinking(tokenizer, True, False)
    conversations = Dataset.from_dict({"messages": [[*QUESTION, {"role": "assistant", "content": SPOKEN}]]})
    dataset, rows = tokenize_prompts(conversations, tokenizer, 256, thinking)
    assert rows[0]["label"] == "It is 4." and rows[0]["label_reasoning"] == "add two\nand two"
    generated = tokenizer.encode("<think>\nsum it\n</think>\n\nIt is 4.", add_special_tokens=False)
    trainer = SimpleNamespace(
        args=SimpleNamespace(dataloader_drop_last=False),
        predict=lambda *a, **k: SimpleNamespace(predictions=np.array([generated]), metrics={}),
        is_world_process_zero=lambda: True,
    )
    metrics = generate_predictions(trainer, dataset, rows, tokenizer, tmp_path, "predict", thinking)  # type: ignore[arg-type]
    (line,) = read_jsonl(tmp_path / "generated_predictions.jsonl")
    assert line["predict"] == "It is 4." and line["predict_reasoning"] == "sum it"
    assert line["label"] == "It is 4." and line["label_reasoning"] == "add two\nand two"
    assert metrics["predict_rouge-l"] == pytest.approx(100.0)  # the answers match; the thoughts do not
    # with thinking off, the prompt ends with the empty block and the reference has no thought
    off = resolve_thinking(tokenizer, False, False)
    _, rows = tokenize_prompts(conversations, tokenizer, 256, off)
    assert rows[0]["prompt"].endswith(BLOCK) and rows[0]["label_reasoning"] is None


@pytest.mark.integration
def test_sftflow_predict_follows_the_runs_mode(no_think_run, tmp_path):
    from sftflow.infer.predict import read_jsonl, run_predict

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"messages": [*QUESTION, {"role": "assistant", "content": SPOKEN}]}]
    (data / "think.json").write_text(json.dumps(rows))
    (data / "dataset_info.json").write_text(
        json.dumps(
            {
                "think": {
                    "file_name": "think.json",
                    "formatting": "sharegpt",
                    "columns": {"messages": "messages"},
                    "tags": {
                        "role_tag": "role",
                        "content_tag": "content",
                        "user_tag": "user",
                        "assistant_tag": "assistant",
                    },
                }
            }
        )
    )
    out = tmp_path / "predict"
    args = infer_args(
        str(no_think_run),
        [f"dataset_dir={data}", "eval_dataset=think", "max_new_tokens=4"],
        output_dir=str(out),
    )
    run_predict(args)
    (line,) = read_jsonl(out / "generated_predictions.jsonl")
    assert line["prompt"].endswith("<|im_start|>assistant\n" + BLOCK)
    assert (
        line["label"] == "It is 4." and line["label_reasoning"] is None and line["predict_reasoning"] is None
    )


# -- export ----------------------------------------------------------------------------------------


def qwen3_tokenizer(tiny_tokenizer: Any) -> Any:
    tokenizer = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    apply_template(tokenizer, "qwen3")
    return tokenizer


def test_template_with_mode(tiny_tokenizer):
    tokenizer = qwen3_tokenizer(tiny_tokenizer)
    assert template_with_mode(tokenizer, Thinking(enable=True)) is None  # qwen3 thinks by default
    assert template_with_mode(tokenizer, Thinking(enable=None)) is None
    source = template_with_mode(tokenizer, Thinking(enable=False))
    assert source is not None
    tokenizer.chat_template = source
    user = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True).endswith(BLOCK)
    thinks = tokenizer.apply_chat_template(
        user, tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert thinks.endswith("assistant\n")
    from sftflow.model.modelfile import chat_pieces

    assert chat_pieces(tokenizer).generation_prompt.endswith(BLOCK)  # the Ollama TEMPLATE takes it too
    inline = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    inline.chat_template = INLINE_TEMPLATE
    inline.chat_template = template_with_mode(inline, resolve_thinking(inline, False, False))
    assert inline.apply_chat_template(user, tokenize=False, add_generation_prompt=True).endswith(BLOCK)
    inline.chat_template = {"default": INLINE_TEMPLATE}
    with pytest.raises(SftflowError, match="several named chat templates"):
        template_with_mode(inline, Thinking(enable=False))


@pytest.mark.integration
def test_export_carries_the_runs_mode(no_think_run, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from sftflow.cli import main as cli_main

    user = [{"role": "user", "content": "hi"}]
    for name, extra, ends_with_block in [("trained", [], True), ("asked", ["enable_thinking=true"], False)]:
        config = tmp_path / f"{name}.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "model_name_or_path": str(tiny_model_dir),
                    "adapter_name_or_path": str(no_think_run),
                    "template": "qwen3",
                    "export_dir": str(tmp_path / name),
                }
            )
        )
        assert cli_main(["export", str(config), *extra]) == 0
        exported = AutoTokenizer.from_pretrained(tmp_path / name)
        prompt = exported.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        assert prompt.endswith(BLOCK) is ends_with_block, (name, prompt)
        assert prompt.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n")  # the run's default_system
