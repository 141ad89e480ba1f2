"""Every built-in template and a user YAML template: ids equal the template's rendering, prompt prefixes
are prefixes, only answers (through their end-of-turn token) are trained; templates are saved."""

from __future__ import annotations

import copy

import pytest

from sftflow.data.encode import IGNORE_INDEX, encode_sft, stop_token_ids
from sftflow.data.template import BUILTIN_TEMPLATES, apply_template
from sftflow.errors import SftflowError

FAMILY_TOKENS = [
    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",  # llama3
    "<start_of_turn>", "<end_of_turn>",  # gemma
    "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",  # phi
]  # fmt: skip
END_OF_TURN = {"llama3": "<|eot_id|>", "gemma": "<end_of_turn>", "phi": "<|end|>", "chatml": "<|im_end|>"}
CONVERSATIONS = {
    "system": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Two plus two is four."},
    ],
    "multi_cjk_emoji_code": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "I am Wren."},
        {"role": "user", "content": "你好，世界 🙂🚀"},
        {"role": "assistant", "content": "你好 🙂"},
        {"role": "user", "content": "Write add in Python"},
        {"role": "assistant", "content": "```python\ndef add(a, b):\n    return a + b\n```"},
    ],
}


@pytest.fixture(scope="module")
def family_tokenizer(tiny_tokenizer):
    """The tiny tokenizer plus the special tokens of the llama3, gemma and phi families."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": FAMILY_TOKENS})
    return tok


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def check_conversation(tok, conversation):
    """The issue's contract on one conversation, for whatever template `tok` holds."""
    encoded = encode_sft(tok, conversation, cutoff_len=4096)
    rendered = tok.apply_chat_template(conversation, tokenize=False)
    assert encoded.input_ids == ids_of(tok, rendered)
    stops = stop_token_ids(tok)
    expected_trained = []
    for i, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        prompt_text = tok.apply_chat_template(conversation[:i], tokenize=False, add_generation_prompt=True)
        prompt = ids_of(tok, prompt_text)
        assert encoded.input_ids[: len(prompt)] == prompt
        assert all(label == IGNORE_INDEX for label in encoded.labels[len(prompt) - 1 : len(prompt)])
        turn = ids_of(tok, tok.apply_chat_template(conversation[: i + 1], tokenize=False))[len(prompt) :]
        end = max(j for j, t in enumerate(turn) if t in stops)  # the answer through its end-of-turn
        expected_trained += turn[: end + 1]
        assert message["content"] in tok.decode(turn[: end + 1])
    assert [t for t in encoded.labels if t != IGNORE_INDEX] == expected_trained


# qwen3 and deepseekr1 are reasoning templates that drop earlier thoughts (not prefix-stable):
# tests/test_thinking.py and tests/test_thinking_r1.py
@pytest.mark.parametrize("name", sorted(set(BUILTIN_TEMPLATES) - {"qwen3", "deepseekr1"}))
def test_builtin_template_ids_prefixes_and_labels(family_tokenizer, name):
    tok = copy.deepcopy(family_tokenizer)
    apply_template(tok, name)
    for conversation in CONVERSATIONS.values():
        check_conversation(tok, conversation)
    if name in END_OF_TURN:
        assert tok.convert_tokens_to_ids(END_OF_TURN[name]) in stop_token_ids(tok)


def test_builtin_renderings_are_the_family_formats(family_tokenizer):
    tok = copy.deepcopy(family_tokenizer)
    conv = CONVERSATIONS["system"]
    expected = {
        "llama3": "<|im_start|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is two plus two?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nTwo plus two is four.<|eot_id|>",
        "llama2": "<|im_start|>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is two plus two? [/INST] "
        "Two plus two is four. <|im_end|>",
        "gemma": "<|im_start|><start_of_turn>user\nBe brief.\n\nWhat is two plus two?<end_of_turn>\n"
        "<start_of_turn>model\nTwo plus two is four.<end_of_turn>\n",
        "vicuna": "Be brief. USER: What is two plus two? ASSISTANT: Two plus two is four.<|im_end|>",
    }
    for name, text in expected.items():
        apply_template(tok, name)
        assert tok.apply_chat_template(conv, tokenize=False) == text


def test_tokenizer_own_template_on_every_conversation(tiny_tokenizer):
    for conversation in CONVERSATIONS.values():
        check_conversation(tiny_tokenizer, conversation)


def test_installed_template_is_saved_with_the_tokenizer(family_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tok = copy.deepcopy(family_tokenizer)
    apply_template(tok, "gemma")
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    conv = CONVERSATIONS["multi_cjk_emoji_code"]
    assert loaded.chat_template == tok.chat_template
    assert loaded.apply_chat_template(conv, tokenize=False) == tok.apply_chat_template(conv, tokenize=False)


def test_family_template_needs_its_special_tokens(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    with pytest.raises(
        SftflowError, match=r"template llama3 needs the special tokens \['<\|start_header_id\|>'"
    ):
        apply_template(tok, "llama3")


YAML = """\
qa:
  default_system: Answer in one line.
  format_system: "[{content}]\\n"
  format_user: "Q: {content}\\n"
  generation_prompt: "A:"
  format_assistant: " {content}{eos_token}\\n"
raw:
  chat_template: "{% for m in messages %}{{ m['content'] + (eos_token if m['role'] == 'assistant' else '\\\\n') }}{% endfor %}"
"""


def test_user_yaml_template(tiny_tokenizer, tmp_path):
    path = tmp_path / "templates.yaml"
    path.write_text(YAML)
    tok = copy.deepcopy(tiny_tokenizer)
    apply_template(tok, "qa", path)
    conv = CONVERSATIONS["multi_cjk_emoji_code"][:2]
    assert (
        tok.apply_chat_template(conv, tokenize=False)
        == "[Answer in one line.]\nQ: hi\nA: I am Wren.<|im_end|>\n"
    )
    for conversation in CONVERSATIONS.values():
        check_conversation(tok, conversation)
    apply_template(tok, "raw", path)
    assert tok.apply_chat_template(conv, tokenize=False) == "hi\nI am Wren.<|im_end|>"
    check_conversation(tok, CONVERSATIONS["system"])


@pytest.mark.parametrize(
    ("body", "name", "match"),
    [
        (
            "qa:\n  format_usr: 'Q: {content}'\n",
            "qa",
            "unknown field 'format_usr'. Did you mean 'format_user'",
        ),
        ("qa:\n  format_assistant: 'no content'\n", "qa", "must contain {content}"),
        ("- a\n- b\n", "qa", "must map template names"),
        (YAML, None, "template_file .* is set but template is not"),
        (YAML, "qaa", "unknown template 'qaa'. Did you mean 'qa'"),
    ],
)
def test_user_yaml_template_errors(tiny_tokenizer, tmp_path, body, name, match):
    path = tmp_path / "templates.yaml"
    path.write_text(body)
    with pytest.raises(SftflowError, match=match):
        apply_template(copy.deepcopy(tiny_tokenizer), name, path)


def test_llamafactory_template_names(tiny_tokenizer, caplog):
    """A LLaMA-Factory name: its sftflow built-in, else the tokenizer's own template when the tokenizer is of
    the name's family (logged), else a clear error with what exists."""
    import logging

    from sftflow.data.template import LLAMAFACTORY_TEMPLATES, template_family

    assert len(LLAMAFACTORY_TEMPLATES) == 124 and {"qwen3_nothink", "llama3", "deepseek3"} <= set(
        LLAMAFACTORY_TEMPLATES
    )
    assert template_family("qwen3_5_nothink") == "qwen" and template_family("chatglm3") == "glm"

    same_family = copy.deepcopy(tiny_tokenizer)  # a saved Llama: config.json says model_type: llama
    own = same_family.chat_template
    with caplog.at_level(logging.INFO, logger="sftflow.data.template"):
        apply_template(same_family, "llama4")
    assert same_family.chat_template == own
    assert "LLaMA-Factory's llama template" in caplog.text and "tokenizer's own chat template" in caplog.text

    builtin = copy.deepcopy(tiny_tokenizer)
    apply_template(builtin, "vicuna")  # the same name as a sftflow built-in: the built-in
    assert builtin.chat_template != own and "USER: " in builtin.chat_template

    with pytest.raises(SftflowError, match=r"'yi' is a LLaMA-Factory template .*yi family.*Built-in: "):
        apply_template(copy.deepcopy(tiny_tokenizer), "yi")
    no_template = copy.deepcopy(tiny_tokenizer)
    no_template.chat_template = None
    with pytest.raises(SftflowError, match="has no chat template"):
        apply_template(no_template, "llama4")
