"""`sftflow api`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for a tuned model.

Routes (vLLM's OpenAI protocol is the reference): `GET /health`, `GET /v1/models`,
`POST /v1/chat/completions` and `POST /v1/completions`, plain or as server-sent events (`stream: true`,
ending in `data: [DONE]`). Chat takes `tools` + `tool_choice` (rendered by the model's chat template,
calls parsed back), `response_format` (text / json_object / json_schema, enforced by constrained decoding),
`logprobs` + `top_logprobs`, `chat_template_kwargs` (e.g. `{"enable_thinking": false}`); a reasoning model's
answer comes split into `reasoning_content` (the thought; `delta.reasoning_content` when streamed, as
vLLM sends it) and `content` (infer/reasoning.py); completions take token-id prompts, `echo` and `logprobs` (what
lm-evaluation-harness's `local-completions` sends).

Every request field is either acted on or refused: unknown fields and values this server cannot honour
get 400. Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 400 invalid
request, 401 missing/wrong API key, 404 unknown model, 413 a body over `serve_max_body_bytes`, 429 (with
Retry-After) when `serve_max_queue` answers are already held, 500 generation failure. A client that
disconnects cancels its request.

No one request can hurt the others: the API key is checked from the headers before the body is read (every
route but /health, the OpenAPI docs included), then the body is read up to `serve_max_body_bytes`; a
request's answers (prompts x n) are admitted all at once or not at all (more than `serve_max_queue` alone:
400); templating and tokenizing run in the threadpool, off the event loop; a server bound to loopback
answers only loopback Host headers (DNS rebinding).

Several runs can be served at once (`create_app({"a": engine_a, "b": engine_b})`): a request's `model`
picks the engine (400 when it is missing), /v1/models lists every name and /health reports each. With one
run, `model` may also be omitted, be `sftflow`, or the run dir's last part.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.body_limit import MAX_BODY_SIZE_SCOPE_KEY, RequestBodyLimitMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from sftflow.errors import SftflowError
from sftflow.infer.answers import (
    ChatPlan,
    chat_logprobs,
    chat_plan,
    completion_choice,
    completion_prompts,
    usage,
)
from sftflow.infer.protocol import ChatCompletionRequest, CompletionRequest, field_path
from sftflow.infer.reasoning import ThoughtSplitter
from sftflow.infer.requests import ChatResult, EngineBusy, RequestError, SamplingParams
from sftflow.infer.toolcalls import ToolCallStream

if TYPE_CHECKING:  # (the engine imports torch and transformers; this module is imported without them)
    from sftflow.infer.engine import ChatEngine

logger = logging.getLogger(__name__)


def _error(
    status: int,
    message: str,
    kind: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class Served:
    """The engines one server serves, by name, and the names a request's `model` may use for them."""

    def __init__(self, engines: ChatEngine | Mapping[str, ChatEngine]) -> None:
        self.engines = dict(engines) if isinstance(engines, Mapping) else {engines.model_name: engines}
        if not self.engines:
            raise SftflowError("create_app needs at least one engine to serve.")
        self.aliases = {name: name for name in self.engines}  # what `model` may say -> the served name
        if len(self.engines) == 1:
            (only,) = self.engines
            self.aliases.update({"sftflow": only, Path(only).name: only})
        self.listed = ", ".join(repr(name) for name in self.engines)

    def pick(self, name: str | None) -> tuple[str, ChatEngine] | JSONResponse:
        """The served name and engine a request's `model` asks for, or the error to answer."""
        if name is None and len(self.engines) == 1:
            name = next(iter(self.engines))
        if name is None:
            return _error(
                400,
                f"model is required: this server serves several runs ({self.listed}).",
                "invalid_request_error",
                "model",
            )
        if name in self.aliases:
            return self.aliases[name], self.engines[self.aliases[name]]
        also = " (also 'sftflow')" if len(self.engines) == 1 else ""
        return _error(
            404,
            f"model {name!r} is not served here; this server serves {self.listed}{also}.",
            "invalid_request_error",
            "model",
            "model_not_found",
        )


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A body that fails validation: a 400 naming the first bad field."""
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return _error(400, f"the request body is not valid JSON: {first.get('msg')}", "invalid_request_error")
    param = (first.get("ctx") or {}).get("param") or field_path(first.get("loc", ()))
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        message = "unknown field (this server does not support it)"
    return _error(400, f"{param}: {message}" if param else message, "invalid_request_error", param)


def too_large(limit: int) -> JSONResponse:
    message = f"the request body is over this server's limit of {limit} bytes (serve_max_body_bytes)"
    return _error(413, message, "invalid_request_error", code="request_too_large")


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    if exc.status_code == 413:  # raised by RequestBodyLimitMiddleware while a body streams in
        return too_large(request.scope[MAX_BODY_SIZE_SCOPE_KEY])
    kind = "authentication_error" if exc.status_code == 401 else "invalid_request_error"
    return _error(exc.status_code, str(exc.detail), kind)


class HeaderChecks:
    """ASGI middleware that answers from the headers alone, before anything reads the body (a FastAPI
    dependency would run after the body is read and parsed):
    - with `api_key`, every HTTP request but GET /health needs `Authorization: Bearer <api_key>` (the
      OpenAPI docs too), else 401;
    - a Content-Length over `max_body` gets 413 (a body sent without one is counted as it streams in, by
      starlette's RequestBodyLimitMiddleware inside this one).
    """

    OPEN = frozenset({"/health"})

    def __init__(self, app: ASGIApp, api_key: str | None, max_body: int) -> None:
        self.app = app
        self.key = api_key.encode() if api_key is not None else None
        self.max_body = max_body

    def keyed(self, headers: Headers) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        given = token.strip().encode("latin-1")  # header bytes as sent (compare_digest refuses non-ASCII str)
        return scheme.lower() == "bearer" and secrets.compare_digest(given, self.key or b"")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        length = headers.get("content-length", "")
        if self.key is not None and scope["path"] not in self.OPEN and not self.keyed(headers):
            message = "invalid API key: send Authorization: Bearer <API_KEY>"
            response = _error(401, message, "authentication_error", headers={"WWW-Authenticate": "Bearer"})
        elif length.isascii() and length.isdigit() and int(length) > self.max_body:
            response = too_large(self.max_body)
        else:
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)


def failure(exc: Exception) -> JSONResponse:
    """The answer to a request that failed: 429 when the queue is full, 400 for the request's own fault."""
    if isinstance(exc, EngineBusy):
        return _error(
            429,
            str(exc),
            "rate_limit_error",
            code="server_busy",
            headers={"Retry-After": str(exc.retry_after)},
        )
    if isinstance(exc, RequestError):
        return _error(400, str(exc), "invalid_request_error", exc.param)
    if isinstance(exc, SftflowError):
        return _error(400, str(exc), "invalid_request_error")
    logger.exception("generation failed", exc_info=exc)
    return _error(500, f"generation failed: {exc}", "server_error")


def create_app(
    engines: ChatEngine | Mapping[str, ChatEngine],
    api_key: str | None = None,
    allowed_hosts: Sequence[str] | None = None,
) -> FastAPI:
    """The FastAPI app serving one engine (under its model_name) or several by name.

    With `api_key`, every route but /health needs `Authorization: Bearer <key>` (`HeaderChecks`). Bodies
    over the engines' `serve_max_body_bytes` get a 413, from Content-Length or while the body streams in.
    With `allowed_hosts`, a request whose Host header names another host gets a 400 (starlette's
    TrustedHostMiddleware; `sftflow api` passes the loopback names when bound to loopback).
    """
    served = Served(engines)
    app = FastAPI(title="sftflow", description="OpenAI-compatible completions for tuned models")
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)
    # the last added runs first: the Host, then the key and Content-Length, then the body as it streams in
    limit = max(engine.generating.serve_max_body_bytes for engine in served.engines.values())
    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=limit)
    app.add_middleware(HeaderChecks, api_key=api_key, max_body=limit)
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        each = [{"model": n, "held": e.held, "max_queue": e.max_queue} for n, e in served.engines.items()]
        # one run keeps its fields at the top level too, as before several runs could be served
        return {"status": "ok", **(each[0] if len(each) == 1 else {}), "models": each}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        cards = [
            {"id": n, "object": "model", "created": created, "owned_by": "sftflow"} for n in served.engines
        ]
        return {"object": "list", "data": cards}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        picked = served.pick(body.model)
        if isinstance(picked, JSONResponse):
            return picked
        return await answer_chat(*picked, body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        picked = served.pick(body.model)
        if isinstance(picked, JSONResponse):
            return picked
        return await answer_completions(*picked, body, request)

    return app


async def answer_chat(model: str, engine: ChatEngine, body: ChatCompletionRequest, request: Request) -> Any:
    """/v1/chat/completions for one engine: a JSON answer, an event stream, or the error."""
    try:
        # templating and tokenizing a long prompt take seconds: off the event loop, which serves everyone
        plan = await run_in_threadpool(chat_plan, engine, body)
    except Exception as exc:  # a request the template or the schema compiler refuses
        return failure(exc)
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    try:
        if body.stream:
            # the n streams are queued now (they share batches), so a bad request or a full queue gets
            # its 4xx before any event is sent
            streams = engine.stream_all(plan.prompt_ids, plan.params)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = chat_events(model, plan, streams, completion_id, created, include_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        results = await until_done([engine.submit_ids(plan.prompt_ids, plan.params)], request)
    except Exception as exc:
        return failure(exc)
    if results is None:
        return _error(499, "the client closed the request", "invalid_request_error")
    (result,) = results
    choices = [plan.choice(i, c) for i, c in enumerate(result.choices)]
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage(result.prompt_tokens, sum(c.completion_tokens for c in result.choices)),
    }


async def answer_completions(
    model: str, engine: ChatEngine, body: CompletionRequest, request: Request
) -> Any:
    """/v1/completions for one engine: a JSON answer, an event stream, or the error."""
    try:
        prompts = await run_in_threadpool(completion_prompts, engine, body.prompt)
        params = SamplingParams(
            max_new_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            n=body.n,
            stop=body.stop or [],
            seed=body.seed,
            logprobs=body.logprobs is not None,
            top_logprobs=body.logprobs or 0,
            echo=body.echo,
        )
        if body.stream and len(prompts) > 1:
            raise RequestError("stream takes a single prompt.", "prompt")
        completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            streams = engine.stream_all(prompts[0], params)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = completion_events(
                engine, model, prompts[0], params, streams, completion_id, created, include_usage
            )
            return StreamingResponse(events, media_type="text/event-stream")
        # every prompt's answers are admitted together: a 429 leaves none of them queued
        results = await until_done(engine.submit_all(prompts, params), request)
    except Exception as exc:
        return failure(exc)
    if results is None:
        return _error(499, "the client closed the request", "invalid_request_error")
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for ids, result in zip(prompts, results, strict=True):
        prompt_tokens += result.prompt_tokens
        for c in result.choices:
            completion_tokens += c.completion_tokens
            choices.append(completion_choice(engine, len(choices), ids, c, body.echo, body.logprobs))
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    }


async def until_done(futures: list[Future[ChatResult]], request: Request) -> list[ChatResult] | None:
    """The futures' results, or None when the client disconnects first. A disconnect, or this task being
    cancelled (the server shutting down), cancels every one of the generations."""
    wrapped = [asyncio.wrap_future(future) for future in futures]
    pending = set(wrapped)
    try:
        while pending:
            _, pending = await asyncio.wait(pending, timeout=0.25)
            if pending and await request.is_disconnected():
                for future in futures:
                    future.cancel_generation()  # type: ignore[attr-defined]
                return None
    except asyncio.CancelledError:
        for future in futures:
            future.cancel_generation()  # type: ignore[attr-defined]
        raise
    return [w.result() for w in wrapped]


def _chunk(kind: str, completion_id: str, created: int, model: str, choices: list, **extra: Any) -> str:
    body = {
        "id": completion_id,
        "object": kind,
        "created": created,
        "model": model,
        "choices": choices,
        **extra,
    }
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _error_event(exc: Exception) -> str:
    logger.exception("generation failed", exc_info=exc)
    error = {"message": f"generation failed: {exc}", "type": "server_error", "param": None, "code": None}
    return f"data: {json.dumps({'error': error})}\n\n"


async def chat_events(
    model: str,
    plan: ChatPlan,
    streams: list[Any],
    completion_id: str,
    created: int,
    include_usage: bool,
) -> AsyncIterator[str]:
    """Server-sent events of a streamed chat completion: the n answers one after another (each chunk names
    its choice index). Content streams as it is generated; with tools, a call is sent as tool_calls deltas
    as it is generated (a head with index, id and name, then the arguments piece by piece; see
    `ToolCallStream`). Then usage (if asked) and `data: [DONE]`. A failure mid-stream is sent as an
    `error` event, which the openai client raises."""

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        return _chunk("chat.completion.chunk", completion_id, created, model, choices, **extra)

    prompt_tokens, completion_tokens = len(plan.prompt_ids), 0
    try:
        for index, stream in enumerate(streams):
            yield event(
                [{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
            )
            calls = None
            if plan.tool_format is not None:
                calls = ToolCallStream(plan.tool_format, plan.parallel)  # type: ignore[arg-type]
            thoughts = plan.splitter()
            async for piece in stream:
                for delta in answer_deltas(piece, thoughts, calls):
                    yield event([{"index": index, "delta": delta, "finish_reason": None}])
            completion_tokens += stream.completion_tokens
            for delta in answer_deltas(None, thoughts, calls):
                yield event([{"index": index, "delta": delta, "finish_reason": None}])
            logprobs = None
            if plan.params.logprobs and stream.completion is not None:
                logprobs = chat_logprobs(stream.completion.logprobs, plan.top_logprobs)
            finish = calls.finish_reason(stream.finish_reason) if calls else stream.finish_reason
            yield event([{"index": index, "delta": {}, "finish_reason": finish, "logprobs": logprobs}])
        if include_usage:
            yield event([], usage=usage(prompt_tokens, completion_tokens))
    except Exception as exc:
        yield _error_event(exc)
    finally:
        for stream in streams:
            stream.close()  # the client went away or the stream ended: stop generating for it
    yield "data: [DONE]\n\n"


def answer_deltas(
    piece: str | None, thoughts: ThoughtSplitter | None, calls: ToolCallStream | None
) -> list[dict[str, Any]]:
    """The chat deltas one streamed piece of an answer makes (None: the answer ended, flush what is
    held): `reasoning_content` for the thought (with a reasoning template), then `content`, or
    `tool_calls` when tools are parsed."""
    if thoughts is None:
        parts: list[tuple[str, str]] = [] if piece is None else [("content", piece)]
    else:
        parts = list(thoughts.finish() if piece is None else thoughts.feed(piece))
    deltas: list[dict[str, Any]] = []
    for kind, text in parts:
        if kind == "reasoning":
            deltas.append({"reasoning_content": text})
        elif calls is not None:
            deltas += calls.feed(text)
        elif text:
            deltas.append({"content": text})
    if piece is None and calls is not None:
        deltas += calls.finish()
    return deltas


async def completion_events(
    engine: ChatEngine,
    model: str,
    prompt_ids: list[int],
    params: SamplingParams,
    streams: list[Any],
    completion_id: str,
    created: int,
    include_usage: bool,
) -> AsyncIterator[str]:
    """Server-sent events of a streamed completion (text deltas; logprobs, if asked, with the last chunk)."""

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        return _chunk("text_completion", completion_id, created, model, choices, **extra)

    prompt_tokens, completion_tokens = len(prompt_ids), 0
    try:
        for index, stream in enumerate(streams):
            if params.echo:
                text = engine.tokenizer.decode(prompt_ids)
                yield event([{"index": index, "text": text, "logprobs": None, "finish_reason": None}])
            async for piece in stream:
                yield event([{"index": index, "text": piece, "logprobs": None, "finish_reason": None}])
            completion_tokens += stream.completion_tokens
            logprobs = None
            if params.logprobs and stream.completion is not None:
                choice = completion_choice(
                    engine, index, prompt_ids, stream.completion, params.echo, params.top_logprobs
                )
                logprobs = choice["logprobs"]
            yield event(
                [{"index": index, "text": "", "logprobs": logprobs, "finish_reason": stream.finish_reason}]
            )
        if include_usage:
            yield event([], usage=usage(prompt_tokens, completion_tokens))
    except Exception as exc:
        yield _error_event(exc)
    finally:
        for stream in streams:
            stream.close()
    yield "data: [DONE]\n\n"
