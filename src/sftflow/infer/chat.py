"""`sftflow chat`: talk to a tuned model in the terminal, answers streamed token by token.

A reasoning model's thought is shown apart from its answer (dimmed on a terminal, else after a
`Thinking: ` line) and kept out of the history, as its chat template drops earlier thoughts.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

from sftflow.infer.reasoning import ThoughtSplitter
from sftflow.infer.requests import RequestError, SamplingParams

if TYPE_CHECKING:  # (the engine imports torch and transformers; `sftflow chat --help` does not need them)
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
            messages, dropped = fit_history(engine, messages, engine.generating.max_new_tokens)
            prompt = engine.prompt(messages)
            stream, _ = engine.stream(messages, SamplingParams())
        except RequestError as exc:
            say(f"sftflow: {exc}\n")
            continue
        if dropped:
            say(f"(the conversation is too long for the context: dropped the {dropped} oldest messages)\n")
        say("Assistant: ")
        shown = ShownAnswer(ThoughtSplitter(engine.thinking, prompt), say, out.isatty())
        try:
            for piece in stream:
                shown.feed(piece)
        except KeyboardInterrupt:
            stream.close()
            shown.end()
            say(" [stopped]")
        else:
            shown.end()
        say("\n")
        history = [*messages[len(prefix) :], {"role": "assistant", "content": shown.splitter.content}]


DIM, RESET = "\x1b[2m", "\x1b[0m"


class ShownAnswer:
    """Writes a streamed answer: its thought apart (dimmed on a terminal, else after `Thinking: `,
    ended by a blank line), then the answer."""

    def __init__(self, splitter: ThoughtSplitter, say: Callable[[str], None], tty: bool) -> None:
        self.splitter, self.say, self.tty = splitter, say, tty
        self.in_thought = False

    def feed(self, piece: str) -> None:
        self._show(self.splitter.feed(piece))

    def end(self) -> None:
        self._show(self.splitter.finish())
        if self.in_thought:  # a thought cut off: no answer follows
            self.in_thought = False
            self.say(RESET if self.tty else "")

    def _show(self, parts: list[tuple[str, str]]) -> None:
        for kind, text in parts:
            if kind == "reasoning" and not self.in_thought:
                self.in_thought = True
                self.say(DIM if self.tty else "\nThinking: ")
            elif kind == "content":
                self._leave_thought()
            self.say(text)

    def _leave_thought(self) -> None:
        if self.in_thought:
            self.in_thought = False
            self.say(RESET + "\n\n" if self.tty else "\n\nAnswer: ")


def fit_history(
    engine: ChatEngine, messages: list[dict[str, str]], reserve: int
) -> tuple[list[dict[str, str]], int]:
    """Drop the oldest user/assistant pairs (never the system message or the last question) until
    the prompt leaves `reserve` tokens of context; returns the messages and how many were dropped."""
    dropped = 0
    while len(engine.encode(messages)) + reserve > engine.context_length:
        first = 1 if messages[0]["role"] == "system" else 0
        if len(messages) - first < 3:
            break  # only the question is left; max_new_tokens reports what does not fit
        messages = messages[:first] + messages[first + 2 :]
        dropped += 2
    return messages, dropped
