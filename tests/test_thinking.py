"""Reasoning data (enable_thinking / preserve_thinking, LLaMA-Factory's meaning): golden ids and labels.

The tokenizer is the tiny BPE of conftest with a Qwen3-style chat template written here (thoughts from
`reasoning_content` or split off inline, rendered only for answers after the last user message, the last
one always with a block, `enable_thinking=false` adds the empty block to the generation prompt). Expected
sequences are written as text pieces, each tokenized on its own, trained or not.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from helpers import build_tokenizer
from sftflow.data.converters import convert_row
from sftflow.data.encode import IGNORE_INDEX, encode_pairwise, encode_prompt, encode_sft
from sftflow.data.inspect import format_report, render_example
from sftflow.data.template import apply_template
from sftflow.data.thinking import Thinking, resolve_thinking, split_thought
from sftflow.errors import SftflowError

QWEN3_STYLE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' %}"
    "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}{%- set content = message.content %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set reasoning_content = '' %}"
    "{%- if message.reasoning_content is string %}{%- set reasoning_content = message.reasoning_content %}"
    "{%- elif '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)

BLOCK = "<think>\n\n</think>\n\n"
Q1 = "What is two plus two?"
Q2 = "And three more?"
P1 = f"<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n"
GLUE2 = f"\n<|im_start|>user\n{Q2}<|im_end|>\n<|im_start|>assistant\n"
THOUGHT1 = "<think>\nadd two and two\n</think>\n\n"
THOUGHT2 = "<think>\nfour and three\n</think>\n\n"


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def answer(text: str) -> dict:
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def qwen_tok(tmp_path_factory):
    """The tiny tokenizer with the Qwen3-style template above as its own chat template."""

    tok = build_tokenizer(tmp_path_factory.mktemp("tok"))
    tok.chat_template = QWEN3_STYLE
    return tok


def ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def expected(tok, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Golden ids and labels from (text, trained) pieces."""
    input_ids, labels = [], []
    for text, trained in pieces:
        piece = ids(tok, text)
        input_ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return input_ids, labels


def encode(tok, messages, enable=True, preserve=False, mask_history=False, **kwargs):
    thinking = resolve_thinking(tok, enable, preserve)
    assert thinking is not None
    enc = encode_sft(tok, messages, 1024, mask_history=mask_history, thinking=thinking, **kwargs)
    return enc.input_ids, enc.labels


def test_thought_words_read_off_the_template(qwen_tok):
    thinking = resolve_thinking(qwen_tok, None, False)
    assert thinking == Thinking(None, False, "<think>\n", "\n</think>\n\n", reads_field=True)
    assert thinking.block == BLOCK
    assert split_thought(" <think>a\n</think>\nb") == ("a", "b")
    assert split_thought("x <think>a</think>b") == (None, "x <think>a</think>b")
    assert split_thought("a</think>b") == ("a", "b")  # the generation prompt opened the thought


SINGLE = {
    # (answer content, enable_thinking) -> golden (text, trained) pieces
    ("thought", True): [(P1, False), (THOUGHT1 + "four<|im_end|>", True), ("\n", False)],
    ("thought", None): [(P1, False), (THOUGHT1 + "four<|im_end|>", True), ("\n", False)],
    ("thought", False): [(P1 + BLOCK, False), ("four<|im_end|>", True), ("\n", False)],
    ("plain", True): [(P1, False), (BLOCK + "four<|im_end|>", True), ("\n", False)],
    ("plain", None): [(P1 + BLOCK, False), ("four<|im_end|>", True), ("\n", False)],
    ("plain", False): [(P1 + BLOCK, False), ("four<|im_end|>", True), ("\n", False)],
}


@pytest.mark.parametrize(("kind", "enable"), list(SINGLE))
def test_single_turn_golden_ids_and_labels(qwen_tok, kind, enable):
    content = THOUGHT1 + "four" if kind == "thought" else "four"
    messages = [user(Q1), answer(content)]
    got = encode(qwen_tok, messages, enable)
    assert got == expected(qwen_tok, SINGLE[(kind, enable)])
    # and the ids are exactly what the template renders for these flags
    rendered_messages = messages if enable is not False else [user(Q1), answer("four")]
    flags = {} if enable is None else {"enable_thinking": enable}
    assert qwen_tok.decode(got[0]) == qwen_tok.apply_chat_template(rendered_messages, tokenize=False, **flags)


def test_reasoning_content_equals_inline(qwen_tok):
    row = {
        "messages": [
            user(Q1),
            {"role": "assistant", "content": "four", "reasoning_content": "add two and two"},
        ]
    }
    tags = {
        "role_tag": "role",
        "content_tag": "content",
        "user_tag": "user",
        "assistant_tag": "assistant",
        "system_tag": "system",
        "observation_tag": "tool",
        "function_tag": "function_call",
    }
    converted = convert_row(row, "openai", {"messages": "messages"}, tags, "sft")["messages"]
    assert converted[-1]["content"] == THOUGHT1 + "four"
    for enable in (True, False, None):
        assert encode(qwen_tok, converted, enable) == encode(
            qwen_tok, [user(Q1), answer(THOUGHT1 + "four")], enable
        )
    # the alpaca form with a reasoning column
    alpaca = convert_row(
        {"instruction": Q1, "output": "four", "why": "add two and two"},
        "alpaca",
        {"prompt": "instruction", "response": "output", "reasoning": "why"},
        {},
        "sft",
    )
    assert alpaca["messages"] == converted
    # a thought given twice is a row error
    with pytest.raises(ValueError, match="already starts with an inline <think>"):
        convert_row(
            {
                "messages": [
                    user(Q1),
                    {"role": "assistant", "content": THOUGHT1 + "4", "reasoning_content": "x"},
                ]
            },
            "openai",
            {"messages": "messages"},
            tags,
            "sft",
        )


TWO_TURNS = [user(Q1), answer(THOUGHT1 + "four"), user(Q2), answer("seven")]
MULTI = {
    # (enable, preserve, mask_history) -> pieces for TWO_TURNS (first answer has a thought, second none)
    (True, False, False): [
        (P1, False),
        (THOUGHT1 + "four<|im_end|>", True),
        (GLUE2, False),
        (BLOCK + "seven<|im_end|>", True),
        ("\n", False),
    ],
    (None, False, False): [
        (P1, False),
        (THOUGHT1 + "four<|im_end|>", True),
        (GLUE2 + BLOCK, False),
        ("seven<|im_end|>", True),
        ("\n", False),
    ],
    (False, False, False): [
        (P1 + BLOCK, False),
        ("four<|im_end|>", True),
        (GLUE2 + BLOCK, False),
        ("seven<|im_end|>", True),
        ("\n", False),
    ],
    # mask_history without preserve_thinking: the history as the model sees it (thought dropped, no block)
    (True, False, True): [
        (P1 + "four<|im_end|>" + GLUE2, False),
        (BLOCK + "seven<|im_end|>", True),
        ("\n", False),
    ],
    (None, False, True): [
        (P1 + "four<|im_end|>" + GLUE2 + BLOCK, False),
        ("seven<|im_end|>", True),
        ("\n", False),
    ],
    (False, False, True): [
        (P1 + "four<|im_end|>" + GLUE2 + BLOCK, False),
        ("seven<|im_end|>", True),
        ("\n", False),
    ],
    # preserve_thinking keeps the earlier thought (untrained under mask_history)
    (True, True, True): [
        (P1 + THOUGHT1 + "four<|im_end|>" + GLUE2, False),
        (BLOCK + "seven<|im_end|>", True),
        ("\n", False),
    ],
    (None, True, True): [
        (P1 + THOUGHT1 + "four<|im_end|>" + GLUE2 + BLOCK, False),
        ("seven<|im_end|>", True),
        ("\n", False),
    ],
    (False, True, True): [
        (P1 + BLOCK + "four<|im_end|>" + GLUE2 + BLOCK, False),
        ("seven<|im_end|>", True),
        ("\n", False),
    ],
}


@pytest.mark.parametrize(("enable", "preserve", "mask_history"), list(MULTI))
def test_two_turns_golden_ids_and_labels(qwen_tok, enable, preserve, mask_history):
    got = encode(qwen_tok, TWO_TURNS, enable, preserve, mask_history)
    want = expected(qwen_tok, MULTI[(enable, preserve, mask_history)])
    assert qwen_tok.decode(got[0]) == qwen_tok.decode(want[0])
    assert got == want


@pytest.mark.parametrize("enable", [True, False])
def test_mask_history_is_the_templates_own_rendering(qwen_tok, enable):
    """mask_history without preserve_thinking: exactly apply_chat_template(messages, enable_thinking=...),
    though the template renders the first answer differently once a second user turn follows."""
    messages = [user(Q1), answer(THOUGHT1 + "four"), user(Q2), answer(THOUGHT2 + "seven")]
    got, labels = encode(qwen_tok, messages, enable, mask_history=True)
    view = messages if enable else [user(Q1), answer("four"), user(Q2), answer("seven")]
    assert qwen_tok.decode(got) == qwen_tok.apply_chat_template(view, tokenize=False, enable_thinking=enable)
    trained = qwen_tok.decode([t for t in labels if t != IGNORE_INDEX])
    assert trained == (THOUGHT2 if enable else "") + "seven<|im_end|>"


def test_both_turns_with_thoughts_train_both(qwen_tok):
    messages = [user(Q1), answer(THOUGHT1 + "four"), user(Q2), answer(THOUGHT2 + "seven")]
    got = encode(qwen_tok, messages, True)
    assert got == expected(
        qwen_tok,
        [
            (P1, False),
            (THOUGHT1 + "four<|im_end|>", True),
            (GLUE2, False),
            (THOUGHT2 + "seven<|im_end|>", True),
            ("\n", False),
        ],
    )


def test_train_on_prompt_trains_the_block_in_the_prompt(qwen_tok):
    got = encode(qwen_tok, [user(Q1), answer("four")], False, train_on_prompt=True)
    assert got == expected(qwen_tok, [(P1 + BLOCK, True), ("four<|im_end|>", True), ("\n", False)])


def test_predict_prompt_follows_the_mode(qwen_tok):
    messages = [user(Q1), answer(THOUGHT1 + "four")]
    for enable, prompt in ((True, P1), (False, P1 + BLOCK), (None, P1)):
        thinking = resolve_thinking(qwen_tok, enable, False)
        assert encode_prompt(qwen_tok, messages, 1024, thinking) == ids(qwen_tok, prompt)
    no_thought = resolve_thinking(qwen_tok, None, False)
    assert encode_prompt(qwen_tok, [user(Q1), answer("four")], 1024, no_thought) == ids(qwen_tok, P1 + BLOCK)


def test_builtin_qwen3_template_matches_the_qwen3_style_one(qwen_tok):
    tok = copy.deepcopy(qwen_tok)
    tok.chat_template = None
    apply_template(tok, "qwen3")
    for enable in (True, False, None):
        for mask_history in (False, True):
            for messages in ([user(Q1), answer("four")], TWO_TURNS):
                assert encode(tok, messages, enable, mask_history=mask_history) == encode(
                    qwen_tok, messages, enable, mask_history=mask_history
                )


def test_inline_template_writing_think_gets_the_default_tags(qwen_tok):
    """A template that does not read reasoning_content but writes <think> (LLaMA-Factory's reasoning
    templates): thoughts go inline, blocks added by sftflow."""
    tok = copy.deepcopy(qwen_tok)
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
        "{# reasoning model: <think> #}"
    )
    thinking = resolve_thinking(tok, True, False)
    assert thinking == Thinking(True, False, "<think>\n", "\n</think>\n\n", reads_field=False)
    assert encode(tok, TWO_TURNS, True) == expected(qwen_tok, MULTI[(True, False, False)])
    assert encode(tok, TWO_TURNS, False) == expected(qwen_tok, MULTI[(False, False, False)])


def test_non_reasoning_template_refuses_the_modes(tiny_tokenizer):
    assert resolve_thinking(tiny_tokenizer, True, False) is None  # LLaMA-Factory's default: plain text
    with pytest.raises(SftflowError, match=r"enable_thinking: false needs a reasoning chat template.*qwen3"):
        resolve_thinking(tiny_tokenizer, False, False)
    with pytest.raises(SftflowError, match=r"enable_thinking: null needs"):
        resolve_thinking(tiny_tokenizer, None, False)
    with pytest.raises(SftflowError, match=r"preserve_thinking: true needs"):
        resolve_thinking(tiny_tokenizer, True, True)


def test_pairs_share_their_prompt(qwen_tok):
    prompt = [user(Q1)]
    thinking = resolve_thinking(qwen_tok, True, False)
    pair = encode_pairwise(qwen_tok, prompt, THOUGHT1 + "four", "five", 1024, thinking=thinking)
    assert (pair.chosen_input_ids, pair.chosen_labels) == expected(
        qwen_tok, [(P1, False), (THOUGHT1 + "four<|im_end|>", True), ("\n", False)]
    )
    assert (pair.rejected_input_ids, pair.rejected_labels) == expected(
        qwen_tok, [(P1, False), (BLOCK + "five<|im_end|>", True), ("\n", False)]
    )
    with pytest.raises(SftflowError, match="both have a thought or both have none"):
        encode_pairwise(
            qwen_tok,
            prompt,
            THOUGHT1 + "four",
            "five",
            1024,
            thinking=resolve_thinking(qwen_tok, None, False),
        )


def test_bad_enable_thinking_value_is_refused():
    from sftflow.config.parser import args_from_dict

    with pytest.raises(SftflowError, match="enable_thinking"):
        args_from_dict({"model_name_or_path": "x", "enable_thinking": "maybe"}, require_output_dir=False)
    args = args_from_dict({"model_name_or_path": "x", "enable_thinking": "null"}, require_output_dir=False)
    assert args.data.enable_thinking is None
    with pytest.raises(SftflowError, match="preserve_thinking has no effect here.*mask_history"):
        args_from_dict({"model_name_or_path": "x", "preserve_thinking": True}, require_output_dir=False)


def test_dataset_end_to_end_through_prepare(qwen_tok, tmp_path):
    """dataset_info.json + a file (inline thoughts, reasoning_content, none) through the data step."""
    from sftflow.config import DataArguments
    from sftflow.data.prepare import prepare

    rows = [
        {
            "messages": [
                user(Q1),
                {"role": "assistant", "content": "four", "reasoning_content": "add two and two"},
            ]
        },
        {"messages": [user(Q1), answer(THOUGHT1 + "four")]},
        {"messages": [user(Q1), answer("four")]},
    ]
    (tmp_path / "think.json").write_text(json.dumps(rows), encoding="utf-8")
    (tmp_path / "dataset_info.json").write_text(
        json.dumps({"think": {"file_name": "think.json", "formatting": "openai"}}), encoding="utf-8"
    )
    for enable in (True, False):
        data = DataArguments(dataset=["think"], dataset_dir=str(tmp_path), enable_thinking=enable)
        prepared = prepare("sft", data, qwen_tok, seed=0, use_cache=False)
        got = [(r["input_ids"], r["labels"]) for r in prepared.train]
        with_thought = SINGLE[("thought", enable)]
        assert got == [expected(qwen_tok, p) for p in (with_thought, with_thought, SINGLE[("plain", enable)])]
        assert prepared.meta["splits"]["train"]["thoughts"] == {"with": 2, "without": 1}
        assert "thoughts: 2 examples with one, 1 without" in format_report(prepared.meta)
    shown = render_example(qwen_tok, prepared.train[2], 2, color=False)
    assert "<think>: 1 empty block in the prompt (untrained)" in shown.splitlines()[0]
    data = DataArguments(dataset=["think"], dataset_dir=str(tmp_path), enable_thinking=True)
    prepared = prepare("sft", data, qwen_tok, seed=0, use_cache=False)
    assert "<think>: 1 thought trained" in render_example(qwen_tok, prepared.train[0], 0, color=False)
    assert "<think>: 1 empty block trained" in render_example(qwen_tok, prepared.train[2], 2, color=False)


def test_shipped_demo_dataset_and_example(qwen_tok):
    """data/reasoning_demo.json is registered and converts; the example config loads."""
    from sftflow.config import load_args
    from sftflow.data.registry import get_dataset_spec

    root = Path(__file__).resolve().parents[1]
    spec = get_dataset_spec("reasoning_demo", root / "data")
    rows = json.loads((root / "data" / spec.file_name).read_text(encoding="utf-8"))
    converted = [convert_row(r, spec.formatting, spec.columns, spec.tags, "sft")["messages"] for r in rows]
    with_thought = [m for m in converted if split_thought(m[-1]["content"])[0] is not None]
    assert len(rows) >= 12 and 0 < len(with_thought) < len(rows)
    assert any("reasoning_content" in t for r in rows for t in r["messages"])
    args = load_args(root / "examples" / "reasoning_sft.yaml", require_output_dir=False)
    assert args.data.template == "qwen3" and args.data.dataset == ["reasoning_demo"]
    for messages in converted:
        encode(qwen_tok, messages, args.data.enable_thinking, mask_history=args.data.mask_history)
