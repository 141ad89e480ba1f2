"""A generation request's parts: its settings (SamplingParams), its answers (Completion, TokenLogprob,
ChatResult), the errors a request can meet (RequestError, EngineBusy), message checks and stop strings,
and `Job`: one answer being generated, fed tokens by either path, streaming text to a `TextStream`.
Every name here is imported from here (engine.py does not re-export them).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Collection, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from sftflow.errors import SftflowError

if TYPE_CHECKING:  # (transformers is heavy; this module is imported by the API's light modules)
    from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant", "tool")


class RequestError(SftflowError):
    """A bad generation request (messages, sampling values, length); `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class EngineBusy(SftflowError):
    """The engine already holds `serve_max_queue` requests; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class SamplingParams:
    """Decoding settings of one request; None means the config's GeneratingArguments value."""

    max_new_tokens: int | None = None
    temperature: float | None = None  # 0 = greedy; > 0 samples at that temperature
    top_p: float | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: bool = False  # the log-probability of each generated token
    top_logprobs: int = 0  # and of the k likeliest tokens at each position
    grammar: str | None = None  # an llguidance grammar (see infer/constrain.py) the answer must match
    echo: bool = False  # also score the prompt (prompt_logprobs on the completion)


@dataclass
class TokenLogprob:
    """One position's token, its log-probability under the model, and the likeliest alternatives."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class Completion:
    """One generated answer."""

    text: str
    finish_reason: Literal["stop", "length"]
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with echo: None for the first token


@dataclass
class ChatResult:
    """The answers to one request and the prompt size (for usage counts)."""

    choices: list[Completion]
    prompt_tokens: int


def validate_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Check a chat request's messages and return them as plain dicts (`role`, `content`, for tool use
    `tool_calls` / `tool_call_id` / `name`, and an assistant's `reasoning_content`).

    Raises:
        RequestError: no messages, an unknown role, an empty question, a misplaced system message, or a
            conversation that ends with an assistant message.

    >>> validate_messages([{"role": "user", "content": "Hi"}])
    [{'role': 'user', 'content': 'Hi'}]
    """
    if not messages:
        raise RequestError("messages is empty; send at least one user message.", "messages")
    out = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RequestError(
                f"messages[{i}].role is {role!r}; expected one of {', '.join(ROLES)}.", f"messages.{i}.role"
            )
        calls = message.get("tool_calls") if role == "assistant" else None
        if content is None and calls:
            content = ""
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string.", f"messages.{i}.content")
        if role == "user" and not content.strip():  # an earlier answer may be blank; a question may not
            raise RequestError(f"messages[{i}].content is empty.", f"messages.{i}.content")
        if role == "system" and i > 0:
            raise RequestError(f"messages[{i}]: a system message may only come first.", f"messages.{i}.role")
        item: dict[str, Any] = {"role": role, "content": content}
        if calls:
            item["tool_calls"] = calls
        thought = message.get("reasoning_content") if role == "assistant" else None
        if thought is not None:  # an earlier answer's thought, sent back (issue #24)
            if not isinstance(thought, str):
                raise RequestError(
                    f"messages[{i}].reasoning_content must be a string.", f"messages.{i}.reasoning_content"
                )
            item["reasoning_content"] = thought
        for key in ("tool_call_id", "name"):
            if role == "tool" and message.get(key) is not None:
                item[key] = message[key]
        out.append(item)
    if out[-1]["role"] not in ("user", "tool"):
        raise RequestError(
            "the last message must come from the user (or be a tool result).", f"messages.{len(out) - 1}.role"
        )
    return out


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text before the earliest stop string, and whether one was found.

    >>> cut_at_stop("one. two. three", [". t", "e"])
    ('on', True)
    """
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


class StopBuffer:
    """Streams text while holding back any tail that could be the start of a stop string.

    >>> buffer = StopBuffer(["###"])
    >>> buffer.feed("Hello #"), buffer.feed("# and"), buffer.feed(" ###x")
    (('Hello ', False), ('## and', False), (' ', True))
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add streamed text; return what is safe to emit and whether a stop string was reached."""
        self.pending += piece
        text, hit = cut_at_stop(self.pending, self.stops)
        if hit:
            self.pending = ""
            return text, True
        # the longest tail of pending that starts a stop string (a tail is never longer than pending)
        most = len(self.pending) + 1
        hold = max(
            (k for s in self.stops for k in range(1, min(len(s), most)) if self.pending.endswith(s[:k])),
            default=0,
        )
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        return out, False

    def flush(self) -> str:
        """The held-back text once the stream has ended without a stop string."""
        out, self.pending = self.pending, ""
        return out


_END = object()  # the last event of a streamed job


class Job:
    """One answer being generated: tokens come in (from either path), text goes out (streamed and/or as a
    Completion in `future`). It ends at a stop token (one of `stop_ids`), a stop string, the token
    budget, or a cancel; `tokenizer` decodes its tokens."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        stop_ids: Collection[int],
        prompt_ids: list[int],
        params: SamplingParams,
        max_new_tokens: int,
        streaming: bool,
        seed: int | None,
    ) -> None:
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.prompt_ids = prompt_ids
        self.params = params
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.events: queue.Queue | None = queue.Queue() if streaming else None
        self.future: Future[Completion] = Future()
        self.cancelled = threading.Event()
        self.answer: list[int] = []  # generated ids before the first stop token
        self.count = 0  # generated tokens counted (the stop token included)
        self.ended_on_stop = False
        self.decoded = ""  # the decoded answer so far, up to what is safe to emit
        self.buffer = StopBuffer(params.stop)
        self.text: list[str] = []
        self.logprobs: list[TokenLogprob] = []
        self._lock = threading.Lock()

    @property
    def done(self) -> bool:
        return self.future.done()

    def feed(self, new_ids: list[int]) -> bool:
        """Take newly generated ids; return True once the job should stop (stop token or stop string)."""
        with self._lock:
            if self.done or self.ended_on_stop:
                return True
            for token in new_ids:
                self.count += 1
                if token in self.stop_ids:
                    self.ended_on_stop = True
                    break
                self.answer.append(token)
            full = self.tokenizer.decode(self.answer, skip_special_tokens=True)
            if full.endswith("\ufffd") and not self.ended_on_stop:
                return False  # a multi-byte character is not complete yet
            piece = full[len(self.decoded) :] if full.startswith(self.decoded) else ""
            self.decoded = full
            text, hit = self.buffer.feed(piece)
            self._emit(text)
            if hit:
                self.ended_on_stop = True
            return self.ended_on_stop

    def _emit(self, text: str) -> None:
        if text:
            self.text.append(text)
            if self.events is not None:
                self.events.put(text)

    def finish(self, prompt_logprobs: list[TokenLogprob | None] | None = None) -> None:
        """Resolve the job with what it generated (idempotent)."""
        with self._lock:
            if self.done:
                return
            if not self.ended_on_stop:
                # text held back for an incomplete character ends the answer as decode gives it
                full = self.tokenizer.decode(self.answer, skip_special_tokens=True)
                tail = full[len(self.decoded) :] if full.startswith(self.decoded) else ""
                text, hit = self.buffer.feed(tail)
                self._emit(text)
                self.ended_on_stop = hit
                if not hit:
                    self._emit(self.buffer.flush())
            stopped = self.ended_on_stop or self.count < self.max_new_tokens
            logprobs = self.logprobs[: self.count] if self.params.logprobs else None
            completion = Completion(
                "".join(self.text),
                "stop" if stopped else "length",
                self.count,
                list(self.answer),
                logprobs,
                prompt_logprobs,
            )
            self.future.set_result(completion)
            if self.events is not None:
                self.events.put(_END)

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.done:
                return
            self.future.set_exception(exc)
            if self.events is not None:
                self.events.put(_END)

    def cancel(self) -> None:
        """Stop generating for this job (the client went away or the stream was closed)."""
        if self.done:
            return
        self.cancelled.set()
        self.finish()


class TextStream:
    """Iterate to receive an answer's text as it is generated; afterwards `finish_reason`,
    `completion_tokens` and `completion` are set. Closing it early (or breaking out) cancels the request."""

    def __init__(self, job: Job) -> None:
        self._job = job
        self.finish_reason: Literal["stop", "length"] | None = None
        self.completion_tokens = 0
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        assert self._job.events is not None
        try:
            while (item := self._job.events.get()) is not _END:
                yield item
            completion = self._job.future.result()  # raises what generation raised
        finally:
            self._job.cancel()  # a no-op once finished
        self.completion = completion
        self.completion_tokens = completion.completion_tokens
        self.finish_reason = completion.finish_reason

    def __aiter__(self) -> AsyncIterator[str]:
        """Async iteration for servers: events reach the event loop without a thread per stream."""
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[str]:
        bridge = _LoopQueue(asyncio.get_running_loop())
        job = self._job
        with job._lock:  # hand over what was already emitted, then route new events to the loop
            while job.events is not None and not job.events.empty():
                bridge.queue.put_nowait(job.events.get_nowait())
            job.events = bridge  # type: ignore[assignment]
        try:
            while (item := await bridge.queue.get()) is not _END:
                yield item
            completion = job.future.result()
        finally:
            job.cancel()  # a no-op once finished; cancels on client disconnect (CancelledError)
        self.completion = completion
        self.completion_tokens = completion.completion_tokens
        self.finish_reason = completion.finish_reason

    def close(self) -> None:
        """Cancel the generation (both paths stop after the current step)."""
        self._job.cancel()


class _LoopQueue:
    """A job's event sink that delivers into an asyncio queue from any thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item: object) -> None:
        # a closed loop (shutdown) has no reader left: the other rows of a batch must not fail with it
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def empty(self) -> bool:
        return self.queue.empty()
