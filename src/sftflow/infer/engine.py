"""The chat engine: a tuned model (base + adapter) and its tokenizer behind one generation worker.

Every generation, plain or streamed, runs on a single worker thread that takes jobs from a FIFO queue,
so concurrent callers (API requests) are served one after another and never share a `generate` call.
The prompt is rendered with the tokenizer saved by the run, i.e. the chat template used in training.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from sftflow.errors import SftflowError

if TYPE_CHECKING:
    from sftflow.config import GeneratingArguments, RunArgs

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")


class RequestError(SftflowError):
    """A bad generation request (messages, sampling values, length); `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    """Decoding settings of one request; None means the config's GeneratingArguments value."""

    max_new_tokens: int | None = None
    temperature: float | None = None  # 0 = greedy; > 0 samples at that temperature
    top_p: float | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Completion:
    """One generated answer."""

    text: str
    finish_reason: Literal["stop", "length"]
    completion_tokens: int


@dataclass
class ChatResult:
    """The answers to one request and the prompt size (for usage counts)."""

    choices: list[Completion]
    prompt_tokens: int


@dataclass
class _Job:
    prompt_ids: list[int]
    config: Any  # transformers.GenerationConfig
    n: int
    stop: list[str]
    seed: int | None
    streamer: Any = None
    cancel: threading.Event = field(default_factory=threading.Event)
    future: Future = field(default_factory=Future)


def validate_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Check a chat request's messages and return them as plain `{role, content}` dicts.

    Raises:
        RequestError: no messages, an unknown role, an empty question, a misplaced system message, or a
            conversation that does not end with a user message.

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
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string.", f"messages.{i}.content")
        if role == "user" and not content.strip():  # an earlier answer may be blank; a question may not
            raise RequestError(f"messages[{i}].content is empty.", f"messages.{i}.content")
        if role == "system" and i > 0:
            raise RequestError(f"messages[{i}]: a system message may only come first.", f"messages.{i}.role")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        raise RequestError("the last message must come from the user.", f"messages.{len(out) - 1}.role")
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


class TextStream:
    """Iterate to receive an answer's text as it is generated; afterwards `finish_reason` and
    `completion_tokens` are set. Closing it early (or breaking out) stops the generation."""

    def __init__(self, job: _Job) -> None:
        self._job = job
        self.finish_reason: Literal["stop", "length"] | None = None
        self.completion_tokens = 0

    def __iter__(self) -> Iterator[str]:
        buffer, hit = StopBuffer(self._job.stop), False
        try:
            for piece in self._job.streamer:
                text, hit = buffer.feed(piece)
                if text:
                    yield text
                if hit:
                    self._job.cancel.set()  # generate already stops on stop strings; this makes it sure
                    break
            if not hit and (tail := buffer.flush()):
                yield tail
            completion = self._job.future.result()[0]  # raises what generation raised
        finally:
            self._job.cancel.set()
        self.completion_tokens = completion.completion_tokens
        self.finish_reason = "stop" if hit else completion.finish_reason

    def close(self) -> None:
        """Stop the generation (the worker moves on to the next job after the current token)."""
        self._job.cancel.set()


class ChatEngine:
    """Generate chat answers from one loaded model; safe to call from many threads at once."""

    def __init__(
        self, model: Any, tokenizer: Any, generating: GeneratingArguments, model_name: str = "sftflow"
    ) -> None:
        from sftflow.data.encode import stop_token_ids

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.generating = generating
        self.model_name = model_name
        self.stop_ids = sorted(stop_token_ids(tokenizer))
        self.context_length = context_length(model, tokenizer)
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._worker = threading.Thread(target=self._serve, name="sftflow-generate", daemon=True)
        self._worker.start()

    # -- prompts and settings -------------------------------------------------------------------

    def encode(self, messages: list[dict[str, Any]]) -> list[int]:
        """Validate messages and return the prompt ids (chat template + generation prompt).

        Raises:
            RequestError: bad messages, or a conversation the chat template refuses.
        """
        from jinja2 import TemplateError

        from sftflow.data.template import render

        messages = validate_messages(messages)
        try:
            text = render(self.tokenizer, messages, add_generation_prompt=True)
        except TemplateError as exc:
            raise RequestError(f"the chat template refused these messages: {exc}", "messages") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

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

    def generation_config(self, params: SamplingParams, max_new_tokens: int, streaming: bool) -> Any:
        """The GenerationConfig of one request: config defaults, overridden by the request."""
        from transformers import GenerationConfig

        g = self.generating
        do_sample = g.do_sample if params.temperature is None and params.top_p is None else True
        if params.temperature == 0:
            do_sample = False
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "do_sample": do_sample,
            # TextIteratorStreamer follows a single sequence, so streams never use beam search
            "num_beams": 1 if streaming or do_sample else g.num_beams,
            "repetition_penalty": g.repetition_penalty,
            "eos_token_id": self.stop_ids,
            "pad_token_id": self.tokenizer.pad_token_id,
            "stop_strings": params.stop or None,
        }
        if do_sample:
            kwargs.update(
                temperature=params.temperature or g.temperature,
                top_p=params.top_p if params.top_p is not None else g.top_p,
                top_k=g.top_k,
            )
        return GenerationConfig(**kwargs)

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

    # -- generation -----------------------------------------------------------------------------

    def generate(self, messages: list[dict[str, Any]], params: SamplingParams | None = None) -> ChatResult:
        """Answer a conversation (blocks until done; n answers in one request)."""
        return self.submit(messages, params).result()

    def submit(self, messages: list[dict[str, Any]], params: SamplingParams | None = None) -> Future:
        """Queue a conversation; the Future resolves to a ChatResult. Validates before queueing.

        Raises:
            RequestError: bad messages or a prompt that does not fit the context.
        """
        params = params or SamplingParams()
        prompt_ids = self.encode(messages)
        budget = self.max_new_tokens(len(prompt_ids), params.max_new_tokens)
        job = _Job(
            prompt_ids, self.generation_config(params, budget, False), params.n, params.stop, params.seed
        )
        self._jobs.put(job)
        result: Future = Future()

        def done(f: Future) -> None:
            if f.exception() is not None:
                result.set_exception(f.exception())
            else:
                result.set_result(ChatResult(f.result(), len(prompt_ids)))

        job.future.add_done_callback(done)
        return result

    def stream(
        self, messages: list[dict[str, Any]], params: SamplingParams | None = None, index: int = 0
    ) -> tuple[TextStream, int]:
        """Queue one streamed answer; returns the stream and the prompt's token count.

        `index` offsets the seed so that the n streamed answers of one request differ when sampling.

        Raises:
            RequestError: bad messages or a prompt that does not fit the context.
        """
        from transformers import TextIteratorStreamer

        params = params or SamplingParams()
        prompt_ids = self.encode(messages)
        budget = self.max_new_tokens(len(prompt_ids), params.max_new_tokens)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        seed = None if params.seed is None else params.seed + index
        job = _Job(prompt_ids, self.generation_config(params, budget, True), 1, params.stop, seed, streamer)
        self._jobs.put(job)
        return TextStream(job), len(prompt_ids)

    def close(self) -> None:
        """Finish the queued jobs and stop the worker."""
        self._jobs.put(None)
        self._worker.join()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job.future.set_result(self._run(job))
            except BaseException as exc:
                logger.exception("generation failed")
                job.future.set_exception(exc)
                if job.streamer is not None:
                    job.streamer.end()  # unblock the reader; it then re-raises from the future

    def _run(self, job: _Job) -> list[Completion]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        cancel = job.cancel

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                return torch.full((input_ids.shape[0],), cancel.is_set(), device=input_ids.device)

        config = job.config
        # Greedy and beam search are deterministic: generate once and repeat the answer n times.
        copies = job.n if config.do_sample else 1
        config.num_return_sequences = copies
        if job.seed is not None:
            torch.manual_seed(job.seed)
        input_ids = torch.tensor([job.prompt_ids], device=self.model.device)
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=config,
                stopping_criteria=StoppingCriteriaList([Cancelled()]),
                streamer=job.streamer,
                tokenizer=self.tokenizer if config.stop_strings else None,
            )
        new_tokens = output[:, input_ids.shape[1] :].tolist()
        completions = [self._completion(row, config.max_new_tokens, job.stop) for row in new_tokens]
        return completions * (job.n // copies)

    def _completion(self, ids: list[int], max_new_tokens: int, stops: list[str]) -> Completion:
        """Decode generated ids up to the first stop token (counted) and cut at the first stop string."""
        stop_at = next((i for i, t in enumerate(ids) if t in self.stop_ids), None)
        if stop_at is not None:
            answer, count = ids[:stop_at], stop_at + 1
        else:
            # sequences of a batch that ended on a stop string are padded to the longest one
            answer = list(ids)
            while answer and answer[-1] == self.tokenizer.pad_token_id:
                answer.pop()
            count = len(answer)
        text, hit = cut_at_stop(self.tokenizer.decode(answer, skip_special_tokens=True), stops)
        ended = hit or stop_at is not None or count < max_new_tokens
        return Completion(text, "stop" if ended else "length", count)


def context_length(model: Any, tokenizer: Any) -> int:
    """The model's context window: max_position_embeddings, else the tokenizer's model_max_length."""
    value = getattr(model.config, "max_position_embeddings", None)
    if not value:
        value = getattr(tokenizer, "model_max_length", None)
    if not value or value > 10**7:  # tokenizers without a limit report a huge sentinel
        raise SftflowError("cannot tell this model's context length (no max_position_embeddings in config).")
    return int(value)


# -- loading ------------------------------------------------------------------------------------


def load_engine(args: RunArgs) -> ChatEngine:
    """Load the model and tokenizer `args` describe and start a ChatEngine on them."""
    from sftflow.model.inference import load_for_inference

    model, tokenizer = load_for_inference(args)
    name = args.model.adapter_name_or_path or args.model.model_name_or_path
    return ChatEngine(model, tokenizer, args.generating, model_name=str(name))
