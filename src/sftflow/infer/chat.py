"""`sftflow chat`: talk to a tuned model in the terminal, answers streamed token by token."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from sftflow.infer.engine import ChatEngine

HELP = "Commands: /clear starts a new conversation, /exit quits (or Ctrl-D)."


def run_chat(
    engine: ChatEngine,
    read: Callable[[str], str] | None = None,
    out: TextIO | None = None,
    system: str | None = None,
) -> list[dict[str, str]]:
    """The chat loop: read a question, stream the answer, keep the history; returns the last history.

    `read` (default: `input`) gets the prompt to show and returns the user's line; answers go to `out`.

    `/clear` empties the history, `/exit` (or end of input) quits, Ctrl-C during an answer stops it.
    Old turns are dropped (and said so) when the conversation no longer fits the context.
    """
    from sftflow.infer.engine import RequestError, SamplingParams

    read, out = read or input, out or sys.stdout

    def say(text: str) -> None:
        out.write(text)
        out.flush()

    say(f"Chatting with {engine.model_name}. {HELP}\n")
    prefix = [{"role": "system", "content": system}] if system else []
    history: list[dict[str, str]] = []
    while True:
        try:
            query = read("\nUser: ")
        except (EOFError, KeyboardInterrupt):
            say("\n")
            return history
        command = query.strip()
        if command == "/exit":
            return history
        if command == "/clear":
            history = []
            say("History cleared.\n")
            continue
        if not command:
            continue
        messages = [*prefix, *history, {"role": "user", "content": query}]
        try:
            messages, dropped = engine.fit_history(messages, engine.generating.max_new_tokens)
            stream, _ = engine.stream(messages, SamplingParams())
        except RequestError as exc:
            say(f"sftflow: {exc}\n")
            continue
        if dropped:
            say(f"(the conversation is too long for the context: dropped the {dropped} oldest messages)\n")
        say("Assistant: ")
        answer = []
        try:
            for piece in stream:
                answer.append(piece)
                say(piece)
        except KeyboardInterrupt:
            stream.close()
            say(" [stopped]")
        say("\n")
        history = [*messages[len(prefix) :], {"role": "assistant", "content": "".join(answer)}]
