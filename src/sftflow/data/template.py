"""Chat templates. The tokenizer's own `chat_template` is the default and the reference; the built-ins
here are for tokenizers without one. A built-in is installed as the tokenizer's `chat_template`, so it is
saved with the tokenizer and chat/serving later use exactly what training used.
"""

from __future__ import annotations

import difflib
from typing import Any

from sftflow.errors import SftflowError

ALPACA = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{{ 'Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\\n\\n' }}"
    "{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n### Response:\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + '\\n\\n' }}{% endif %}"
    "{% endfor %}"
)

DEFAULT = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ 'System: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'Human: ' + message['content'] + '\\nAssistant:' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token + '\\n' }}{% endif %}"
    "{% endfor %}"
)

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

BUILTIN_TEMPLATES = {"alpaca": ALPACA, "default": DEFAULT, "chatml": CHATML}


def apply_template(tokenizer: Any, name: str | None) -> None:
    """Install the chosen template on the tokenizer (None keeps the tokenizer's own).

    Raises:
        SftflowError: unknown template name, or no template at all.
    """
    if name is None:
        if not getattr(tokenizer, "chat_template", None):
            raise SftflowError(
                "this tokenizer has no chat template; set template to one of "
                f"{', '.join(BUILTIN_TEMPLATES)} (e.g. template: alpaca for a base model)."
            )
        return
    if name not in BUILTIN_TEMPLATES:
        close = difflib.get_close_matches(name, list(BUILTIN_TEMPLATES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise SftflowError(
            f"unknown template {name!r}.{hint} Built-in: {', '.join(BUILTIN_TEMPLATES)}; "
            "leave template unset to use the tokenizer's own."
        )
    if name == "chatml":
        missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in tokenizer.get_vocab()]
        if missing:
            raise SftflowError(
                f"template chatml needs the special tokens {missing}, which this tokenizer lacks."
            )
    tokenizer.chat_template = BUILTIN_TEMPLATES[name]


def render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def split_turns(tokenizer: Any, messages: list[dict[str, str]]) -> list[tuple[str, str]]:
    """Cut the rendered conversation into (prompt text, response text) pairs, one per assistant turn.

    The pieces concatenate to exactly `render(messages)`. A prompt ends where the template's generation
    prompt ends (what inference sees); a response runs to the start of the next prompt, so it holds the
    end-of-turn token and any template glue after it.

    Raises:
        SftflowError: the template does not render conversations incrementally (a prefix of the
            conversation renders differently from the start of the whole), so turns cannot be cut.
    """
    full = render(tokenizer, messages)
    pairs, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_end = render(tokenizer, messages[:i], add_generation_prompt=True)
        turn_end = render(tokenizer, messages[: i + 1])
        if not (full.startswith(turn_end) and turn_end.startswith(prompt_end) and len(prompt_end) >= cursor):
            raise SftflowError(
                "the chat template renders a conversation prefix differently from the whole conversation "
                f"(at turn {i}), so prompt and response cannot be separated. Use a built-in template "
                "(template: chatml/alpaca/default) or fix the template."
            )
        pairs.append((full[cursor : len(prompt_end)], full[len(prompt_end) : len(turn_end)]))
        cursor = len(turn_end)
    if cursor != len(full):  # text after the last assistant turn belongs to nobody's response
        last_prompt, last_response = pairs[-1]
        pairs[-1] = (last_prompt, last_response + full[cursor:])
    return pairs
