"""Reasoning (thinking) data, as LLaMA-Factory's `enable_thinking` and `preserve_thinking` mean it.

An assistant answer may start with a thought: inline (`<think>\\n...\\n</think>\\n\\n` at the start of
its content, any format) or as a separate `reasoning_content` (OpenAI messages) / `reasoning` column,
which the converters put inline with the default tags. Here the thought is split off again and the
conversation is rendered with the model's chat template in one of three modes:

  - `enable_thinking: true` (the default): thoughts are kept and trained; an answer without a thought
    gets the empty block (`<think>\\n\\n</think>\\n\\n`) prepended, inside the loss.
  - `enable_thinking: false`: every thought is removed; the empty block goes at the end of the prompt,
    outside the loss (how Qwen3 renders `enable_thinking=False` at inference).
  - `enable_thinking: null`: thoughts are kept and trained where present; an answer without one gets the
    empty block in its prompt, untrained.

With `mask_history: true` and `preserve_thinking: false` the earlier answers lose their thoughts and get
no block (what the model sees of its history at inference) and only the last answer is trained. Otherwise
every answer keeps its thought.

The modes apply to reasoning templates only: a template that renders a message's `reasoning_content`
(Qwen3 and its kind; its thought tags are read off a probe rendering and win over the defaults) or one
whose source writes `<think>` (thoughts are then written inline into the content). With another template
thoughts are plain answer text (LLaMA-Factory's plain templates), and setting `enable_thinking` to
false/null or `preserve_thinking: true` is refused.

Rendering. Each answer's prompt is what the template renders for the conversation before it with the
generation prompt and the turn's `enable_thinking` flag (what inference sees); the answer is what the
template renders for it as the latest turn. Templates like Qwen3's render a turn differently once a later
user message follows (its thought is dropped), so the conversation is not cut out of one rendering: the
sequence is spliced from these per-turn renderings, the text between one answer's end-of-turn token and
the next answer taken from the next prompt (located by counting end-of-turn tokens). For a template that
renders prefixes stably this is exactly the whole conversation's rendering; with `mask_history` and
without `preserve_thinking` it is exactly `apply_chat_template(messages, enable_thinking=...)` for
Qwen3's template too. Where the template does not write the empty block itself, sftflow adds its text.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, Literal

from sftflow.errors import SftflowError

DEFAULT_OPEN = "<think>\n"
DEFAULT_CLOSE = "\n</think>\n\n"
PROBE_THOUGHT = "sftflow-probe-thought"
PROBE_ANSWER = "sftflow-probe-answer"
Message = dict[str, Any]


@dataclass(frozen=True)
class Thinking:
    """How one run renders thoughts (see the module docstring).

    Attributes:
        enable: LLaMA-Factory's `enable_thinking`: True, False or None.
        preserve: `preserve_thinking`: earlier answers keep their thoughts under `mask_history`.
        open: the text that opens a thought (`<think>\\n` by default, or the template's).
        close: the text that closes it (`\\n</think>\\n\\n` by default, or the template's).
        reads_field: the template renders a message's `reasoning_content` (else thoughts go inline).
    """

    enable: bool | None = True
    preserve: bool = False
    open: str = DEFAULT_OPEN
    close: str = DEFAULT_CLOSE
    reads_field: bool = False

    @property
    def block(self) -> str:
        """The empty thought block."""
        return self.open + self.close


def inline_thought(thought: str, answer: str) -> str:
    """An answer with its thought written inline with the default tags (the converters' common form).

    >>> inline_thought("add them", "4")
    '<think>\\nadd them\\n</think>\\n\\n4'
    """
    return DEFAULT_OPEN + thought.strip("\n") + DEFAULT_CLOSE + answer.lstrip("\n")


def split_thought(content: str, words: tuple[str, str] | None = None) -> tuple[str | None, str]:
    """(thought, answer) of an assistant content; thought None when it has none.

    A thought is the text between an opening tag at the very start of the content (leading whitespace
    allowed) and the first closing tag, or everything before a closing tag when the content has no
    opening tag (templates whose generation prompt opens the thought). The default tags and the
    template's (`words`) are both recognised. The thought loses its surrounding newlines and the answer
    its leading ones, as Qwen3's template does.

    >>> split_thought("<think>\\nsum\\n</think>\\n\\n4")
    ('sum', '4')
    >>> split_thought("4"), split_thought("<think></think>4")
    ((None, '4'), ('', '4'))
    """
    words = words or (DEFAULT_OPEN, DEFAULT_CLOSE)
    for opening, closing in {
        (DEFAULT_OPEN.strip(), DEFAULT_CLOSE.strip()),
        (words[0].strip(), words[1].strip()),
    }:
        if not closing or closing not in content:
            continue
        head, answer = content.split(closing, 1)
        stripped = head.lstrip()
        if opening and stripped.startswith(opening):
            head = stripped[len(opening) :]
        elif opening and opening in head:
            continue  # an opening tag that does not start the answer: plain text
        return head.strip("\n"), answer.lstrip("\n")
    return None, content


def has_thought(messages: list[Message], words: tuple[str, str] | None = None) -> bool:
    """Whether any assistant message of the conversation carries a thought."""
    return any(
        m.get("role") == "assistant" and split_thought(m.get("content") or "", words)[0] is not None
        for m in messages
    )


def _render(tokenizer: Any, messages: list[Message], generation: bool, enable: bool | None = None) -> str:
    kwargs = {} if enable is None else {"enable_thinking": enable}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation, **kwargs)


def thought_words(tokenizer: Any) -> tuple[str, str, bool] | None:
    """(open, close, reads_field) of the tokenizer's chat template, or None for a template without
    thinking. A template that renders a probe's `reasoning_content` gives its own tags; one whose source
    writes `<think>` gets the defaults, with thoughts written inline."""
    user = [{"role": "user", "content": "hi"}]
    probe = {"role": "assistant", "content": PROBE_ANSWER, "reasoning_content": PROBE_THOUGHT}
    try:
        prompt = _render(tokenizer, user, True)
        text = _render(tokenizer, [*user, probe], False)
    except Exception:  # a template that refuses the probe  # noqa: BLE001
        prompt = text = ""
    if PROBE_THOUGHT in text and text.startswith(prompt):
        body = text[len(prompt) :]
        opening, rest = body.split(PROBE_THOUGHT, 1)
        closing = rest.split(PROBE_ANSWER, 1)[0] if PROBE_ANSWER in rest else ""
        if opening.strip() and closing.strip():
            return opening, closing, True
    source = getattr(tokenizer, "chat_template", None)
    source = " ".join(source.values()) if isinstance(source, dict) else str(source or "")
    if DEFAULT_OPEN.strip() in source:
        return DEFAULT_OPEN, DEFAULT_CLOSE, False
    return None


def resolve_thinking(tokenizer: Any, enable: bool | None, preserve: bool) -> Thinking | None:
    """The run's Thinking for this tokenizer's template; None when the template has no thinking and the
    flags are LLaMA-Factory's defaults (thoughts are then plain answer text).

    Raises:
        SftflowError: enable_thinking false/null or preserve_thinking true with a template that has no
            thinking (the keys would change nothing).
    """
    if enable not in (True, False, None) or not isinstance(preserve, bool):
        raise SftflowError(
            f"enable_thinking must be true, false or null (got {enable!r}) and preserve_thinking true or "
            f"false (got {preserve!r})."
        )
    words = thought_words(tokenizer)
    if words is None:
        if enable is not True or preserve:
            key = "preserve_thinking: true" if enable is True else f"enable_thinking: {_yaml(enable)}"
            raise SftflowError(
                f"{key} needs a reasoning chat template, but this one "
                f"({getattr(tokenizer, 'name_or_path', '?') or '?'}) neither renders reasoning_content nor "
                "writes <think>, so thoughts are plain answer text. Set template: qwen3 (sftflow's built-in "
                "Qwen3-style template), use a model whose template thinks, or remove the key."
            )
        return None
    return Thinking(enable, preserve, words[0], words[1], words[2])


def _yaml(value: bool | None) -> str:
    return "null" if value is None else str(value).lower()


Plan = Literal["thought", "answer_block", "prompt_block", "history"]


def _plans(
    messages: list[Message], thinking: Thinking, mask_history: bool
) -> list[tuple[int, Plan, str, str]]:
    """(message index, plan, thought, answer) per assistant turn."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    discard = mask_history and not thinking.preserve
    words = (thinking.open, thinking.close)
    out: list[tuple[int, Plan, str, str]] = []
    for k, i in enumerate(turns):
        thought, answer = split_thought(messages[i]["content"], words)
        if thinking.enable is False:
            thought = None
        plan: Plan
        if discard and k < len(turns) - 1:
            plan, thought = "history", None
        elif thought is not None:
            plan = "thought"
        else:
            plan = "answer_block" if thinking.enable else "prompt_block"
        out.append((i, plan, thought or "", answer))
    return out


def _view(
    messages: list[Message], plans: list[tuple[int, Plan, str, str]], thinking: Thinking
) -> list[Message]:
    """The messages as the template gets them: thoughts split off (as `reasoning_content` or inline with
    the template's tags) or removed, per plan."""
    view = [{"role": m["role"], "content": m["content"]} for m in messages]
    for i, plan, thought, answer in plans:
        if plan != "thought":
            view[i]["content"] = answer
        elif thinking.reads_field:
            view[i] = {"role": "assistant", "content": answer, "reasoning_content": thought}
        else:
            view[i]["content"] = thinking.open + thought + thinking.close + answer
    return view


def _stop_ends(text: str, stops: list[str]) -> list[int]:
    """The end offsets of the end-of-turn strings in `text`, in order."""
    ends: list[int] = []
    for stop in stops:
        start = text.find(stop)
        while start >= 0:
            ends.append(start + len(stop))
            start = text.find(stop, start + len(stop))
    return sorted(ends)


def _not_cuttable(i: int) -> SftflowError:
    return SftflowError(
        f"the chat template renders the answer at message {i} so that its prompt is not a prefix of it, so "
        "prompt and thought/answer cannot be separated. Use a template that renders the generation prompt "
        "as the start of the answer (e.g. template: qwen3)."
    )


def thinking_spans(
    tokenizer: Any, messages: list[Message], thinking: Thinking, stop_strings: list[str], mask_history: bool
) -> tuple[str, list[tuple[int, int]]]:
    """The spliced rendering of a conversation in `thinking`'s mode and, per assistant turn,
    (prompt_end, turn_end) offsets into it (as `template.turn_spans` returns them).

    Raises:
        SftflowError: no assistant turn; the template drops a thought it should render, or cannot be cut
            into prompts and answers.
    """
    plans = _plans(messages, thinking, mask_history)
    if not plans:
        raise SftflowError("the conversation has no assistant turn, so there is nothing to train on.")
    view = _view(messages, plans, thinking)
    block = thinking.block
    history = _render(tokenizer, view, False, True) if any(p[1] == "history" for p in plans) else ""
    text, spans = "", []
    for k, (i, plan, thought, _) in enumerate(plans):
        last = k == len(plans) - 1
        prompt = _render(tokenizer, view[:i], True, plan != "prompt_block")
        if plan == "prompt_block" and prompt.endswith(block):
            prompt = prompt[: -len(block)]
        if plan == "history":
            if not history.startswith(prompt):
                raise _not_cuttable(i)
            rest = history[len(prompt) :]
            ends = _stop_ends(rest, stop_strings)
            answer = rest[: ends[0]] if ends else rest
        else:
            whole = _render(tokenizer, view[: i + 1], False, plan != "prompt_block")
            if not whole.startswith(prompt):
                raise _not_cuttable(i)
            answer = whole[len(prompt) :]
            if plan == "prompt_block":
                answer = answer[len(block) :] if answer.startswith(block) else answer
                prompt += block
            elif plan == "answer_block" and not answer.startswith(block):
                answer = block + answer
            elif plan == "thought" and thought.strip() and thought.strip() not in answer:
                raise SftflowError(
                    f"the chat template drops the thought of the answer at message {i}, so it cannot be "
                    "trained. Set enable_thinking: false to train without thoughts, or use a template that "
                    "renders them (template: qwen3, or template: deepseekr1 for a DeepSeek-R1 model)."
                )
            if not last:
                ends = _stop_ends(answer, stop_strings)
                answer = answer[: ends[-1]] if ends else answer
        if k == 0:
            glue = prompt
        else:  # the text after the previous answer's end-of-turn token, as this prompt renders it
            ends = _stop_ends(prompt, stop_strings)
            done = len(_stop_ends(text, stop_strings))
            if len(ends) < done:
                raise _not_cuttable(i)
            glue = prompt[ends[done - 1] :]
        text += glue
        start = len(text)
        text += answer
        spans.append((start, len(text)))
    return text, spans


def thinking_prompt(tokenizer: Any, messages: list[Message], thinking: Thinking) -> str:
    """The generation prompt for the last assistant answer of `messages` (what predict feeds `generate`):
    the conversation before it in the mode's form, with the empty block when the mode puts it there."""
    plans = _plans(messages, thinking, mask_history=True)
    view = _view(messages, plans, thinking)
    i, plan, _, _ = plans[-1]
    prompt = _render(tokenizer, view[:i], True, plan != "prompt_block")
    if plan == "prompt_block" and not prompt.endswith(thinking.block):
        prompt += thinking.block
    return prompt


def _set_default(enable: bool) -> str:
    value = "true" if enable else "false"
    return f"{{%- if enable_thinking is not defined %}}{{%- set enable_thinking = {value} %}}{{%- endif %}}"


def _close_when_off(block: str) -> str:
    return (
        "{%- if add_generation_prompt and enable_thinking is defined and enable_thinking is false %}"
        f"{{{{- {json.dumps(block)} }}}}{{%- endif %}}"
    )


def template_with_mode(tokenizer: Any, thinking: Thinking) -> str | None:
    """The tokenizer's chat template with the run's `enable_thinking` as its default (what export
    writes, so that a model trained without thinking does not think after export), or None when its
    default already renders the run's mode (enable_thinking true for Qwen3, or null). A template that
    does not read `enable_thinking` (thoughts inline) also gets the empty block written after the
    generation prompt when it is false, as training put it there. A request may still set the flag.

    Raises:
        SftflowError: the template is a dict of named templates, or the result still does not render the
            mode by default.
    """
    if thinking.enable is None:
        return None
    source = tokenizer.chat_template
    if not isinstance(source, str):
        raise SftflowError(
            "the tokenizer has several named chat templates; sftflow writes the run's enable_thinking "
            "only into a single template. Set template (e.g. template: qwen3) for the export."
        )
    user = [{"role": "user", "content": "hi"}]
    wanted = _render(tokenizer, user, True, thinking.enable)
    if thinking.enable is False and not wanted.endswith(thinking.block):
        source += _close_when_off(thinking.block)
    if _render(tokenizer, user, True) == wanted and source == tokenizer.chat_template:
        return None
    source = _set_default(thinking.enable) + source
    probe = copy.copy(tokenizer)
    probe.chat_template = source
    default = _render(probe, user, True)
    if default != _render(probe, user, True, thinking.enable) or (
        thinking.enable is False and not default.endswith(thinking.block)
    ):
        raise SftflowError(
            f"could not make the chat template think {'on' if thinking.enable else 'off'} by default "
            "(its generation prompt does not follow enable_thinking). Set template: qwen3 for the export."
        )
    return source
