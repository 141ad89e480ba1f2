"""The deepseekr1 built-in (DeepSeek-R1's format, the last answer's thought kept) under enable_thinking
true/false/null, and how LLaMA-Factory's reasoning and `*_nothink` template names resolve.

The tokenizer is the tiny BPE of the helpers with R1's tokens added as special tokens. Expected sequences
are written out by hand as text pieces, each tokenized on its own, trained or not.
"""

from __future__ import annotations

import copy

import pytest

from helpers import build_tokenizer
from sftflow.data.encode import IGNORE_INDEX, encode_sft
from sftflow.data.template import R1_TOKENS, apply_template
from sftflow.data.thinking import Thinking, resolve_thinking
from sftflow.errors import SftflowError

BOS, EOS = "<|im_start|>", "<｜end▁of▁sentence｜>"
BLOCK = "<think>\n\n</think>\n\n"
Q1, Q2 = "What is two plus two?", "And three more?"
P1 = f"{BOS}<｜User｜>{Q1}<｜Assistant｜>"
P2 = f"<｜User｜>{Q2}<｜Assistant｜>"
THOUGHT1 = "<think>\nadd two and two\n</think>\n\n"
THOUGHT2 = "<think>\nfour and three\n</think>\n\n"


@pytest.fixture(scope="module")
def base_tok(tmp_path_factory):
    tok = build_tokenizer(tmp_path_factory.mktemp("tok"))
    tok.add_special_tokens({"additional_special_tokens": [*R1_TOKENS]})
    return tok


@pytest.fixture(scope="module")
def r1_tok(base_tok):
    tok = copy.deepcopy(base_tok)
    apply_template(tok, "deepseekr1")
    return tok


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def answer(text: str) -> dict:
    return {"role": "assistant", "content": text}


def expected(tok, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    input_ids, labels = [], []
    for text, trained in pieces:
        piece = tok.encode(text, add_special_tokens=False)
        input_ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return input_ids, labels


def encode(tok, messages, enable, mask_history=False):
    thinking = resolve_thinking(tok, enable, False)
    assert thinking is not None
    enc = encode_sft(tok, messages, 1024, mask_history=mask_history, thinking=thinking)
    return enc.input_ids, enc.labels


def test_r1_thought_words_and_rendering(r1_tok):
    assert resolve_thinking(r1_tok, True, False) == Thinking(True, False, "<think>\n", "\n</think>\n\n", True)
    text = r1_tok.apply_chat_template(
        [user(Q1), answer(THOUGHT1 + "four"), user(Q2), answer(THOUGHT2 + "seven")], tokenize=False
    )
    # R1 drops the thought of earlier answers; the last keeps it
    assert text == f"{P1}four{EOS}{P2}{THOUGHT2}seven{EOS}"
    off = r1_tok.apply_chat_template(
        [user(Q1)], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert off == P1 + BLOCK


SINGLE = {
    ("thought", True): [(P1, False), (THOUGHT1 + "four" + EOS, True)],
    ("thought", None): [(P1, False), (THOUGHT1 + "four" + EOS, True)],
    ("thought", False): [(P1 + BLOCK, False), ("four" + EOS, True)],
    ("plain", True): [(P1, False), (BLOCK + "four" + EOS, True)],
    ("plain", None): [(P1 + BLOCK, False), ("four" + EOS, True)],
    ("plain", False): [(P1 + BLOCK, False), ("four" + EOS, True)],
}


@pytest.mark.parametrize(("kind", "enable"), list(SINGLE))
def test_r1_single_turn_golden(r1_tok, kind, enable):
    content = THOUGHT1 + "four" if kind == "thought" else "four"
    assert encode(r1_tok, [user(Q1), answer(content)], enable) == expected(r1_tok, SINGLE[(kind, enable)])


MULTI = {
    # every answer keeps its thought (each rendered as the latest turn), trained
    True: [(P1, False), (THOUGHT1 + "four" + EOS, True), (P2, False), (BLOCK + "seven" + EOS, True)],
    None: [(P1, False), (THOUGHT1 + "four" + EOS, True), (P2 + BLOCK, False), ("seven" + EOS, True)],
    False: [(P1 + BLOCK, False), ("four" + EOS, True), (P2 + BLOCK, False), ("seven" + EOS, True)],
}


@pytest.mark.parametrize("enable", list(MULTI))
def test_r1_multi_turn_golden(r1_tok, enable):
    messages = [user(Q1), answer(THOUGHT1 + "four"), user(Q2), answer("seven")]
    assert encode(r1_tok, messages, enable) == expected(r1_tok, MULTI[enable])


def test_r1_mask_history_drops_earlier_thoughts(r1_tok):
    messages = [user(Q1), answer(THOUGHT1 + "four"), user(Q2), answer(THOUGHT2 + "seven")]
    got = encode(r1_tok, messages, True, mask_history=True)
    assert got == expected(r1_tok, [(P1 + "four" + EOS + P2, False), (THOUGHT2 + "seven" + EOS, True)])
    assert r1_tok.decode(got[0]) == r1_tok.apply_chat_template(messages, tokenize=False)


def test_nothink_names_are_plain_templates(base_tok):
    """LLaMA-Factory's *_nothink templates are plain: thoughts are answer text, no thinking handling."""
    tok = copy.deepcopy(base_tok)
    apply_template(tok, "qwen3_nothink")
    assert resolve_thinking(tok, True, False) is None
    text = tok.apply_chat_template([user(Q1), answer(THOUGHT1 + "four")], tokenize=False)
    assert text == f"<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n{THOUGHT1}four<|im_end|>\n"
    with pytest.raises(SftflowError, match="needs a reasoning chat template"):
        resolve_thinking(tok, False, False)


def test_multimodal_nothink_names_refused(base_tok):
    for name in ("qwen3_vl_nothink", "qwen3_5_nothink", "qwen3_omni_nothink", "ernie_nothink"):
        with pytest.raises(SftflowError, match=f"'{name}' is LLaMA-Factory's plain.*qwen3_nothink"):
            apply_template(copy.deepcopy(base_tok), name)


def test_qwen3_format_reasoning_names_resolve_to_qwen3(base_tok):
    qwen3 = copy.deepcopy(base_tok)
    apply_template(qwen3, "qwen3")
    for name in ("qwen3_5", "qwen3_6", "qwen3_vl", "qwen3_omni"):
        tok = copy.deepcopy(base_tok)
        apply_template(tok, name)
        assert tok.chat_template == qwen3.chat_template


def test_other_reasoning_names_refused(base_tok):
    for name in ("glm4_moe", "seed_oss", "hy3", "gpt_oss", "mimo"):
        with pytest.raises(
            SftflowError, match=f"'{name}' is a LLaMA-Factory reasoning template.*deepseekr1.*qwen3"
        ):
            apply_template(copy.deepcopy(base_tok), name)
