"""LLaMA-Factory's `default_system` and `tool_format` (issue #24 leftovers): default_system is written into
the chat template (so training, chat, serving and export render it alike) or refused with the template's
reason; tool_format is taken when it names the format the template writes and refused otherwise."""

from __future__ import annotations

from typing import Any

import pytest

from sftflow.config.args import DataArguments
from sftflow.config.parser import args_from_dict
from sftflow.data.template import apply_template, check_tool_format, set_default_system
from sftflow.errors import SftflowError

USER = [{"role": "user", "content": "hi"}]
HERMES_TOOLS = (
    "{% if tools %}tools: {{ tools | tojson }}\n<tool_call>...</tool_call>{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def fresh(tiny_tokenizer: Any, template: str | None = None, source: str | None = None) -> Any:
    tokenizer = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    if source is not None:
        tokenizer.chat_template = source
    if template is not None:
        apply_template(tokenizer, template)
    return tokenizer


def prompt(tokenizer: Any, messages: list[dict[str, str]] = USER) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("template", ["chatml", "qwen3", "alpaca"])
def test_default_system_replaces_the_templates_default(tiny_tokenizer, template):
    tokenizer = fresh(tiny_tokenizer, template)
    set_default_system(tokenizer, "Answer in one line.")
    assert "Answer in one line." in prompt(tokenizer)
    given = prompt(tokenizer, [{"role": "system", "content": "Be Wren."}, *USER])
    assert "Be Wren." in given and "Answer in one line." not in given  # the data's system wins
    if template == "alpaca":  # alpaca's own default instruction line is replaced
        assert "Below is an instruction" not in prompt(tokenizer)
    set_default_system(tokenizer, "Other.")  # a second install replaces the first
    assert "Other." in prompt(tokenizer) and "Answer in one line." not in tokenizer.chat_template
    before = tokenizer.chat_template
    set_default_system(tokenizer, None)
    assert tokenizer.chat_template == before


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        (
            "{% for m in messages %}{% if m.role != 'system' %}{{ m.content }}{% endif %}{% endfor %}",
            "does not render system messages",
        ),
        (
            "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system') }}{% endif %}"
            "{{ m.content }}{% endfor %}",
            "refuses a system message",
        ),
    ],
)
def test_default_system_is_refused_where_the_template_takes_no_system(tiny_tokenizer, source, reason):
    tokenizer = fresh(tiny_tokenizer, source=source)
    with pytest.raises(SftflowError, match=reason):
        set_default_system(tokenizer, "Answer in one line.")
    assert tokenizer.chat_template == source  # left as it was


def test_tool_format_names_the_templates_own_format(tiny_tokenizer):
    tools = fresh(tiny_tokenizer, source=HERMES_TOOLS)
    check_tool_format(tools, "qwen")
    check_tool_format(tools, None)
    with pytest.raises(SftflowError, match="writes tool calls as <tool_call> blocks.*Set tool_format: qwen"):
        check_tool_format(tools, "llama3")
    with pytest.raises(SftflowError, match="renders no tools"):
        check_tool_format(fresh(tiny_tokenizer, "chatml"), "qwen")


def test_the_keys_load_and_reach_the_tokenizer(tiny_model_dir):
    from sftflow.config import ModelArguments
    from sftflow.model.loader import load_chat_tokenizer

    args = args_from_dict({"model_name_or_path": str(tiny_model_dir), "default_system": "Be brief."}, False)
    assert args.data.default_system == "Be brief." and args.data.tool_format is None
    model = ModelArguments(model_name_or_path=str(tiny_model_dir))
    tokenizer = load_chat_tokenizer(model, DataArguments(template="chatml", default_system="Be brief."))
    assert prompt(tokenizer).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    with pytest.raises(SftflowError, match="renders no tools"):
        load_chat_tokenizer(model, DataArguments(template="chatml", tool_format="qwen"))
