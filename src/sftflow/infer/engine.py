"""The chat engine: a tuned model (base + adapter) and its tokenizer behind its generation paths.

How infer/ is put together, from the request down:
- `ChatEngine` (here) admits requests (at most `serve_max_queue` held; past that EngineBusy, HTTP 429 in
  the API), queues them and runs one worker thread that hands each to a path. It is the only module that
  sees the queue and the threads.
- `Generator` (infer/core.py) is what the paths get instead of the engine: the model, tokenizer,
  generating args, stop ids and context length; `sampling` and `generation_config` there turn a
  request's SamplingParams into decoding settings.
- The **batch path** (servers; infer/dynamic.py): concurrent requests share forward passes. Requests join
  the running batch and leave it at every decode step (one left-padded KV cache; a joiner's prompt is
  read alone, nobody re-reads), each row streamed and resolved on its own. It carries greedy or sampled
  decoding with a per-request temperature / top_p, stop strings, and n (as n requests). Its KV-cache
  work (sizes, and the row and column changes to transformers' DynamicCache) is in infer/kv.py.
- The **exact path** (infer/exact.py): one `model.generate` per request, with logits processors. It carries
  what the batch path cannot: grammar-constrained decoding (response_format, forced tool calls),
  logprobs / top_logprobs, echo (prompt logprobs), per-request seed, beam search.
- `Job` (infer/requests.py, with the request's types and errors) is what both paths feed: it decodes
  tokens as they arrive, cuts at stop strings and streams text to a `TextStream`.

`ChatEngine.path(params)` says which path a request takes. The prompt is rendered with the tokenizer
saved by the run, i.e. the chat template used in training, in the run's thinking mode (a request's
chat_template_kwargs win; thoughts are split from answers by infer/reasoning.py). Names are imported from the module that
defines them: this one defines ChatEngine and load_engine.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Literal

from jinja2 import TemplateError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sftflow.data.thinking import Thinking, resolve_thinking
from sftflow.errors import SftflowError
from sftflow.infer.core import make_generator, sampling
from sftflow.infer.dynamic import DynamicPath
from sftflow.infer.exact import run_exact
from sftflow.infer.kv import use_serving_attention
from sftflow.infer.reasoning import close_prompt, template_kwargs, template_messages
from sftflow.infer.requests import (
    ChatResult,
    EngineBusy,
    Job,
    RequestError,
    SamplingParams,
    TextStream,
    validate_messages,
)
from sftflow.model.inference import load_for_inference, onednn_linear

if TYPE_CHECKING:
    from sftflow.config.args import GeneratingArguments
    from sftflow.config.parser import RunArgs

logger = logging.getLogger(__name__)

__all__ = ["ChatEngine", "load_engine"]


class ChatEngine:
    """Generate chat answers from one loaded model; safe to call from many threads at once.

    With `batched=True` the batch path (dynamic batching) serves every request it can carry; otherwise
    (chat in a terminal, the board) every request runs on the exact path.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        generating: GeneratingArguments,
        model_name: str = "sftflow",
        batched: bool = False,
        onednn: bool = False,
        enable_thinking: bool | None = True,
    ) -> None:
        # the run's thinking mode (None: a template without thinking); raises for false/null without one
        self.thinking: Thinking | None = resolve_thinking(tokenizer, enable_thinking, False)
        self.generator = generator = make_generator(model, tokenizer, generating)
        self.model, self.tokenizer, self.generating = generator.model, tokenizer, generating
        self.context_length = generator.context_length
        self.model_name = model_name
        self.max_queue = generating.serve_max_queue
        self._held = 0
        self._held_lock = threading.Lock()
        self._jobs: set[Job] = set()  # the jobs held (running or waiting), for close(cancel=True)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._closed = False
        self._admitting = threading.Lock()
        self._dynamic: DynamicPath | None = None  # dynamic batching, on the worker below
        # oneDNN layers built on one thread ran ~2x slower on another (benchmarks/NOTES.md), so the
        # worker that generates builds them
        self._onednn = onednn
        self._ready = threading.Event()
        self._worker = threading.Thread(target=self._serve, name="sftflow-generate", daemon=True)
        self._worker.start()
        self._ready.wait()
        if batched:  # sized after the swap, which changes the free memory
            self._dynamic = DynamicPath(generator)

    # -- prompts and settings -------------------------------------------------------------------

    def encode(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """Validate messages and return the prompt ids (chat template + generation prompt); `tools` (OpenAI
        function definitions) are rendered by the chat template, `template_kwargs` (a request's
        chat_template_kwargs) are passed to it (see `prompt`).

        Raises:
            RequestError: bad messages or template kwargs, or a conversation the chat template refuses.
        """
        return self.tokenizer.encode(self.prompt(messages, tools, template_kwargs), add_special_tokens=False)

    def prompt(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        requested: dict[str, Any] | None = None,
    ) -> str:
        """The prompt text of `encode`. With a reasoning template it is in the run's thinking mode unless
        `requested` (chat_template_kwargs) says otherwise: with thinking off the empty block ends it;
        earlier answers' `reasoning_content` is given to the template as it takes thoughts
        (infer/reasoning.py).

        Raises:
            RequestError: as `encode`.
        """
        messages = template_messages(validate_messages(messages), self.thinking)
        source = self.tokenizer.chat_template
        source = " ".join(source.values()) if isinstance(source, dict) else str(source or "")
        kwargs = template_kwargs(self.thinking, source, requested)
        if tools:
            kwargs["tools"] = tools
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, **kwargs
            )
        except TemplateError as exc:
            raise RequestError(f"the chat template refused these messages: {exc}", "messages") from None
        return close_prompt(text, self.thinking, kwargs)

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

    def path(self, params: SamplingParams) -> Literal["batch", "exact"]:
        """Which path a request takes: the batch path unless it needs what only `generate` carries."""
        if self._dynamic is None or not self._dynamic.can_carry(params):
            return "exact"
        return "batch"

    # -- admission ------------------------------------------------------------------------------

    def _hold(self, count: int) -> None:
        with self._held_lock:
            if self._held + count > self.max_queue:
                raise EngineBusy(
                    f"the server holds {self._held} requests (serve_max_queue={self.max_queue}); retry shortly.",
                    retry_after=1,
                )
            self._held += count

    def _check_size(self, answers: int, param: str) -> None:
        """A request for more answers than serve_max_queue could never be admitted: a 400, not a 429."""
        if answers > self.max_queue:
            raise RequestError(
                f"this request asks for {answers} answers (prompts x n), more than this server ever holds "
                f"(serve_max_queue={self.max_queue}); send fewer prompts or a smaller n.",
                param,
            )

    def _release(self, job: Job) -> None:
        with self._held_lock:
            self._held -= 1
            self._jobs.discard(job)

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
        return self.submit_all([prompt_ids], params)[0]

    def submit_all(self, prompts: list[list[int]], params: SamplingParams | None = None) -> list[Future]:
        """`submit_ids` for several prompts, admitted together: the n answers of every prompt are held at
        once, so a request that does not fit queues none of them.

        Raises:
            RequestError: a prompt that does not fit the context, or more answers than serve_max_queue
                (which no retry would get admitted); before anything is queued.
            EngineBusy: the answers would take the engine past serve_max_queue.
        """
        params = params or SamplingParams()
        budgets = [self.max_new_tokens(len(ids), params.max_new_tokens) for ids in prompts]
        # greedy answers are deterministic: generate once and repeat it n times
        copies = params.n if sampling(params, self.generating)[0] else 1
        self._check_size(len(prompts) * copies, "prompt" if len(prompts) > 1 else "n")
        specs = [(ids, budget, copies, 0) for ids, budget in zip(prompts, budgets, strict=True)]
        groups = self._start(specs, params, streaming=False)
        return [self._result(jobs, params, len(ids)) for jobs, ids in zip(groups, prompts, strict=True)]

    @staticmethod
    def _result(jobs: list[Job], params: SamplingParams, prompt_tokens: int) -> Future:
        """One Future for the answers of one prompt, resolved when every job has ended."""
        copies = len(jobs)
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
            result.set_result(ChatResult(choices * (params.n // copies), prompt_tokens))

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
        ((job,),) = self._start([(prompt_ids, budget, 1, index)], params, streaming=True)
        return TextStream(job), len(prompt_ids)

    def stream_all(self, prompt_ids: list[int], params: SamplingParams) -> list[TextStream]:
        """The `params.n` streamed answers of one prompt (choice indices 0..n-1), admitted together: all
        are queued or none is.

        Raises:
            RequestError, EngineBusy: as `submit_all`.
        """
        budget = self.max_new_tokens(len(prompt_ids), params.max_new_tokens)
        self._check_size(params.n, "n")
        specs = [(prompt_ids, budget, 1, index) for index in range(params.n)]
        return [TextStream(job) for (job,) in self._start(specs, params, streaming=True)]

    def _start(
        self, specs: list[tuple[list[int], int, int, int]], params: SamplingParams, streaming: bool
    ) -> list[list[Job]]:
        """Queue the jobs of (prompt ids, token budget, copies, seed offset) specs, held all at once."""
        groups = [
            [
                Job(
                    self.tokenizer,
                    self.generator.stop_id_set,
                    prompt_ids,
                    params,
                    budget,
                    streaming,
                    None if params.seed is None else params.seed + index + i,
                )
                for i in range(copies)
            ]
            for prompt_ids, budget, copies, index in specs
        ]
        jobs = [job for group in groups for job in group]
        with self._admitting:  # close() cannot slip its sentinel in between the check and the queueing
            if self._closed:
                raise SftflowError("the engine is closed: it takes no more requests.")
            self._hold(len(jobs))
            with self._held_lock:
                self._jobs.update(jobs)
            for job in jobs:
                job.future.add_done_callback(lambda _, job=job: self._release(job))
            try:
                for job in jobs:
                    self._queue.put(job)
            except BaseException as exc:
                for job in jobs:
                    job.fail(exc)
                raise
        return groups

    def close(self, cancel: bool = False) -> None:
        """Stop the worker once the queued jobs are answered, or (`cancel`) cancel them all first, as a
        server shutting down does (idempotent; no request is taken after it)."""
        with self._admitting:
            first = not self._closed
            self._closed = True
            if cancel:
                with self._held_lock:
                    held = list(self._jobs)
                for job in held:
                    job.cancel()
            if first:
                self._queue.put(None)  # after every job queued: the worker answers them all first
        self._worker.join()

    def _serve(self) -> None:
        """The worker: takes the queued jobs in arrival order; with dynamic batching, a job that can be
        batched starts a batch that later jobs join until one that cannot comes first, else one job at a
        time (a cancelled job is skipped)."""
        try:
            if self._onednn:
                logger.info("oneDNN Linear layers: %d", onednn_linear(self.model))  # all or none
        except Exception:
            logger.exception("oneDNN Linear layers not used")  # (a bug: onednn_linear reverts itself)
        finally:
            self._ready.set()
        waiting: deque[Job] = deque()
        closing = [False]

        def drain() -> None:  # every job already queued joins the choice
            while not closing[0]:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    return
                if job is None:
                    closing[0] = True
                else:
                    waiting.append(job)

        while waiting or not closing[0]:
            if not waiting:
                job = self._queue.get()
                if job is None:
                    break
                waiting.append(job)
            drain()
            if self._dynamic is not None and not closing[0]:
                closing[0] = self._gather(waiting)
            job = waiting[0]
            if self._dynamic is not None and self._dynamic.can_carry(job.params):
                try:  # it and the jobs after it that can share its batch run together
                    self._dynamic.serve(waiting, drain)
                except BaseException:
                    logger.exception("generation failed")
                continue
            waiting.popleft()
            if job.done:
                continue
            try:
                run_exact(self.generator, job)
            except BaseException as exc:
                logger.exception("generation failed")
                job.fail(exc)

    def _gather(self, waiting: deque[Job]) -> bool:
        """Before a dynamic batch starts, let requests sent at the same moment arrive: wait while new jobs
        keep coming less than GATHER_GAP_S apart, at most GATHER_MAX_S. Returns True if close() was called."""
        deadline = time.monotonic() + GATHER_MAX_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                job = self._queue.get(timeout=min(GATHER_GAP_S, left))
            except queue.Empty:
                return False
            if job is None:
                return True
            waiting.append(job)
        return False


# Requests sent together reach the worker a few ms apart (HTTP parsing, chat template): a batch that
# started on the first alone would leave the rest waiting for its end. Costs a single request <= 10 ms.
GATHER_GAP_S = 0.01
GATHER_MAX_S = 0.05


def load_engine(args: RunArgs, batched: bool = False) -> ChatEngine:
    """Load the model and tokenizer `args` describe and start a ChatEngine on them (`batched`: with the
    batch path, for servers)."""
    model, tokenizer = load_for_inference(args)
    use_serving_attention(model)
    name = args.model.adapter_name_or_path or args.model.model_name_or_path
    onednn = args.generating.onednn_linear
    return ChatEngine(
        model,
        tokenizer,
        args.generating,
        model_name=str(name),
        batched=batched,
        onednn=onednn,
        enable_thinking=args.data.enable_thinking,
    )
