"""Pure row converters: one raw row (alpaca, sharegpt or OpenAI messages) -> sftflow's common form.

The common form depends on the stage (what the tokenizers in `encode.py` read):

* ``sft``: ``{"messages": [...], "tools": str, "images": [str]}``. ``messages`` are
  ``{"role": "system" | "user" | "assistant" | "tool", "content": str}``; the system message, when there
  is one, comes first; then user (or tool) and assistant turns alternate, and the last turn is an
  assistant turn. A sharegpt ``function_call`` turn is an ``assistant`` turn whose content is the call
  text exactly as written in the data (e.g. ``{"name": ..., "arguments": ...}``); an ``observation`` turn
  is a ``tool`` turn. ``tools`` is the tool schema as a JSON string (``""`` when the row has none).
  An assistant answer's thought is written inline at the start of its content
  (``<think>\n...\n</think>\n\n``): as it comes in the data, or from a turn's ``reasoning_content``
  (OpenAI/sharegpt turn objects) or a ``reasoning`` column (the last answer's thought, any format, mapped
  in dataset_info.json ``columns``). ``data/thinking.py`` splits it off again for the chat template.
  ``images`` are the row's image paths (absolute) or data: URLs, one per ``<image>`` in the text, in order
  (``images.py``); empty for text rows.
* ``pt``: ``{"text": str}``: the raw text to continue-pretrain on (no template, no eos: the pt tokenizer
  adds it).
* ``rm`` (``ranking: true`` in dataset_info.json): ``{"messages": [...], "chosen": str, "rejected": str,
  "tools": str}``. ``messages`` is the shared prompt (same rules as sft, but it ends with a user or tool
  turn); ``chosen`` and ``rejected`` are the two assistant answers to it.
* ``kto`` (a ``kto_tag`` column, LLaMA-Factory's KTO form): the sft form plus ``"kto_tag": bool``, whether
  the last answer is desirable (true) or undesirable (false).
* ``grpo``: ``{"messages": [...], "tools": str, "extra": str}``: the prompt (it ends with a user or tool
  turn; a conversation's final assistant answer, or alpaca's response column, is taken off it) and, as a
  JSON object string, what the rewards get besides it: that answer as ``answer`` and every column the
  registry entry does not map, under its own name (e.g. a ``solution`` column).

A row that cannot make a valid example raises `RowError` with the field and the reason; the loader adds
the dataset, file and row number.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from sftflow.data.images import ImageError, check_image, check_placeholders, content_parts, resolve_image
from sftflow.data.thinking import inline_thought, split_thought

Message = dict[str, str]
Stage = Literal["pt", "sft", "rm", "kto", "grpo"]


class RowError(ValueError):
    """A single row is malformed; the message names the field, says why and how to fix it."""


def _text(row: dict[str, Any], column: str | None) -> str:
    value = row.get(column) if column else None
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(f"column {column!r} should be a string, got {type(value).__name__} {_short(value)}")
    return value


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _tools(row: dict[str, Any], columns: dict[str, str]) -> str:
    """The tool schema as a JSON string: a JSON string column is checked, a list/dict column is dumped."""
    column = columns.get("tools")
    value = row.get(column) if column else None
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        try:
            json.loads(value)
        except json.JSONDecodeError as exc:
            raise RowError(f"column {column!r} is not valid JSON ({exc.msg} at char {exc.pos})") from None
        return value
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    raise RowError(f"column {column!r} should be a JSON string or a list, got {type(value).__name__}")


def alpaca_to_messages(
    row: dict[str, Any], columns: dict[str, str], need_response: bool = True
) -> list[Message]:
    """Convert an alpaca row (instruction, input, output, optional system and history).

    The user turn is `instruction + "\\n" + input` (input omitted when empty); `history` is a list of
    earlier `[user, assistant]` pairs. With `need_response=False` (rm prompts) no output is read.

    >>> alpaca_to_messages({"instruction": "Add", "input": "1+1", "output": "2"}, {"prompt": "instruction",
    ...     "query": "input", "response": "output"})
    [{'role': 'user', 'content': 'Add\\n1+1'}, {'role': 'assistant', 'content': '2'}]
    """
    messages: list[Message] = []
    system = _text(row, columns.get("system"))
    if system:
        messages.append({"role": "system", "content": system})
    history = row.get(columns.get("history", "")) if columns.get("history") else None
    if history is not None and not isinstance(history, (list, tuple)):
        raise RowError(f"column {columns['history']!r} must be a list of [user, assistant] pairs")
    for i, turn in enumerate(history or []):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise RowError(f"history[{i}] must be a [user, assistant] pair of strings, got {_short(turn)}")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    prompt = "\n".join(p for p in (_text(row, columns.get("prompt")), _text(row, columns.get("query"))) if p)
    if not prompt.strip():
        raise RowError(
            f"the instruction ({columns.get('prompt')!r}) and input ({columns.get('query')!r}) are both empty"
        )
    messages.append({"role": "user", "content": prompt})
    if need_response:
        response = _text(row, columns.get("response"))
        if not response.strip():
            raise RowError(
                f"the response ({columns.get('response')!r}) is empty; every sft example needs an answer"
            )
        messages.append({"role": "assistant", "content": response})
    return messages


def _role_map(tags: dict[str, str]) -> dict[str, str]:
    return {
        tags["user_tag"]: "user",
        tags["assistant_tag"]: "assistant",
        tags["system_tag"]: "system",
        tags["observation_tag"]: "tool",
        tags["function_tag"]: "assistant",
    }


OPENAI_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "tool": "tool"}


def _turn(turn: Any, i: int, tags: dict[str, str], field: str) -> tuple[Message, str]:
    """One turn as (message, the role name written in the data). OpenAI-style `role`/`content` items are
    read as such whatever the tags say."""
    if not isinstance(turn, dict):
        raise RowError(f"{field}[{i}] must be an object with {tags['role_tag']!r}/{tags['content_tag']!r}")
    role_key, content_key, role_map = tags["role_tag"], tags["content_tag"], _role_map(tags)
    if role_key not in turn and "role" in turn:
        role_key, content_key, role_map = "role", "content", OPENAI_ROLES
    if role_key not in turn:
        raise RowError(
            f"{field}[{i}] has no {role_key!r} key (keys: {sorted(turn)}); set tags.role_tag and "
            "tags.content_tag in dataset_info.json to your key names"
        )
    raw_role, content = turn.get(role_key), turn.get(content_key)
    if raw_role not in role_map:
        raise RowError(
            f"{field}[{i}] has role {raw_role!r}; expected one of {sorted(role_map)} "
            "(map your role names with tags.user_tag, assistant_tag, ... in dataset_info.json)"
        )
    if not isinstance(content, str) or not content.strip():
        raise RowError(f"{field}[{i}] ({raw_role}) has empty or non-string {content_key!r}")
    if role_map[raw_role] == "assistant" and turn.get("reasoning_content") not in (None, ""):
        content = with_reasoning(content, turn["reasoning_content"], f"{field}[{i}].reasoning_content")
    return {"role": role_map[raw_role], "content": content}, raw_role


def with_reasoning(content: str, reasoning: Any, where: str) -> str:
    """`content` with the thought `reasoning` written inline before it (see the module docstring).

    >>> with_reasoning("4", "2+2", "reasoning")
    '<think>\\n2+2\\n</think>\\n\\n4'
    """
    if not isinstance(reasoning, str):
        raise RowError(f"{where} should be a string, got {type(reasoning).__name__} {_short(reasoning)}")
    if split_thought(content)[0] is not None:
        raise RowError(
            f"{where} is set but the answer already starts with an inline <think> thought; give the thought "
            "once, inline or as reasoning"
        )
    return inline_thought(reasoning, content)


def _last_reasoning(row: dict[str, Any], columns: dict[str, str], messages: list[Message]) -> None:
    """Put the `reasoning` column's thought inline into the last assistant answer (in place)."""
    column = columns.get("reasoning")
    value = row.get(column) if column else None
    if value is None or value == "":
        return
    last = messages[-1]
    if last["role"] != "assistant":
        raise RowError(f"column {column!r} (reasoning) is set but the row has no answer for it")
    last["content"] = with_reasoning(last["content"], value, f"column {column!r}")


def sharegpt_to_messages(
    row: dict[str, Any], columns: dict[str, str], tags: dict[str, str], need_response: bool = True
) -> list[Message]:
    """Convert a sharegpt row (`conversations` of `{from, value}`) or OpenAI `messages` (`{role, content}`).

    Role and key names come from `tags`. As in LLaMA-Factory, turns after an optional leading system turn
    alternate: user or observation first, then assistant or function_call. The conversation must end with
    an assistant turn, or (with `need_response=False`, for rm prompts) with a user or observation turn.

    >>> tags = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
    ...     "system_tag": "system", "observation_tag": "observation", "function_tag": "function_call"}
    >>> sharegpt_to_messages({"c": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
    ...     {"messages": "c"}, tags)
    [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'}]
    """
    field = columns.get("messages", "conversations")
    turns = row.get(field)
    if not isinstance(turns, list) or not turns:
        raise RowError(f"column {field!r} must be a non-empty list of turns, got {_short(turns)}")
    parsed = [_turn(turn, i, tags, field) for i, turn in enumerate(turns)]
    system = _text(row, columns.get("system"))
    offset = 0
    if parsed[0][0]["role"] == "system":
        system, offset = parsed[0][0]["content"], 1
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    for i, (message, raw_role) in enumerate(parsed[offset:]):
        expected = ("user", "tool") if i % 2 == 0 else ("assistant",)
        if message["role"] not in expected:
            want = "a user or observation turn" if i % 2 == 0 else "an assistant or function_call turn"
            raise RowError(
                f"{field}[{i + offset}] is {raw_role!r} but {want} was expected there: after an optional "
                "system turn, turns must alternate user (or observation) then assistant (or function_call)"
            )
        messages.append(message)
    if len(messages) == (1 if system else 0):
        raise RowError(f"column {field!r} holds only a system turn")
    if need_response and messages[-1]["role"] != "assistant":
        raise RowError(f"{field} must end with an assistant turn (the response to train on)")
    if not need_response and messages[-1]["role"] == "assistant":
        raise RowError(f"{field} must end with a user turn: chosen and rejected are the answers to it")
    return messages


def _answer(row: dict[str, Any], column: str, tags: dict[str, str] | None) -> str:
    """A ranking answer: a string (alpaca) or one assistant turn object (sharegpt)."""
    value = row.get(column)
    if tags is not None and isinstance(value, dict):
        message, raw_role = _turn(value, 0, tags, column)
        if message["role"] != "assistant":
            raise RowError(f"column {column!r} has role {raw_role!r}; it must be an assistant turn")
        value = message["content"]
    if not isinstance(value, str) or not value.strip():
        raise RowError(f"column {column!r} must be a non-empty answer, got {_short(value)}")
    return value


def _flatten_parts(row: dict[str, Any], columns: dict[str, str], tags: dict[str, str]) -> tuple[dict, list]:
    """The row with OpenAI content-part lists turned into text with `<image>` placeholders, and the image
    urls of those parts in order (see `images.content_parts`)."""
    field = columns.get("messages", "conversations")
    turns = row.get(field)
    if not isinstance(turns, list):
        return row, []
    urls: list[str] = []
    flat, changed = [], False
    for i, turn in enumerate(turns):
        key = tags.get("content_tag", "content")
        key = key if isinstance(turn, dict) and key in turn else "content"
        if isinstance(turn, dict) and isinstance(turn.get(key), list):
            try:
                text, found = content_parts(turn[key], f"{field}[{i}]")
            except ImageError as exc:
                raise RowError(str(exc)) from None
            turn, changed = {**turn, key: text}, True
            urls += found
        flat.append(turn)
    return ({**row, field: flat}, urls) if changed else (row, [])


def _row_images(
    row: dict[str, Any], columns: dict[str, str], part_urls: list[str], image_dirs: tuple[Path, ...]
) -> list[str]:
    """The row's images, resolved and verified: the `images` column's list, or the content parts' urls."""
    column = columns.get("images")
    value = row.get(column) if column else None
    if value is None or value == []:
        refs, field = part_urls, "the content parts"
    elif part_urls:
        raise RowError(f"column {column!r} and image_url content parts both give images; use one of them")
    elif isinstance(value, str):
        refs, field = [value], f"column {column!r}"
    elif isinstance(value, list):
        refs, field = value, f"column {column!r}"
    else:
        raise RowError(f"column {column!r} (images) should be a list of paths, got {_short(value)}")
    resolved = []
    for i, ref in enumerate(refs):
        where = f"{field} image {i}" if field.startswith("the") else f"{column}[{i}]"
        try:
            resolved.append(resolve_image(ref, image_dirs))
            check_image(resolved[-1])
        except ImageError as exc:
            raise RowError(f"{where}: {exc}") from None
    return resolved


def convert_row(
    row: dict[str, Any],
    formatting: str,
    columns: dict[str, str],
    tags: dict[str, str],
    stage: Stage,
    image_dirs: tuple[Path, ...] = (),
) -> dict[str, Any]:
    """Convert one raw row into the common form of `stage` (see the module docstring).

    sft rows also get `images` (see `images.py`): resolved against `image_dirs`, checked against the
    `<image>` placeholders, empty for text rows; only datasets mapping an `images` column, or rows with
    image_url content parts, are checked (elsewhere `<image>` is plain text).

    Raises:
        RowError: the row cannot make a valid example; the message names the field.
    """
    if stage == "sft" and formatting != "alpaca":
        row, part_urls = _flatten_parts(row, columns, tags)
    else:
        part_urls = []
    if stage == "pt":
        if formatting == "alpaca":
            text = _text(row, columns.get("prompt"))
        else:  # sharegpt/openai rows: the first turn's text, as LLaMA-Factory does
            field = columns.get("messages", "conversations")
            turns = row.get(field)
            if not isinstance(turns, list) or not turns:
                raise RowError(f"column {field!r} must be a non-empty list of turns, got {_short(turns)}")
            text = _turn(turns[0], 0, tags, field)[0]["content"]
        if not text.strip():
            raise RowError(f"column {columns.get('prompt')!r} (the text) is empty")
        return {"text": text}
    if stage == "rm":
        need = False
        if formatting == "alpaca":
            messages = alpaca_to_messages(row, columns, need_response=need)
        else:
            messages = sharegpt_to_messages(row, columns, tags, need_response=need)
        answer_tags = None if formatting == "alpaca" else tags
        chosen = _answer(row, columns.get("chosen", "chosen"), answer_tags)
        rejected = _answer(row, columns.get("rejected", "rejected"), answer_tags)
        return {"messages": messages, "chosen": chosen, "rejected": rejected, "tools": _tools(row, columns)}
    if stage == "grpo":
        return grpo_prompt(row, formatting, columns, tags)
    if formatting == "alpaca":
        messages = alpaca_to_messages(row, columns)
    else:
        messages = sharegpt_to_messages(row, columns, tags)
    _last_reasoning(row, columns, messages)
    if stage == "kto":
        return {
            "messages": messages,
            "tools": _tools(row, columns),
            "kto_tag": kto_tag(row, columns["kto_tag"]),
        }
    images: list[str] = []
    if "images" in columns or part_urls:
        images = _row_images(row, columns, part_urls, image_dirs)
        try:
            check_placeholders(
                messages, images, f"column {columns['images']!r}" if "images" in columns else "it"
            )
        except ImageError as exc:
            raise RowError(str(exc)) from None
    return {"messages": messages, "tools": _tools(row, columns), "images": images}


def kto_tag(row: dict[str, Any], column: str) -> bool:
    """The row's KTO label: true (desirable answer) or false; booleans, 0/1 and "true"/"false" are read.

    >>> kto_tag({"label": "false"}, "label"), kto_tag({"label": 1}, "label")
    (False, True)
    """
    value = row.get(column)
    words = {"true": True, "false": False, "1": True, "0": False}
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, str)) and str(value).strip().lower() in words:
        return words[str(value).strip().lower()]
    raise RowError(f"column {column!r} (kto_tag) must be true or false, got {_short(value)}")


def grpo_prompt(
    row: dict[str, Any], formatting: str, columns: dict[str, str], tags: dict[str, str]
) -> dict[str, Any]:
    """A grpo prompt: the conversation without its final answer, and the extra columns for the rewards.

    >>> grpo_prompt({"instruction": "2+2?", "output": "4", "level": 1}, "alpaca",
    ...     {"prompt": "instruction", "query": "input", "response": "output"}, {})["extra"]
    '{"level": 1, "answer": "4"}'
    """
    if formatting == "alpaca":
        messages = alpaca_to_messages(row, columns, need_response=False)
        answer = _text(row, columns.get("response")) or None
    else:
        field = columns.get("messages", "conversations")
        turns = row.get(field)
        last = turns[-1] if isinstance(turns, list) and turns else None
        answer = None
        if isinstance(last, dict) and _turn(last, len(turns) - 1, tags, field)[0]["role"] == "assistant":
            answer = _turn(last, len(turns) - 1, tags, field)[0]["content"]
            row = {**row, field: turns[:-1]}
        messages = sharegpt_to_messages(row, columns, tags, need_response=False)
    mapped = set(columns.values())
    extra = {key: value for key, value in row.items() if key not in mapped}
    if answer is not None:
        if "answer" in extra and extra["answer"] != answer:
            raise RowError(
                "the row has an answer column and a final answer (response column or last assistant turn); "
                "keep one, or map the response column to another name"
            )
        extra["answer"] = answer
    try:
        text = json.dumps(extra, ensure_ascii=False, default=str)
    except (TypeError, ValueError) as exc:
        raise RowError(f"the extra columns {sorted(extra)} cannot be passed to the rewards: {exc}") from None
    return {"messages": messages, "tools": _tools(row, columns), "extra": text}
