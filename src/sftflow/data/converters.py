"""Pure row converters: one raw row (alpaca or sharegpt) -> a list of chat messages.

Messages are `{"role": "system" | "user" | "assistant" | "tool", "content": str}`; the system message,
when there is one, comes first. A row that cannot make a valid sft conversation raises `RowError`
with the reason; the loader adds the file and row number.
"""

from __future__ import annotations

from typing import Any

Message = dict[str, str]


class RowError(ValueError):
    """A single row is malformed; the message says why and how to fix it."""


def _text(row: dict[str, Any], column: str | None) -> str:
    value = row.get(column) if column else None
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(f"column {column!r} should be a string, got {type(value).__name__}")
    return value


def alpaca_to_messages(row: dict[str, Any], columns: dict[str, str]) -> list[Message]:
    """Convert an alpaca row (instruction, input, output, optional system and history).

    The user turn is `instruction + "\\n" + input` (input omitted when empty); `history` is a list of
    earlier `[user, assistant]` pairs.

    >>> alpaca_to_messages({"instruction": "Add", "input": "1+1", "output": "2"}, {"prompt": "instruction",
    ...     "query": "input", "response": "output"})
    [{'role': 'user', 'content': 'Add\\n1+1'}, {'role': 'assistant', 'content': '2'}]
    """
    messages: list[Message] = []
    system = _text(row, columns.get("system"))
    if system:
        messages.append({"role": "system", "content": system})
    history = row.get(columns.get("history", "")) if columns.get("history") else None
    for i, turn in enumerate(history or []):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise RowError(f"history[{i}] must be a [user, assistant] pair of strings, got {turn!r}")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    prompt = "\n".join(p for p in (_text(row, columns.get("prompt")), _text(row, columns.get("query"))) if p)
    if not prompt.strip():
        raise RowError(
            f"the instruction ({columns.get('prompt')!r}) and input ({columns.get('query')!r}) are both empty"
        )
    response = _text(row, columns.get("response"))
    if not response.strip():
        raise RowError(
            f"the response ({columns.get('response')!r}) is empty; every sft example needs an answer"
        )
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return messages


def sharegpt_to_messages(row: dict[str, Any], columns: dict[str, str], tags: dict[str, str]) -> list[Message]:
    """Convert a sharegpt row (`conversations` of `{from, value}`) or OpenAI-style `messages` (`{role, content}`).

    Role names come from `tags` (user_tag, assistant_tag, ...); items with `role`/`content` keys are read
    as OpenAI messages whatever the tags say. The conversation must end with an assistant turn.
    """
    turns = row.get(columns.get("messages", "conversations"))
    if not isinstance(turns, list) or not turns:
        raise RowError(f"column {columns.get('messages')!r} must be a non-empty list of turns")
    role_map = {
        tags["user_tag"]: "user",
        tags["assistant_tag"]: "assistant",
        tags["system_tag"]: "system",
        tags["observation_tag"]: "tool",
        tags["function_tag"]: "assistant",
        "user": "user",
        "assistant": "assistant",
        "system": "system",
        "tool": "tool",
    }
    messages: list[Message] = []
    system = _text(row, columns.get("system"))
    if system:
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowError(f"turn {i} must be an object, got {turn!r}")
        role_key, content_key = tags["role_tag"], tags["content_tag"]
        if role_key not in turn and "role" in turn:
            role_key, content_key = "role", "content"
        raw_role, content = turn.get(role_key), turn.get(content_key)
        if raw_role not in role_map:
            raise RowError(
                f"turn {i} has role {raw_role!r}; expected one of {sorted(k for k in role_map if k)} "
                f"(set tags in dataset_info.json to map your role names)"
            )
        if not isinstance(content, str) or not content.strip():
            raise RowError(f"turn {i} ({raw_role}) has empty or non-string content")
        role = role_map[raw_role]
        if role == "system":
            if messages:
                raise RowError(f"turn {i}: a system message may only come first")
        elif messages and messages[-1]["role"] == role and role != "tool":
            raise RowError(f"turn {i}: two {role} turns in a row; turns must alternate user/assistant")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        raise RowError("the conversation must end with an assistant turn (the response to train on)")
    first = next(m for m in messages if m["role"] != "system")
    if first["role"] != "user":
        raise RowError("the first non-system turn must come from the user")
    return messages
