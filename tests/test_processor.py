"""Exact-id tests of templating, label masking and the cutoff rule."""

from __future__ import annotations

import pytest

from sftflow.data.processor import IGNORE_INDEX, encode_prompt, encode_response, encode_sft, stop_token_ids
from sftflow.data.template import apply_template, split_turns
from sftflow.errors import SftflowError

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Two plus two is four."},
]
MULTI = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "I am Wren."},
    {"role": "user", "content": "你好 🙂 def add(a, b):"},
    {"role": "assistant", "content": "return a + b"},
]


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_input_ids_are_the_whole_rendered_conversation(tiny_tokenizer):
    for conv in (CONV, MULTI):
        encoded = encode_sft(tiny_tokenizer, conv, cutoff_len=512)
        rendered = tiny_tokenizer.apply_chat_template(conv, tokenize=False)
        assert encoded.input_ids == ids_of(tiny_tokenizer, rendered)
        assert len(encoded.labels) == len(encoded.input_ids)


def test_only_the_response_and_its_end_of_turn_token_are_trained(tiny_tokenizer):
    tok = tiny_tokenizer
    encoded = encode_sft(tok, CONV, cutoff_len=512)
    prompt = ids_of(tok, tok.apply_chat_template(CONV[:-1], tokenize=False, add_generation_prompt=True))
    answer = ids_of(tok, "Two plus two is four.") + [tok.eos_token_id]
    newline = ids_of(tok, "\n")
    assert encoded.input_ids == prompt + answer + newline
    assert encoded.labels == [IGNORE_INDEX] * len(prompt) + answer + [IGNORE_INDEX] * len(newline)
    # pad == eos in this tokenizer: the eos label survives because labels are built before padding
    assert (
        tok.pad_token_id == tok.eos_token_id
        and encoded.labels[len(prompt) + len(answer) - 1] == tok.eos_token_id
    )


def test_every_assistant_turn_is_trained_in_a_multi_turn_conversation(tiny_tokenizer):
    tok = tiny_tokenizer
    encoded = encode_sft(tok, MULTI, cutoff_len=512)
    trained = [t for t in encoded.labels if t != IGNORE_INDEX]
    expected = (
        ids_of(tok, "I am Wren.") + [tok.eos_token_id] + ids_of(tok, "return a + b") + [tok.eos_token_id]
    )
    assert trained == expected


def test_prompt_prefix_equals_what_inference_tokenizes(tiny_tokenizer):
    tok = tiny_tokenizer
    encoded = encode_sft(tok, MULTI, cutoff_len=512)
    prompt = encode_prompt(tok, MULTI, cutoff_len=512)
    assert encoded.input_ids[: len(prompt)] == prompt
    assert all(label == IGNORE_INDEX for label in encoded.labels[len(prompt) - 1 : len(prompt)])


def test_train_on_prompt_trains_prompt_tokens(tiny_tokenizer):
    encoded = encode_sft(tiny_tokenizer, CONV, cutoff_len=512, train_on_prompt=True)
    masked = [i for i, t in enumerate(encoded.labels) if t == IGNORE_INDEX]
    assert encoded.labels[0] == encoded.input_ids[0]
    assert len(masked) == len(ids_of(tiny_tokenizer, "\n"))  # only the glue after the last eos


def test_cutoff_truncates_the_response_not_the_prompt(tiny_tokenizer):
    tok = tiny_tokenizer
    full = encode_sft(tok, CONV, cutoff_len=512)
    prompt_len = len(encode_prompt(tok, CONV, 512))
    cut = encode_sft(tok, CONV, cutoff_len=prompt_len + 3)
    assert cut.truncated and not cut.dropped
    assert cut.input_ids == full.input_ids[: prompt_len + 3]
    assert sum(t != IGNORE_INDEX for t in cut.labels) == 3


def test_cutoff_drops_later_turns_whole_and_reports_prompts_that_do_not_fit(tiny_tokenizer):
    tok = tiny_tokenizer
    first_turn = encode_sft(tok, MULTI[:2], cutoff_len=512)
    cut = encode_sft(tok, MULTI, cutoff_len=len(first_turn.input_ids) + 2)
    assert cut.truncated and cut.input_ids == first_turn.input_ids
    tiny = encode_sft(tok, CONV, cutoff_len=8)
    assert tiny.dropped.startswith("prompt has") and tiny.input_ids == []


def test_encode_response_masks_glue_and_appends_eos_when_missing():
    assert encode_response([7, 8, 2, 10, 11], {2}, 2) == (
        [7, 8, 2, 10, 11],
        [7, 8, 2, IGNORE_INDEX, IGNORE_INDEX],
    )
    assert encode_response([7, 8], {2}, 2) == ([7, 8, 2], [7, 8, 2])


def test_builtin_alpaca_template_trains_eos(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    apply_template(tok, "alpaca")
    encoded = encode_sft(tok, CONV, cutoff_len=512)
    assert tok.decode(encoded.input_ids).startswith("Be brief.\n\n### Instruction:\nWhat is two plus two?")
    trained = [t for t in encoded.labels if t != IGNORE_INDEX]
    assert trained == ids_of(tok, "Two plus two is four.") + [tok.eos_token_id]


def test_unknown_template_and_missing_template_are_refused(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(SftflowError, match="Did you mean 'alpaca'"):
        apply_template(tok, "alpacca")
    tok.chat_template = None
    with pytest.raises(SftflowError, match="no chat template"):
        apply_template(tok, None)


def test_non_incremental_template_is_refused(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    # renders the number of messages first, so a prefix renders differently from the whole
    tok.chat_template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(SftflowError, match="renders a conversation prefix differently"):
        split_turns(tok, CONV)


def test_stop_ids_include_eos(tiny_tokenizer):
    assert tiny_tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tiny_tokenizer)
