"""Exact-id tests of templating, label masking and the cutoff rule."""

from __future__ import annotations

import pytest

from sftflow.data.encode import (
    IGNORE_INDEX,
    encode_pairwise,
    encode_pretrain,
    encode_prompt,
    encode_sft,
    stop_token_ids,
)
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


def test_cutoff_drops_the_oldest_turn_first(tiny_tokenizer):
    tok = tiny_tokenizer
    full = encode_sft(tok, MULTI, cutoff_len=512)
    last_turn = encode_sft(tok, MULTI[2:], cutoff_len=512)
    cut = encode_sft(tok, MULTI, cutoff_len=len(full.input_ids) - 1)
    assert cut.truncated and not cut.dropped
    assert (cut.input_ids, cut.labels) == (last_turn.input_ids, last_turn.labels)


def test_cutoff_cuts_the_end_of_the_question_and_keeps_the_template_and_whole_answer(tiny_tokenizer):
    tok = tiny_tokenizer
    cut = encode_sft(tok, CONV, cutoff_len=35)
    shortened = [CONV[0], {"role": "user", "content": "What"}, CONV[2]]
    assert cut.truncated and not cut.dropped and len(cut.input_ids) <= 35
    # exactly the template's rendering of the shortened conversation: generation prompt and eos intact
    assert cut.input_ids == ids_of(tok, tok.apply_chat_template(shortened, tokenize=False))
    assert [t for t in cut.labels if t != IGNORE_INDEX] == ids_of(tok, "Two plus two is four.") + [
        tok.eos_token_id
    ]


def test_cutoff_cuts_the_answer_end_when_the_prompt_is_at_its_floor(tiny_tokenizer):
    tok = tiny_tokenizer
    cut = encode_sft(tok, CONV, cutoff_len=30)
    prompt = ids_of(
        tok,
        tok.apply_chat_template(
            CONV[:1] + [{"role": "user", "content": "What"}], tokenize=False, add_generation_prompt=True
        ),
    )
    assert cut.input_ids[: len(prompt)] == prompt and len(cut.input_ids) == 30
    assert cut.labels[len(prompt) :] == cut.input_ids[len(prompt) :]
    assert tok.decode(cut.input_ids[len(prompt) :]) == "Two plus two"


def test_cutoff_drops_what_cannot_fit_and_the_drop_policy_drops_all_overlong(tiny_tokenizer):
    tok = tiny_tokenizer
    tiny = encode_sft(tok, CONV, cutoff_len=20)
    assert tiny.dropped.startswith("prompt has") and tiny.input_ids == [] and tiny.labels == []
    full = encode_sft(tok, CONV, cutoff_len=512)
    dropped = encode_sft(tok, CONV, cutoff_len=len(full.input_ids) - 1, cutoff_policy="drop")
    assert dropped.dropped == f"{len(full.input_ids)} tokens > cutoff_len {len(full.input_ids) - 1}"
    kept = encode_sft(tok, CONV, cutoff_len=len(full.input_ids), cutoff_policy="drop")
    assert kept.input_ids == full.input_ids and not kept.truncated


def test_mask_history_trains_only_the_last_answer(tiny_tokenizer):
    tok = tiny_tokenizer
    encoded = encode_sft(tok, MULTI, cutoff_len=512, mask_history=True)
    assert encoded.input_ids == encode_sft(tok, MULTI, cutoff_len=512).input_ids
    assert [t for t in encoded.labels if t != IGNORE_INDEX] == ids_of(tok, "return a + b") + [
        tok.eos_token_id
    ]


def test_prompt_side_wins_where_the_tokenizer_merges_across_the_boundary(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    # the generation prompt ends with a space; tokenized whole, " the" is one token
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'Q: ' + m['content'] + '\\nAnswer: ' }}"
        "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
    )
    conv = [
        {"role": "user", "content": "capital of France?"},
        {"role": "assistant", "content": "the capital is Paris."},
    ]
    whole = ids_of(tok, tok.apply_chat_template(conv, tokenize=False))
    prompt = ids_of(tok, tok.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True))
    encoded = encode_sft(tok, conv, cutoff_len=512)
    assert whole[: len(prompt)] != prompt  # the merge: the whole rendering has no lone " " token
    assert encoded.input_ids == prompt + ids_of(tok, "the capital is Paris.") + [tok.eos_token_id]
    assert tok.decode(encoded.input_ids) == tok.apply_chat_template(conv, tokenize=False)
    assert encoded.labels == [IGNORE_INDEX] * len(prompt) + ids_of(tok, "the capital is Paris.") + [
        tok.eos_token_id
    ]


def test_a_template_without_end_of_turn_token_is_refused(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    with pytest.raises(SftflowError, match="never learn to stop"):
        encode_sft(tok, CONV, cutoff_len=512)


def test_pairwise_shares_the_prompt_and_trains_only_the_answers(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = MULTI[:3]
    pair = encode_pairwise(
        tok, prompt, "return a + b", {"role": "assistant", "content": "no"}, cutoff_len=512
    )
    prompt_ids = ids_of(tok, tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))
    for ids, labels, answer in (
        (pair.chosen_input_ids, pair.chosen_labels, "return a + b"),
        (pair.rejected_input_ids, pair.rejected_labels, "no"),
    ):
        conv = [*prompt, {"role": "assistant", "content": answer}]
        assert ids == ids_of(tok, tok.apply_chat_template(conv, tokenize=False))
        assert ids[: len(prompt_ids)] == prompt_ids
        assert [t for t in labels if t != IGNORE_INDEX] == ids_of(tok, answer) + [tok.eos_token_id]


def test_pairwise_truncation_keeps_one_shared_prompt(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = MULTI[:3]
    full = encode_pairwise(tok, prompt, "return a + b", "no", cutoff_len=512)
    pair = encode_pairwise(tok, prompt, "return a + b", "no", cutoff_len=len(full.chosen_input_ids) - 1)
    assert pair.truncated and not pair.dropped
    assert max(len(pair.chosen_input_ids), len(pair.rejected_input_ids)) < len(full.chosen_input_ids)
    short = encode_pairwise(tok, prompt[2:], "return a + b", "no", cutoff_len=512)  # oldest turn dropped
    assert (pair.chosen_input_ids, pair.rejected_input_ids) == (
        short.chosen_input_ids,
        short.rejected_input_ids,
    )
    dropped = encode_pairwise(tok, prompt, "return a + b", "no", cutoff_len=20, cutoff_policy="drop")
    assert dropped.dropped and dropped.chosen_input_ids == []


def test_pretrain_appends_eos_concatenates_and_chunks(tiny_tokenizer):
    tok = tiny_tokenizer
    texts = ["The quick brown fox", "Paris is the capital of France."]
    out = encode_pretrain(tok, texts, cutoff_len=8)
    stream = ids_of(tok, texts[0]) + [tok.eos_token_id] + ids_of(tok, texts[1]) + [tok.eos_token_id]
    assert out["input_ids"] == [stream[i : i + 8] for i in range(0, len(stream), 8)]
    assert out["labels"] == out["input_ids"] and sum(map(len, out["input_ids"])) == len(stream)


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
