"""An Ollama Modelfile for an exported GGUF: FROM, a Go TEMPLATE equal to the training chat template, stops.

Ollama does not run the Jinja chat template stored in the GGUF; it renders prompts with the Modelfile's Go
`TEMPLATE`. A template that differs from training's (or none, or a missing `PARAMETER stop`) is the usual
cause of an exported model that rambles on. So the template is not hand-picked per family: the training chat
template is rendered on probe conversations, cut into its pieces (text around the system message, a user
turn, an answer, the generation prompt, and what comes first when there is no system message, e.g. a default
system prompt), and the pieces are re-rendered and compared with the Jinja rendering before any file is
written. For a conversation that ends with a user turn, Ollama's prompt is then exactly the text training
showed the model before an answer. A last assistant message is left open (no end-of-turn after it), which
is how Ollama continues a prefilled answer.

Templates this cannot express (a system message folded into the first user turn, text that depends on the
turn index) are reported, and no Modelfile is written for them: llama.cpp and LM Studio still use the chat
template inside the GGUF.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sftflow.data.template import render
from sftflow.errors import SftflowError

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase


SENTINELS = {
    "system": "SFTFLOWSYSTEMX",
    "u1": "SFTFLOWUSERONEX",
    "a1": "SFTFLOWANSWERX",
    "u2": "SFTFLOWUSERTWOX",
}


@dataclass(frozen=True)
class ChatPieces:
    """A chat template as literal pieces around each message.

    Attributes:
        head: written first when the conversation has no system message (bos, a default system prompt);
            with `system_in_first_user`, written first in every conversation.
        system_prefix: written first, before a system message (with `system_in_first_user`: at the start
            of the first user message's content).
        system_suffix: after the system message.
        user_prefix: before each user message.
        user_suffix: after each user message.
        generation_prompt: after the last user message (what the model answers after).
        answer_prefix: before each answer in the history (the generation prompt, and any text the template
            puts before an answer's content, e.g. a space).
        answer_suffix: after each answer (its end-of-turn token and glue).
        system_in_first_user: the system message is folded into the first user turn (Llama 2, Mistral,
            Gemma) instead of standing alone.
    """

    head: str
    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    generation_prompt: str
    answer_prefix: str
    answer_suffix: str
    system_in_first_user: bool = False

    def render(self, messages: list[dict[str, str]], system: str = "") -> str:
        """What the Modelfile template renders for `messages` (as Ollama would, ending with the generation
        prompt after a user turn); `system` is Ollama's .System (a system message, else SYSTEM)."""
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        folded = self.system_prefix + system + self.system_suffix if system else ""
        out = [self.head if self.system_in_first_user or not system else folded]
        for i, message in enumerate(messages):
            last = i == len(messages) - 1
            if message["role"] == "user":
                fold = folded if self.system_in_first_user and i == 0 else ""
                out.append(self.user_prefix + fold + message["content"] + self.user_suffix)
                out.append(self.generation_prompt if last else "")
            elif message["role"] == "assistant":
                out.append(self.answer_prefix + message["content"] + ("" if last else self.answer_suffix))
        return "".join(out)


def _cut(text: str, *sentinels: str) -> list[str]:
    """`text` split around each sentinel in order (len(sentinels) + 1 pieces)."""
    pieces = []
    for sentinel in sentinels:
        if text.count(sentinel) != 1:
            raise ValueError(f"the probe {sentinel} appears {text.count(sentinel)} times")
        before, text = text.split(sentinel)
        pieces.append(before)
    return [*pieces, text]


def _strip_prefix(text: str, prefix: str, what: str) -> str:
    if not text.startswith(prefix):
        raise ValueError(f"{what}: {text!r} does not start with {prefix!r}")
    return text[len(prefix) :]


def _strip_suffix(text: str, suffix: str, what: str) -> str:
    if not text.endswith(suffix):
        raise ValueError(f"{what}: {text!r} does not end with {suffix!r}")
    return text[: len(text) - len(suffix)]


def chat_pieces(tokenizer: PreTrainedTokenizerBase) -> ChatPieces:
    """Cut the tokenizer's chat template into `ChatPieces` and prove they re-render it.

    Raises:
        SftflowError: the template cannot be written as literal pieces around each message.
    """

    s = SENTINELS
    user1, answer1, user2 = (
        {"role": "user", "content": s["u1"]},
        {"role": "assistant", "content": s["a1"]},
        {"role": "user", "content": s["u2"]},
    )
    system = {"role": "system", "content": s["system"]}
    try:
        q0, q1, q2, q3 = _cut(render(tokenizer, [user1, answer1, user2], True), s["u1"], s["a1"], s["u2"])
        user_suffix = _cut(render(tokenizer, [user1]), s["u1"])[1]
        answer_suffix = _cut(render(tokenizer, [user1, answer1]), s["u1"], s["a1"])[2]
        answer_prefix = _strip_prefix(q1, user_suffix, "between a user turn and its answer")
        user_prefix = _strip_prefix(q2, answer_suffix, "between an answer and the next user turn")
        generation_prompt = _strip_prefix(q3, user_suffix, "after the last user turn")
        head = _strip_suffix(q0, user_prefix, "before the first user turn")
        p0, p1, _ = _cut(render(tokenizer, [system, user1, answer1, user2], True), s["system"], s["u1"])
        folded = not p1.endswith(user_prefix) and p0.startswith(head + user_prefix)
        if folded:  # <head><user prefix><system prefix>SYSTEM<system suffix>USER...
            system_prefix, system_suffix = p0[len(head + user_prefix) :], p1
        else:
            system_prefix = p0
            system_suffix = _strip_suffix(
                p1, user_prefix, "between the system message and the first user turn"
            )
        pieces = ChatPieces(
            head,
            system_prefix,
            system_suffix,
            user_prefix,
            user_suffix,
            generation_prompt,
            answer_prefix,
            answer_suffix,
            folded,
        )
        probes = [
            [user1],
            [system, user1],
            [user1, answer1, user2],
            [
                system,
                user1,
                answer1,
                user2,
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "?"},
            ],
        ]
        for probe in probes:
            if pieces.render(probe) != render(tokenizer, probe, True):
                raise ValueError(f"the pieces render {len(probe)} messages differently")
    except (ValueError, SftflowError) as exc:
        raise SftflowError(f"the chat template cannot be written as an Ollama TEMPLATE: {exc}.") from None
    return pieces


def _literal(text: str) -> str:
    """`text` as Go template text: verbatim, or as a quoted string action when it holds `{{` or `\"\"\"`."""
    if "{{" in text or '"""' in text:
        return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"
    return text


def go_template(pieces: ChatPieces) -> str:
    """The Ollama TEMPLATE (Go text/template over .System and .Messages) that renders like `pieces.render`.

    Ollama keeps system messages in .Messages and also joins them into .System (or sets .System from the
    Modelfile's SYSTEM when the request has none); the range below skips them and writes .System once.
    """
    lit = _literal
    system = lit(pieces.system_prefix) + "{{ $.System }}" + lit(pieces.system_suffix)
    if pieces.system_in_first_user:
        start = ["{{ $first := true }}", lit(pieces.head)]
        fold = "{{ if and $first $.System }}" + system + "{{ end }}"
        after = '{{ if ne .Role "system" }}{{ $first = false }}{{ end }}'
    else:
        default = ["{{ else }}", lit(pieces.head)] if pieces.head else []
        start = ["{{ if .System }}", system, *default, "{{ end }}"]
        fold = after = ""
    return "".join(
        [
            *start,
            "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}",
            '{{ if eq .Role "user" }}',
            lit(pieces.user_prefix),
            fold,
            "{{ .Content }}",
            lit(pieces.user_suffix),
            "{{ if $last }}",
            lit(pieces.generation_prompt),
            "{{ end }}",
            '{{ else if eq .Role "assistant" }}',
            lit(pieces.answer_prefix),
            "{{ .Content }}",
            "{{ if not $last }}",
            lit(pieces.answer_suffix),
            "{{ end }}",
            "{{ end }}",
            after,
            "{{ end }}",
        ]
    )


def fixed_system_prompt(conversations: Dataset) -> str | None:
    """The system message every conversation starts with, or None when they differ or some have none."""
    seen: str | None = None
    for messages in conversations:
        first = messages[0] if messages else None
        if (
            not first
            or first["role"] != "system"
            or not first["content"]
            or seen not in (None, first["content"])
        ):
            return None
        seen = first["content"]
    return seen


def with_default_system(chat_template: str, system: str) -> str:
    """`chat_template` with `system` as the system message of a conversation that has none: what every
    training row had, in place of the template's own default (e.g. SmolLM2's "You are a helpful AI
    assistant named SmolLM, ...")."""
    literal = json.dumps(system, ensure_ascii=False)
    return (
        "{%- if messages and messages[0]['role'] != 'system' %}"
        f"{{%- set messages = [{{'role': 'system', 'content': {literal}}}] + messages %}}"
        "{%- endif %}" + chat_template
    )


def _quoted(text: str) -> str:
    return f'"""{text}"""'


def modelfile_text(gguf_name: str, pieces: ChatPieces, stops: list[str], system: str | None) -> str:
    """The Modelfile: FROM the GGUF beside it, TEMPLATE, one PARAMETER stop per end-of-turn string, SYSTEM.

    Raises:
        SftflowError: a system prompt holding `\"\"\"`, which a Modelfile cannot quote.
    """
    lines = [
        "# Ollama: ollama create NAME -f Modelfile && ollama run NAME   (written by sftflow export)",
        f"FROM ./{gguf_name}",
        f"TEMPLATE {_quoted(go_template(pieces))}",
        *(f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in stops),
    ]
    if system:
        if '"""' in system:
            raise SftflowError('the fixed system prompt holds """, which a Modelfile SYSTEM cannot quote.')
        lines.append(f"SYSTEM {_quoted(system)}")
    return "\n".join(lines) + "\n"


def write_modelfile(
    path: Path,
    gguf_name: str,
    tokenizer: PreTrainedTokenizerBase,
    stops: list[str],
    system: str | None = None,
) -> str:
    """Write the Modelfile for `gguf_name` (a file beside `path`) and return its text.

    Raises:
        SftflowError: the chat template cannot be expressed as a Go template, or no stop string.
    """
    if not stops:
        raise SftflowError("refusing to write a Modelfile with no end-of-turn stop string.")
    text = modelfile_text(gguf_name, chat_pieces(tokenizer), stops, system)
    path.write_text(text, encoding="utf-8")
    return text
