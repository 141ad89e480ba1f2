"""What the OpenAI routes answer: a chat request turned into prompt ids and SamplingParams (tools and
response_format included), and the response pieces (choices, logprobs objects, usage) built from
Completions.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sftflow.data.thinking import Thinking
from sftflow.errors import SftflowError
from sftflow.infer.constrain import json_schema_grammar, lark_grammar
from sftflow.infer.protocol import ChatCompletionRequest, NamedToolChoice
from sftflow.infer.reasoning import ThoughtSplitter, split_answer
from sftflow.infer.requests import Completion, RequestError, SamplingParams, TokenLogprob
from sftflow.infer.toolcalls import ToolCall, call_format, forced_call_lark, parse_tool_calls, supports_tools

if TYPE_CHECKING:  # (the engine imports torch and transformers; this module is imported without them)
    from sftflow.infer.engine import ChatEngine

logger = logging.getLogger(__name__)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# -- chat ---------------------------------------------------------------------------------------


class ChatPlan:
    """What a chat request becomes: prompt ids, sampling params (grammar included) and, with tools, how
    to parse the answer back into tool calls."""

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        tool_format: str | None,
        parallel: bool,
        thinking: Thinking | None = None,
        prompt: str = "",
    ):
        self.prompt_ids = prompt_ids
        self.params = params
        self.tool_format = tool_format  # None: no tool parsing (no tools, or tool_choice none)
        self.parallel = parallel
        self.top_logprobs = params.top_logprobs
        self.thinking = thinking  # a reasoning template: answers carry reasoning_content
        self.prompt = prompt  # the prompt text (where the thought starts: infer/reasoning.py)

    def splitter(self) -> ThoughtSplitter | None:
        """A streamed answer's thought splitter (None: the template has no thinking)."""
        return ThoughtSplitter(self.thinking, self.prompt) if self.thinking is not None else None

    def split(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if self.tool_format is None:
            return text, []
        content, calls = parse_tool_calls(text, self.tool_format)  # type: ignore[arg-type]
        calls = calls if self.parallel else calls[:1]
        return (content or None) if calls else content, calls

    def choice(self, index: int, completion: Completion) -> dict[str, Any]:
        thought, answer = split_answer(completion.text, self.thinking, self.prompt)
        content, calls = self.split(answer)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if self.thinking is not None:
            message["reasoning_content"] = thought
        if calls:
            message["tool_calls"] = [c.to_openai() for c in calls]
        return {
            "index": index,
            "message": message,
            "finish_reason": "tool_calls" if calls else completion.finish_reason,
            "logprobs": chat_logprobs(completion.logprobs, self.top_logprobs)
            if self.params.logprobs
            else None,
        }


def chat_plan(engine: ChatEngine, body: ChatCompletionRequest) -> ChatPlan:
    """Turn a chat request into prompt ids and SamplingParams.

    Raises:
        RequestError: tools for a template that cannot render them, an unknown named tool, a schema that
            cannot be enforced, chat_template_kwargs the template does not read, or messages the template
            refuses.
    """
    grammar = None
    fmt = body.response_format
    try:
        if fmt is not None and fmt.type == "json_object":
            grammar = json_schema_grammar({"type": "object"})
        elif fmt is not None and fmt.type == "json_schema":
            grammar = json_schema_grammar(fmt.json_schema.schema_ or {"type": "object"})  # type: ignore[union-attr]
    except SftflowError as exc:
        raise RequestError(str(exc), "response_format.json_schema.schema") from None

    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    tool_format = None
    if tools:
        if not supports_tools(engine.tokenizer):
            raise RequestError(
                "this model's chat template does not render tools, so it cannot be asked to call them; "
                "serve a model whose template supports tools (e.g. Qwen2.5, Llama 3.1, SmolLM3), or "
                "drop tools from the request.",
                "tools",
            )
        choice = body.tool_choice or "auto"
        tool_format = None if choice == "none" else call_format(engine.tokenizer)
        if isinstance(choice, NamedToolChoice) or choice == "required":
            name = choice.function.name if isinstance(choice, NamedToolChoice) else None
            if name is not None and name not in {t["function"]["name"] for t in tools}:
                raise RequestError(f"tool_choice names {name!r}, which is not in tools.", "tool_choice")
            try:
                grammar = lark_grammar(forced_call_lark(tools, name, tool_format))  # type: ignore[arg-type]
            except SftflowError as exc:
                raise RequestError(str(exc), "tools") from None
    messages = [m.to_template() for m in body.messages]
    prompt = engine.prompt(messages, tools, body.chat_template_kwargs)
    prompt_ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
    if body.user:
        logger.info("request from user %r", body.user)
    params = SamplingParams(
        max_new_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        n=body.n,
        stop=body.stop or [],
        seed=body.seed,
        logprobs=body.logprobs,
        top_logprobs=body.top_logprobs or 0,
        grammar=grammar,
    )
    return ChatPlan(prompt_ids, params, tool_format, body.parallel_tool_calls, engine.thinking, prompt)


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def chat_logprobs(items: list[TokenLogprob] | None, top: int) -> dict[str, Any]:
    """OpenAI's chat `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs}, ...]}."""
    content = []
    for item in items or []:
        content.append(
            {
                "token": item.token,
                "logprob": item.logprob,
                "bytes": _token_bytes(item.token),
                "top_logprobs": [
                    {"token": t, "logprob": v, "bytes": _token_bytes(t)} for _, t, v in item.top[:top]
                ],
            }
        )
    return {"content": content}


# -- completions --------------------------------------------------------------------------------


def completion_prompts(
    engine: ChatEngine, prompt: str | list[str] | list[int] | list[list[int]]
) -> list[list[int]]:
    """The prompts of a completions request as token ids (text is tokenized as is, no chat template).

    Raises:
        RequestError: an empty prompt or token ids outside the vocabulary.
    """
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        prompt = [prompt]
    out = []
    for i, item in enumerate(prompt):
        param = "prompt" if len(prompt) == 1 else f"prompt.{i}"
        ids = engine.tokenizer.encode(item, add_special_tokens=False) if isinstance(item, str) else list(item)
        out.append(engine.check_prompt_ids(ids, param))
    if not out:
        raise RequestError("prompt is empty.", "prompt")
    return out


def completion_logprobs(
    engine: ChatEngine, items: list[TokenLogprob | None], top: int, offset: int = 0
) -> dict[str, Any]:
    """OpenAI's completions `logprobs` object: tokens, token_logprobs, top_logprobs ({token: logprob}),
    text_offset. A None item (the first prompt token under echo) has no logprob."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for item in items:
        offsets.append(offset)
        if item is None:
            tokens.append("")
            token_logprobs.append(None)
            tops.append(None)
            continue
        tokens.append(item.token)
        token_logprobs.append(item.logprob)
        tops.append({t: v for _, t, v in item.top[: max(top, 1)]} if top else None)
        offset += len(item.token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def completion_choice(
    engine: ChatEngine, index: int, prompt_ids: list[int], c: Completion, echo: bool, logprobs: int | None
) -> dict[str, Any]:
    prompt_text = engine.tokenizer.decode(prompt_ids) if echo else ""
    out: dict[str, Any] = {"index": index, "text": prompt_text + c.text, "finish_reason": c.finish_reason}
    out["logprobs"] = None
    if logprobs is not None:
        items: list[Any] = []
        if echo:
            first = engine.tokenizer.decode(prompt_ids[:1])
            items = list(c.prompt_logprobs or [])
            head = completion_logprobs(engine, items, logprobs)
            if head["tokens"]:
                head["tokens"][0] = first
        else:
            head = completion_logprobs(engine, [], logprobs)
        tail = completion_logprobs(engine, list(c.logprobs or []), logprobs, offset=len(prompt_text))
        out["logprobs"] = {key: head[key] + tail[key] for key in head}
    return out
