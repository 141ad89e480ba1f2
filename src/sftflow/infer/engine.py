"""The chat engine: a tuned model (base + adapter) and its tokenizer behind two generation paths.

- The **batch path** (servers): transformers' continuous batching. Concurrent requests share every forward
  pass; a paged KV cache sized from `serve_memory_fraction` of the machine's memory (never the library's
  default, which reserves most of the RAM) holds them. It carries greedy or sampled decoding with a
  per-request temperature / top_p, stop strings, and n (as n requests).
- The **exact path**: one `model.generate` at a time on a worker thread, with logits processors. It carries
  what the batch path cannot: grammar-constrained decoding (response_format, forced tool calls),
  logprobs / top_logprobs, echo (prompt logprobs), per-request seed, beam search.

`ChatEngine.path(params)` says which path a request takes. Both paths feed the same `_Job`, which decodes
tokens as they arrive, cuts at stop strings and streams text. At most `serve_max_queue` requests are
held (running + waiting); past that `submit`/`stream` raise `EngineBusy` (HTTP 429 in the API).
The prompt is rendered with the tokenizer saved by the run, i.e. the chat template used in training.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from sftflow.errors import SftflowError

if TYPE_CHECKING:
    from sftflow.config import GeneratingArguments, RunArgs

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
SERVING_ATTENTION = "sdpa"  # continuous batching refuses sftflow_sdpa; eager + concurrent forwards is wrong


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
    """Check a chat request's messages and return them as plain dicts (`role`, `content`, and for tool
    use `tool_calls` / `tool_call_id` / `name`).

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
        hold = max(
            (k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0
        )
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        return out, False

    def flush(self) -> str:
        """The held-back text once the stream has ended without a stop string."""
        out, self.pending = self.pending, ""
        return out


_END = object()  # the last event of a streamed job


class _Job:
    """One answer being generated: tokens come in (from either path), text goes out (streamed and/or as a
    Completion in `future`). It ends at a stop token, a stop string, the token budget, or a cancel."""

    def __init__(
        self,
        engine: ChatEngine,
        prompt_ids: list[int],
        params: SamplingParams,
        max_new_tokens: int,
        streaming: bool,
        seed: int | None,
    ) -> None:
        self.engine = engine
        self.prompt_ids = prompt_ids
        self.params = params
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.events: queue.Queue | None = queue.Queue() if streaming else None
        self.future: Future[Completion] = Future()
        self.cancelled = threading.Event()
        self.on_cancel: Any = None  # set by the path that runs the job
        self.answer: list[int] = []  # generated ids before the first stop token
        self.count = 0  # generated tokens counted (the stop token included)
        self.seen = 0  # generated tokens received so far (a path may report cumulative lists)
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
            self.seen += len(new_ids)
            for token in new_ids:
                self.count += 1
                if token in self.engine.stop_id_set:
                    self.ended_on_stop = True
                    break
                self.answer.append(token)
            full = self.engine.tokenizer.decode(self.answer, skip_special_tokens=True)
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
        if self.on_cancel is not None:
            self.on_cancel()
        self.finish()


class TextStream:
    """Iterate to receive an answer's text as it is generated; afterwards `finish_reason`,
    `completion_tokens` and `completion` are set. Closing it early (or breaking out) cancels the request."""

    def __init__(self, job: _Job) -> None:
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

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def empty(self) -> bool:
        return self.queue.empty()


class ChatEngine:
    """Generate chat answers from one loaded model; safe to call from many threads at once.

    With `batched=True` the batch path (continuous batching) serves every request it can carry; otherwise
    (chat in a terminal, the board) every request runs on the exact path.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        generating: GeneratingArguments,
        model_name: str = "sftflow",
        batched: bool = False,
    ) -> None:
        from sftflow.data.encode import stop_token_ids

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.generating = generating
        self.model_name = model_name
        self.stop_ids = sorted(stop_token_ids(tokenizer))
        self.stop_id_set = set(self.stop_ids)
        self.context_length = context_length(model, tokenizer)
        self.max_queue = generating.serve_max_queue
        self._held = 0
        self._held_lock = threading.Lock()
        self._exact: queue.Queue[_Job | None] = queue.Queue()
        self._worker = threading.Thread(target=self._serve_exact, name="sftflow-generate", daemon=True)
        self._worker.start()
        self._batch: _BatchPath | None = _BatchPath(self) if batched else None

    # -- prompts and settings -------------------------------------------------------------------

    def encode(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Validate messages and return the prompt ids (chat template + generation prompt); `tools` (OpenAI
        function definitions) are rendered by the chat template.

        Raises:
            RequestError: bad messages, or a conversation the chat template refuses.
        """
        from jinja2 import TemplateError

        messages = validate_messages(messages)
        kwargs = {"tools": tools} if tools else {}
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, **kwargs
            )
        except TemplateError as exc:
            raise RequestError(f"the chat template refused these messages: {exc}", "messages") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    def check_prompt_ids(self, ids: list[int], param: str = "prompt") -> list[int]:
        """Token ids sent as a prompt, checked against the vocabulary.

        Raises:
            RequestError: an empty prompt or an id outside the vocabulary.
        """
        vocab = self.model.get_input_embeddings().weight.shape[0]
        if not ids:
            raise RequestError(f"{param} is empty.", param)
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(
                f"{param} holds token id {bad}, outside this model's vocabulary of {vocab}.", param
            )
        return ids

    def max_new_tokens(self, prompt_tokens: int, requested: int | None) -> int:
        """Tokens the answer may use: the requested number, else the config's, capped to the context.

        Raises:
            RequestError: the prompt alone fills the context, or prompt + requested exceeds it.
        """
        room = self.context_length - prompt_tokens
        if room < 1:
            raise RequestError(
                f"the prompt has {prompt_tokens} tokens, which fills this model's context length of "
                f"{self.context_length} tokens; shorten the messages.",
                "messages",
            )
        if requested is not None and requested > room:
            raise RequestError(
                f"this model's context length is {self.context_length} tokens; the prompt has "
                f"{prompt_tokens} and max_tokens asks for {requested} more. Lower max_tokens to {room} or less.",
                "max_tokens",
            )
        return requested if requested is not None else min(self.generating.max_new_tokens, room)

    def sampling(self, params: SamplingParams) -> tuple[bool, float, float]:
        """(do_sample, temperature, top_p) of a request: the config's, overridden by the request."""
        g = self.generating
        do_sample = g.do_sample if params.temperature is None and params.top_p is None else True
        if params.temperature == 0:
            do_sample = False
        return (
            do_sample,
            params.temperature or g.temperature,
            params.top_p if params.top_p is not None else g.top_p,
        )

    def generation_config(self, params: SamplingParams, max_new_tokens: int, streaming: bool) -> Any:
        """The GenerationConfig of one exact-path request: config defaults, overridden by the request."""
        from transformers import GenerationConfig

        g = self.generating
        do_sample, temperature, top_p = self.sampling(params)
        exact_only = params.logprobs or params.grammar or params.echo
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "do_sample": do_sample,
            # streams (and scored or constrained answers) follow a single sequence: no beam search
            "num_beams": 1 if streaming or do_sample or exact_only else g.num_beams,
            "repetition_penalty": g.repetition_penalty,
            "eos_token_id": self.stop_ids,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=g.top_k)
        return GenerationConfig(**kwargs)

    def path(self, params: SamplingParams) -> Literal["batch", "exact"]:
        """Which path a request takes: the batch path unless it needs what only `generate` carries."""
        if self._batch is None or not self._batch.can_carry(params):
            return "exact"
        return "batch"

    def fit_history(self, messages: list[dict[str, str]], reserve: int) -> tuple[list[dict[str, str]], int]:
        """Drop the oldest user/assistant pairs (never the system message or the last question) until
        the prompt leaves `reserve` tokens of context; returns the messages and how many were dropped."""
        dropped = 0
        while len(self.encode(messages)) + reserve > self.context_length:
            first = 1 if messages[0]["role"] == "system" else 0
            if len(messages) - first < 3:
                break  # only the question is left; max_new_tokens reports what does not fit
            messages = messages[:first] + messages[first + 2 :]
            dropped += 2
        return messages, dropped

    # -- admission ------------------------------------------------------------------------------

    def _hold(self, count: int) -> None:
        with self._held_lock:
            if self._held + count > self.max_queue:
                raise EngineBusy(
                    f"the server holds {self._held} requests (serve_max_queue={self.max_queue}); retry shortly.",
                    retry_after=1,
                )
            self._held += count

    def _release(self, _: Any = None) -> None:
        with self._held_lock:
            self._held -= 1

    @property
    def held(self) -> int:
        """Requests (answers) running or waiting now."""
        return self._held

    # -- generation -----------------------------------------------------------------------------

    def generate(
        self,
        messages: list[dict[str, Any]],
        params: SamplingParams | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> ChatResult:
        """Answer a conversation (blocks until done; n answers in one request)."""
        return self.submit(messages, params, tools).result()

    def submit(
        self,
        messages: list[dict[str, Any]],
        params: SamplingParams | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> Future:
        """Queue a conversation; the Future resolves to a ChatResult (`cancel_generation()` on it stops
        the answers). Validates before queueing.

        Raises:
            RequestError: bad messages or a prompt that does not fit the context.
            EngineBusy: serve_max_queue requests are already held.
        """
        return self.submit_ids(self.encode(messages, tools), params)

    def submit_ids(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Future:
        """`submit` for a prompt given as token ids (the completions route)."""
        params = params or SamplingParams()
        budget = self.max_new_tokens(len(prompt_ids), params.max_new_tokens)
        do_sample = self.sampling(params)[0]
        # greedy answers are deterministic: generate once and repeat it n times
        copies = params.n if do_sample else 1
        jobs = self._start(prompt_ids, params, budget, copies, streaming=False)
        result: Future = Future()
        pending = [len(jobs)]
        lock = threading.Lock()

        def done(_: Future) -> None:
            with lock:
                pending[0] -= 1
                if pending[0]:
                    return
            errors = [j.future.exception() for j in jobs if j.future.exception() is not None]
            if errors:
                result.set_exception(errors[0])
                return
            choices = [j.future.result() for j in jobs]
            result.set_result(ChatResult(choices * (params.n // copies), len(prompt_ids)))

        for job in jobs:
            job.future.add_done_callback(done)
        result.cancel_generation = lambda: [job.cancel() for job in jobs]  # type: ignore[attr-defined]
        return result

    def stream(
        self,
        messages: list[dict[str, Any]],
        params: SamplingParams | None = None,
        index: int = 0,
        tools: list[dict[str, Any]] | None = None,
    ) -> tuple[TextStream, int]:
        """Queue one streamed answer; returns the stream and the prompt's token count.

        `index` offsets the seed so that the n streamed answers of one request differ when sampling.

        Raises:
            RequestError: bad messages or a prompt that does not fit the context.
            EngineBusy: serve_max_queue requests are already held.
        """
        return self.stream_ids(self.encode(messages, tools), params, index)

    def stream_ids(
        self, prompt_ids: list[int], params: SamplingParams | None = None, index: int = 0
    ) -> tuple[TextStream, int]:
        """`stream` for a prompt given as token ids."""
        params = params or SamplingParams()
        budget = self.max_new_tokens(len(prompt_ids), params.max_new_tokens)
        (job,) = self._start(prompt_ids, params, budget, 1, streaming=True, index=index)
        return TextStream(job), len(prompt_ids)

    def _start(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        budget: int,
        copies: int,
        streaming: bool,
        index: int = 0,
    ) -> list[_Job]:
        self._hold(copies)
        jobs = []
        for i in range(copies):
            seed = None if params.seed is None else params.seed + index + i
            job = _Job(self, prompt_ids, params, budget, streaming, seed)
            job.future.add_done_callback(self._release)
            jobs.append(job)
        try:
            if self.path(params) == "batch":
                assert self._batch is not None
                for job in jobs:
                    self._batch.add(job)
            else:
                for job in jobs:
                    self._exact.put(job)
        except BaseException as exc:
            for job in jobs:
                job.fail(exc)
            raise
        return jobs

    def close(self) -> None:
        """Finish the queued jobs and stop the workers."""
        if self._batch is not None:
            self._batch.close()
        self._exact.put(None)
        self._worker.join()

    # -- the exact path -------------------------------------------------------------------------

    def _serve_exact(self) -> None:
        while (job := self._exact.get()) is not None:
            if job.done:
                continue  # cancelled while waiting
            try:
                self._run_exact(job)
            except BaseException as exc:
                logger.exception("generation failed")
                job.fail(exc)

    def _run_exact(self, job: _Job) -> None:
        import torch
        from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        params = job.params
        config = self.generation_config(params, job.max_new_tokens, job.events is not None)
        top = max(params.top_logprobs, 1) if params.logprobs else 0
        recorder = _Recorder(top)
        processors: list[Any] = [recorder] if top else []
        if params.grammar is not None:
            from sftflow.infer.constrain import GrammarProcessor

            processors.append(GrammarProcessor(self.tokenizer, params.grammar, self.stop_ids))

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                return torch.full((input_ids.shape[0],), job.cancelled.is_set(), device=input_ids.device)

        engine = self

        class Feed(BaseStreamer):
            def __init__(self) -> None:
                self.prompt_seen = False

            def put(self, value: torch.Tensor) -> None:
                if not self.prompt_seen:
                    self.prompt_seen = True
                    return
                ids = value.reshape(-1).tolist()
                for token in ids:
                    if top and recorder.steps:
                        job.logprobs.append(engine._token_logprob(token, recorder.steps[len(job.logprobs)]))
                if job.feed(ids):
                    job.cancelled.set()

            def end(self) -> None:
                pass

        if job.seed is not None:
            torch.manual_seed(job.seed)
        input_ids = torch.tensor([job.prompt_ids], device=self.model.device)
        with torch.inference_mode():
            prompt_logprobs = self._prompt_logprobs(input_ids, params.top_logprobs) if params.echo else None
            if job.max_new_tokens > 0:
                self.model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    generation_config=config,
                    logits_processor=LogitsProcessorList(processors),
                    stopping_criteria=StoppingCriteriaList([Cancelled()]),
                    streamer=Feed(),
                )
        job.finish(prompt_logprobs)

    def _token_logprob(self, token: int, step: tuple[Any, Any, Any]) -> TokenLogprob:
        logprobs, top_ids, top_values = step
        top = [
            (i, self.tokenizer.decode([i]), v)
            for i, v in zip(top_ids.tolist(), top_values.tolist(), strict=True)
        ]
        return TokenLogprob(token, self.tokenizer.decode([token]), float(logprobs[token]), top)

    def _prompt_logprobs(self, input_ids: Any, top: int) -> list[TokenLogprob | None]:
        """Each prompt token's log-probability given the tokens before it (None for the first)."""
        import torch

        logits = self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits[0, :-1]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        k = max(top, 1)
        values, ids = logprobs.topk(k, dim=-1)
        out: list[TokenLogprob | None] = [None]
        for pos, token in enumerate(input_ids[0, 1:].tolist()):
            out.append(self._token_logprob(token, (logprobs[pos], ids[pos, :top], values[pos, :top])))
        return out


class _Recorder:
    """A logits processor that keeps each step's log-softmax (after repetition penalty, before sampling
    warpers and grammar masks) and its top-k, to report logprobs of the tokens `generate` picks."""

    def __init__(self, top: int) -> None:
        self.top = top
        self.steps: list[tuple[Any, Any, Any]] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        logprobs = torch.log_softmax(scores[0].float(), dim=-1)
        values, ids = logprobs.topk(self.top)
        self.steps.append((logprobs, ids, values))
        return scores


class _BatchPath:
    """Continuous batching: a transformers ContinuousBatchingManager fed by jobs, and a dispatcher thread
    that routes each request's tokens to its job (and drops a cancelled request's late tokens)."""

    def __init__(self, engine: ChatEngine) -> None:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        self.engine = engine
        g = engine.generating
        model = engine.model
        if model.config._attn_implementation != SERVING_ATTENTION:
            model.set_attn_implementation(SERVING_ATTENTION)
        vocab = model.get_input_embeddings().weight.shape[0]
        # do_sample for every request: a greedy request asks for top_k=1 (argmax), a sampled one for its
        # temperature / top_p; the manager creates a per-request processor only for keys set here.
        config = GenerationConfig(
            do_sample=True,
            temperature=g.temperature if g.temperature != 1.0 else 0.999999,
            top_p=g.top_p,
            top_k=g.top_k if g.top_k > 0 else vocab,
            repetition_penalty=g.repetition_penalty,
            max_new_tokens=g.max_new_tokens,
            eos_token_id=engine.stop_ids,
            pad_token_id=engine.tokenizer.pad_token_id,
        )
        sizes = cache_sizes(model, g, engine.context_length)
        self.sizes = sizes
        cb = ContinuousBatchingConfig(
            page_size=sizes["page_size"],
            num_blocks=sizes["num_blocks"],
            max_batch_tokens=sizes["max_batch_tokens"],
            max_requests_per_batch=sizes["max_requests_per_batch"],
            per_request_processors=True,
            auto_switch_to_flash=False,
            allow_block_sharing=False,
        )
        self.manager = model.init_continuous_batching(generation_config=config, continuous_batching_config=cb)
        self.keys = set(self.manager.logit_processor.supported_keys)
        self.jobs: dict[str, _Job] = {}
        self.lock = threading.Lock()
        self.counter = 0
        self.running = True
        self.manager.start()
        self.thread = threading.Thread(target=self._dispatch, name="sftflow-batch", daemon=True)
        self.thread.start()
        logger.info(
            "continuous batching: %d KV blocks of %d tokens (%.0f MB), %d tokens per forward pass",
            sizes["num_blocks"],
            sizes["page_size"],
            sizes["cache_bytes"] / 2**20,
            sizes["max_batch_tokens"],
        )

    def can_carry(self, params: SamplingParams) -> bool:
        """False for what the manager cannot do per request (see the module docstring)."""
        g = self.engine.generating
        if params.logprobs or params.top_logprobs or params.grammar or params.echo or params.seed is not None:
            return False
        if g.repetition_penalty != 1.0:  # the manager would drop it silently
            return False
        do_sample, temperature, top_p = self.engine.sampling(params)
        if not do_sample:
            return "top_k" in self.keys and g.num_beams == 1
        needed = {"temperature"} | ({"top_p"} if top_p < 1 else set())
        return needed <= self.keys

    def add(self, job: _Job) -> None:
        g = self.engine.generating
        do_sample, temperature, top_p = self.engine.sampling(job.params)
        kwargs: dict[str, Any] = {"top_k": 1} if not do_sample else {"temperature": temperature}
        if do_sample and "top_p" in self.keys:
            kwargs["top_p"] = top_p
        if do_sample and "top_k" in self.keys:
            kwargs["top_k"] = (
                g.top_k if g.top_k > 0 else self.manager.model.get_input_embeddings().num_embeddings
            )
        with self.lock:
            self.counter += 1
            request_id = f"sftflow-{self.counter}"
            self.jobs[request_id] = job

        def cancel() -> None:
            with self.lock:
                self.jobs.pop(request_id, None)  # late tokens of this request are dropped
            self.manager.cancel_request(request_id)

        job.on_cancel = cancel
        # token by token only when someone reads them (a stream) or stop strings must be watched for;
        # otherwise the manager sends the finished answer once (less work per step)
        streaming = job.events is not None or bool(job.params.stop)
        added = self.manager.add_request(
            job.prompt_ids,
            request_id=request_id,
            max_new_tokens=job.max_new_tokens,
            streaming=streaming,
            eos_token_id=self.engine.stop_ids,
            **kwargs,
        )
        if added is None:
            with self.lock:
                self.jobs.pop(request_id, None)
            raise SftflowError("the batch engine is not accepting requests (it is stopping).")

    def _dispatch(self) -> None:
        while self.running:
            output = self.manager.get_result(timeout=0.05)
            if output is None:
                continue
            with self.lock:
                job = self.jobs.get(output.request_id)
            if job is None:
                continue  # cancelled: its late outputs go nowhere
            finished = output.is_finished()
            if output.error is not None:
                self._forget(output.request_id)
                job.fail(SftflowError(f"generation failed: {output.error}"))
                continue
            stop = job.feed(list(output.generated_tokens[job.seen :]))
            if stop and not finished:
                self._forget(output.request_id)
                self.manager.cancel_request(output.request_id)
                job.finish()
            elif finished:
                self._forget(output.request_id)
                job.finish()

    def _forget(self, request_id: str) -> None:
        with self.lock:
            self.jobs.pop(request_id, None)

    @property
    def pending(self) -> int:
        """Requests whose tokens are still being routed (0 once every job finished or was cancelled)."""
        with self.lock:
            return len(self.jobs)

    def close(self) -> None:
        with self.lock:
            jobs = list(self.jobs.values())
        for job in jobs:
            job.cancel()
        self.manager.stop(block=True, timeout=10)
        self.running = False
        self.thread.join(timeout=5)


def cache_sizes(model: Any, generating: GeneratingArguments, context: int) -> dict[str, int]:
    """The paged KV cache of the batch path: `serve_memory_fraction` of the free memory (GPU memory on
    CUDA, available RAM on CPU), never more than `serve_max_queue` full-context requests need.

    Returns:
        page_size, num_blocks, max_batch_tokens, max_requests_per_batch and cache_bytes.
    """
    import psutil
    import torch

    config = model.config.get_text_config()
    layers = config.num_hidden_layers
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    page_size = 64
    itemsize = torch.tensor([], dtype=model.dtype).element_size()
    block_bytes = 2 * layers * heads * head_dim * page_size * itemsize  # keys and values, every layer
    if model.device.type == "cuda":
        free = torch.cuda.mem_get_info(model.device)[0]
    else:
        free = psutil.virtual_memory().available
    budget = int(free * generating.serve_memory_fraction)
    blocks_per_request = math.ceil(context / page_size)
    wanted = generating.serve_max_queue * blocks_per_request
    num_blocks = max(min(budget // block_bytes, wanted), blocks_per_request)
    return {
        "page_size": page_size,
        "num_blocks": int(num_blocks),
        "max_batch_tokens": generating.serve_max_batch_tokens,
        "max_requests_per_batch": min(generating.serve_max_queue, generating.serve_max_batch_tokens),
        "cache_bytes": int(num_blocks * block_bytes),
    }


def context_length(model: Any, tokenizer: Any) -> int:
    """The model's context window: max_position_embeddings, else the tokenizer's model_max_length."""
    value = getattr(model.config, "max_position_embeddings", None)
    if not value:
        value = getattr(tokenizer, "model_max_length", None)
    if not value or value > 10**7:  # tokenizers without a limit report a huge sentinel
        raise SftflowError("cannot tell this model's context length (no max_position_embeddings in config).")
    return int(value)


# -- loading ------------------------------------------------------------------------------------


def load_engine(args: RunArgs, batched: bool = False) -> ChatEngine:
    """Load the model and tokenizer `args` describe and start a ChatEngine on them (`batched`: with the
    continuous-batching path, for servers)."""
    from sftflow.model.inference import load_for_inference

    model, tokenizer = load_for_inference(args)
    if model.config._attn_implementation != SERVING_ATTENTION:
        model.set_attn_implementation(SERVING_ATTENTION)
    name = args.model.adapter_name_or_path or args.model.model_name_or_path
    return ChatEngine(model, tokenizer, args.generating, model_name=str(name), batched=batched)
