"""Thoughts at serving time (issue #24): a reasoning model's answer split into its thought and its answer,
and the prompt rendered in the run's thinking mode.

The split follows the chat template (`sftflow.data.thinking`): the thought is the text between the
template's opening and closing tags (`<think>` ... `</think>` for Qwen3) at the start of the generated
text, or everything before the closing tag when the prompt itself opened the thought. When the prompt
ends with the empty block (`enable_thinking: false`), nothing the model writes is a thought. The thought
loses its surrounding newlines and the answer its leading ones, as the template renders them, so that a
thought and answer sent back (`reasoning_content` + `content`) render as the model wrote them.

`ThoughtSplitter` does it incrementally (streamed deltas: `reasoning_content` pieces, then `content`
pieces) and `split_answer` at once; both give the same text. With a template that has no thinking
everything is answer.

The prompt: the run's `enable_thinking` is the default of every request (a run trained with false serves
with the empty block ending the prompt; null leaves the template's own default), a request's
`chat_template_kwargs` win (`{"enable_thinking": false}`), and an assistant message's `reasoning_content`
is given to the template as the template takes thoughts (the field, or inline with its tags).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from sftflow.data.thinking import Thinking
from sftflow.infer.requests import RequestError

Kind = Literal["reasoning", "content"]
# what apply_chat_template takes itself: a request may not set these through chat_template_kwargs
RESERVED_KWARGS = frozenset(
    {
        "conversation",
        "messages",
        "tools",
        "documents",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "chat_template",
        "return_dict",
        "return_tensors",
        "padding",
        "truncation",
        "max_length",
        "tokenizer_kwargs",
        "return_assistant_tokens_mask",
    }
)


def _held_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a proper start of `tag` (it may become the tag)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


class ThoughtSplitter:
    """Split a generated answer into thought and answer as it streams.

    `feed(piece)` and `finish()` return `(kind, text)` pieces, kind `reasoning` or `content`;
    `reasoning` (None when the answer had no thought) and `content` hold the whole of each so far.

    >>> from sftflow.data.thinking import Thinking
    >>> s = ThoughtSplitter(Thinking(), "<|im_start|>assistant\\n")
    >>> [p for chunk in ("<thi", "nk>\\nadd", " them\\n</th", "ink>\\n\\n4") for p in s.feed(chunk)] + s.finish()
    [('reasoning', 'add'), ('reasoning', ' them'), ('content', '4')]
    >>> ThoughtSplitter(Thinking(), "assistant\\n<think>\\n\\n</think>\\n\\n").feed("<think>x</think>4")
    [('content', '<think>x</think>4')]
    """

    def __init__(self, thinking: Thinking | None, prompt: str) -> None:
        self.open = thinking.open.strip() if thinking else ""
        self.close = thinking.close.strip() if thinking else ""
        self.state: Literal["start", "thought", "answer"] = "start"
        self.reasoning: str | None = None
        self.content = ""
        self._buffer = ""
        self._held = ""  # newlines at the end of the thought so far (dropped if the thought ends there)
        self._lead = False  # the answer after a thought loses its leading newlines
        if (
            thinking is None
            or prompt.endswith(thinking.block)
            or prompt.rstrip().endswith(thinking.block.strip())
        ):
            self.state = "answer"
        elif prompt.rstrip().endswith(self.open):
            self._enter_thought()

    def _enter_thought(self) -> None:
        self.state, self.reasoning = "thought", ""

    def feed(self, piece: str) -> list[tuple[Kind, str]]:
        """The pieces of thought and answer that `piece` completes."""
        self._buffer += piece
        out: list[tuple[Kind, str]] = []
        if self.state == "start":
            stripped = self._buffer.lstrip()
            if stripped.startswith(self.open):
                self._enter_thought()
                self._buffer = stripped[len(self.open) :]
            elif self.open.startswith(stripped):
                return out  # (nothing yet, or the start of an opening tag)
            else:
                self.state = "answer"
        if self.state == "thought":
            at = self._buffer.find(self.close)
            if at < 0:
                keep = _held_suffix(self._buffer, self.close)
                text = self._buffer[: len(self._buffer) - keep]
                self._buffer = self._buffer[len(text) :]
                return self._thought(text, last=False)
            text, self._buffer = self._buffer[:at], self._buffer[at + len(self.close) :]
            out += self._thought(text, last=True)
            self.state, self._lead = "answer", True
        text, self._buffer = self._buffer, ""
        if self._lead:
            text = text.lstrip("\n")
            self._lead = not text
        if text:
            self.content += text
            out.append(("content", text))
        return out

    def _thought(self, text: str, last: bool) -> list[tuple[Kind, str]]:
        text, self._held = self._held + text, ""
        if not self.reasoning:
            text = text.lstrip("\n")
        body = text.rstrip("\n")
        if not last:
            self._held = text[len(body) :]
        if not body:
            return []
        self.reasoning = (self.reasoning or "") + body
        return [("reasoning", body)]

    def finish(self) -> list[tuple[Kind, str]]:
        """The rest once generation ended: a thought cut off (no closing tag) stays a thought, a
        possible opening tag that never completed is answer."""
        text, self._buffer = self._buffer, ""
        if self.state == "thought":
            return self._thought(text, last=True)
        if text:
            self.content += text
            return [("content", text)]
        return []


def split_answer(text: str, thinking: Thinking | None, prompt: str) -> tuple[str | None, str]:
    """(thought, answer) of a whole generated text after `prompt`; thought None when it has none.

    >>> from sftflow.data.thinking import Thinking
    >>> split_answer("<think>\\nsum\\n</think>\\n\\n4", Thinking(), "assistant\\n")
    ('sum', '4')
    >>> split_answer("sum\\n</think>\\n\\n4", Thinking(), "assistant\\n<think>\\n")
    ('sum', '4')
    >>> split_answer("<think>\\nsum\\n</think>\\n\\n4", None, "assistant\\n")
    (None, '<think>\\nsum\\n</think>\\n\\n4')
    """
    splitter = ThoughtSplitter(thinking, prompt)
    splitter.feed(text)
    splitter.finish()
    return splitter.reasoning, splitter.content


def template_kwargs(
    thinking: Thinking | None, source: str, requested: dict[str, Any] | None
) -> dict[str, Any]:
    """The extra chat template variables of one request: the run's `enable_thinking` (for a reasoning
    template, unless null), overridden by the request's `chat_template_kwargs`; a requested
    `enable_thinking: null` leaves the template's default.

    Raises:
        RequestError: a key apply_chat_template sets itself, `enable_thinking` that is not a boolean or
            null or is sent to a template without thinking, or another key the template does not read.
    """
    kwargs: dict[str, Any] = {}
    if thinking is not None and thinking.enable is not None:
        kwargs["enable_thinking"] = thinking.enable
    for key, value in (requested or {}).items():
        param = f"chat_template_kwargs.{key}"
        if key in RESERVED_KWARGS:
            raise RequestError(
                f"{param}: {key} is set by the server, not through chat_template_kwargs.", param
            )
        if key == "enable_thinking":
            if value is not None and not isinstance(value, bool):
                raise RequestError(f"{param} must be true, false or null (got {value!r}).", param)
            if thinking is None:
                raise RequestError(
                    f"{param}: this model's chat template has no thinking (it neither renders "
                    "reasoning_content nor writes <think>), so enable_thinking would change nothing.",
                    param,
                )
            if value is None:
                kwargs.pop(key, None)
                continue
        elif not re.search(rf"\b{re.escape(key)}\b", source):
            raise RequestError(f"{param}: this model's chat template does not read {key}.", param)
        kwargs[key] = value
    return kwargs


def template_messages(messages: list[dict[str, Any]], thinking: Thinking | None) -> list[dict[str, Any]]:
    """The messages as the template takes thoughts: an assistant message's `reasoning_content` stays a
    field for a template that renders it, goes inline (with the template's tags) for one that reads
    thoughts from the content, and is dropped for a template without thinking (which ignores it)."""
    out = []
    for message in messages:
        thought = message.get("reasoning_content")
        if thought is None or (thinking is not None and thinking.reads_field):
            out.append(message)
            continue
        message = {k: v for k, v in message.items() if k != "reasoning_content"}
        if thinking is not None:
            answer = message.get("content") or ""
            message["content"] = thinking.open + thought.strip("\n") + thinking.close + answer.lstrip("\n")
        out.append(message)
    return out


def close_prompt(prompt: str, thinking: Thinking | None, kwargs: dict[str, Any]) -> str:
    """The prompt with the empty block at its end when thinking is off and the template did not write it
    (templates that read thoughts inline do not know `enable_thinking`; training added the block too)."""
    if thinking is None or kwargs.get("enable_thinking") is not False or prompt.endswith(thinking.block):
        return prompt
    return prompt + thinking.block
