"""`sftflow api`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for a tuned model.

Routes (vLLM's OpenAI protocol is the reference): `GET /health`, `GET /v1/models`,
`POST /v1/chat/completions` and `POST /v1/completions`, plain or as server-sent events (`stream: true`,
ending in `data: [DONE]`). Chat takes `tools` + `tool_choice` (rendered by the model's chat template,
calls parsed back), `response_format` (text / json_object / json_schema, enforced by constrained decoding),
`logprobs` + `top_logprobs`; completions take token-id prompts, `echo` and `logprobs` (what
lm-evaluation-harness's `local-completions` sends).

Every request field is either acted on or refused: unknown fields and values this server cannot honour
get 400. Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 400 invalid
request, 401 missing/wrong API key, 404 unknown model, 429 (with Retry-After) when `serve_max_queue`
requests are already held, 500 generation failure. A client that disconnects cancels its request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException

if TYPE_CHECKING:
    from sftflow.infer.engine import ChatEngine, Completion, SamplingParams, TokenLogprob

logger = logging.getLogger(__name__)

MAX_N = 16
MAX_STOPS = 4
MAX_TOP_LOGPROBS = 20
PYDANTIC_TYPES = {"str", "int", "float", "bool", "list", "dict", "none"}


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


class Strict(BaseModel):
    """Request parts refuse fields they do not know (nothing is silently ignored)."""

    model_config = ConfigDict(extra="forbid")


class TextPart(Strict):
    """A text part of a message's content list (images and audio are not supported)."""

    type: Literal["text"]
    text: str


class FunctionCall(Strict):
    name: str
    arguments: str


class ToolCallIn(Strict):
    """An assistant message's earlier tool call (sent back in the history)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Strict):
    """One chat message of a request (`developer` is taken as `system`)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    def to_template(self) -> dict[str, Any]:
        """The message as chat templates take it (tool-call arguments as objects when they are JSON)."""
        text = self.content if isinstance(self.content, str) or self.content is None else ""
        if isinstance(self.content, list):
            text = "".join(part.text for part in self.content)
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_calls:
            calls = []
            for call in self.tool_calls:
                try:
                    arguments: Any = json.loads(call.function.arguments)
                except json.JSONDecodeError:
                    arguments = call.function.arguments
                calls.append(
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.function.name, "arguments": arguments},
                    }
                )
            out["tool_calls"] = calls
        if self.role == "tool":
            out["tool_call_id"] = self.tool_call_id
            if self.name:
                out["name"] = self.name
        return out


class StreamOptions(Strict):
    """`stream_options`: include_usage adds a last chunk with the usage counts."""

    include_usage: bool = False


class FunctionDef(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(Strict):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object with name and schema")
        return self


class SamplingFields(Strict):
    """Fields both completion routes share."""

    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    user: str | None = None  # an end-user id (OpenAI: for abuse monitoring); logged, changes nothing
    frequency_penalty: float = 0
    presence_penalty: float = 0
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise ValueError(f"stop takes up to {MAX_STOPS} non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> None:
        if value:
            raise ValueError("logit_bias is not supported by this server")
        return None

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _penalty(cls, value: float) -> float:
        if value != 0:
            raise ValueError("only 0 is supported (set repetition_penalty in the server's config instead)")
        return 0.0


class ChatCompletionRequest(SamplingFields):
    """The body of POST /v1/chat/completions; out-of-range or unsupported values are refused with 400."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _combinations(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.tool_choice is not None and not self.tools:
            raise ValueError("tool_choice needs tools")
        forced = self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)
        if forced and self.response_format is not None and self.response_format.type != "text":
            raise ValueError(
                "response_format json_object/json_schema cannot be combined with a forced tool_choice"
            )
        return self


class CompletionRequest(SamplingFields):
    """The body of POST /v1/completions (OpenAI's legacy completions, as lm-eval's local-completions uses)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _combinations(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix (fill in the middle) is not supported by this server")
        if self.best_of not in (None, self.n):
            raise ValueError("best_of other than n is not supported by this server")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 only makes sense with echo (scoring the prompt)")
        return self


def create_app(engine: ChatEngine, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine`; with `api_key`, every /v1 route needs `Authorization: Bearer <key>`."""
    from sftflow.errors import SftflowError
    from sftflow.infer.engine import EngineBusy, RequestError

    app = FastAPI(title="sftflow", description="OpenAI-compatible completions for a tuned model")
    names = {engine.model_name, "sftflow", Path(engine.model_name).name}

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Any:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return _error(
                400, f"the request body is not valid JSON: {first.get('msg')}", "invalid_request_error"
            )
        param = field_path(first.get("loc", ()))
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        if first.get("type") == "extra_forbidden":
            message = "unknown field (this server does not support it)"
        return _error(400, f"{param}: {message}" if param else message, "invalid_request_error", param)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> Any:
        kind = "authentication_error" if exc.status_code == 401 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), kind)

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), api_key):
            raise HTTPException(401, "invalid API key: send Authorization: Bearer <API_KEY>")

    def check_model(name: str | None) -> JSONResponse | None:
        if name is None or name in names:
            return None
        return _error(
            404,
            f"model {name!r} is not served here; this server serves {engine.model_name!r} (also 'sftflow').",
            "invalid_request_error",
            "model",
            "model_not_found",
        )

    def failure(exc: Exception) -> JSONResponse:
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

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": engine.model_name,
            "held": engine.held,
            "max_queue": engine.max_queue,
        }

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> dict[str, Any]:
        card = {
            "id": engine.model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "sftflow",
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        if (wrong := check_model(body.model)) is not None:
            return wrong
        try:
            plan = chat_plan(engine, body)
        except Exception as exc:  # a request the template or the schema compiler refuses
            return failure(exc)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        try:
            if body.stream:
                # the first stream is queued now, so bad requests get their 4xx before any event is sent
                first = engine.stream_ids(plan.prompt_ids, plan.params, index=0)
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                events = chat_events(engine, plan, first, completion_id, created, include_usage)
                return StreamingResponse(events, media_type="text/event-stream")
            future = engine.submit_ids(plan.prompt_ids, plan.params)
            result = await until_done(future, request)
        except Exception as exc:
            return failure(exc)
        if result is None:
            return _error(499, "the client closed the request", "invalid_request_error")
        choices = [plan.choice(i, c) for i, c in enumerate(result.choices)]
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": engine.model_name,
            "choices": choices,
            "usage": usage(result.prompt_tokens, sum(c.completion_tokens for c in result.choices)),
        }

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: CompletionRequest, request: Request) -> Any:
        if (wrong := check_model(body.model)) is not None:
            return wrong
        from sftflow.infer.engine import SamplingParams

        try:
            prompts = completion_prompts(engine, body.prompt)
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
                first = engine.stream_ids(prompts[0], params, index=0)
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                events = completion_events(
                    engine, prompts[0], params, first, completion_id, created, include_usage
                )
                return StreamingResponse(events, media_type="text/event-stream")
            futures = [engine.submit_ids(ids, params) for ids in prompts]
            results = [await until_done(f, request) for f in futures]
        except Exception as exc:
            return failure(exc)
        if any(r is None for r in results):
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
            "model": engine.model_name,
            "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens),
        }

    return app


def field_path(loc: tuple[Any, ...]) -> str | None:
    """The request field a validation error names: "messages.0.role", without the union member names
    pydantic puts in the location ("str", "list[int]", "NamedToolChoice", ...).

    >>> field_path(("body", "tool_choice", "NamedToolChoice", "function", "name"))
    'tool_choice.function.name'
    """
    parts = [str(p) for p in loc]
    parts = parts[1:] if parts[:1] == ["body"] else parts
    keep = [p for p in parts if re.fullmatch(r"[a-z_][a-z0-9_]*|\d+", p) and p not in PYDANTIC_TYPES]
    return ".".join(keep) or None


async def until_done(future: Any, request: Request) -> Any:
    """The future's result, or None (the generation cancelled) when the client disconnects first."""
    wrapped = asyncio.wrap_future(future)
    while True:
        done, _ = await asyncio.wait({wrapped}, timeout=0.25)
        if done:
            return wrapped.result()
        if await request.is_disconnected():
            future.cancel_generation()
            return None


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
        self, prompt_ids: list[int], params: SamplingParams, tool_format: str | None, parallel: bool
    ):
        self.prompt_ids = prompt_ids
        self.params = params
        self.tool_format = tool_format  # None: no tool parsing (no tools, or tool_choice none)
        self.parallel = parallel
        self.top_logprobs = params.top_logprobs

    def split(self, text: str) -> tuple[str | None, list[Any]]:
        from sftflow.infer.tools import parse_tool_calls

        if self.tool_format is None:
            return text, []
        content, calls = parse_tool_calls(text, self.tool_format)  # type: ignore[arg-type]
        calls = calls if self.parallel else calls[:1]
        return (content or None) if calls else content, calls

    def choice(self, index: int, completion: Completion) -> dict[str, Any]:
        content, calls = self.split(completion.text)
        message: dict[str, Any] = {"role": "assistant", "content": content}
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
            cannot be enforced, or messages the template refuses.
    """
    from sftflow.errors import SftflowError
    from sftflow.infer.constrain import json_schema_grammar, lark_grammar
    from sftflow.infer.engine import RequestError, SamplingParams
    from sftflow.infer.tools import call_format, forced_call_lark, supports_tools

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
    prompt_ids = engine.encode(messages, tools)
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
    return ChatPlan(prompt_ids, params, tool_format, body.parallel_tool_calls)


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
    engine: ChatEngine,
    plan: ChatPlan,
    first: tuple[Any, int],
    completion_id: str,
    created: int,
    include_usage: bool,
) -> AsyncIterator[str]:
    """Server-sent events of a streamed chat completion: the n answers one after another (each chunk names
    its choice index). Content streams as it is generated; once a tool call may have begun, the rest is
    held and sent as tool_calls deltas (name, then arguments) when the answer ends. Then usage (if asked)
    and `data: [DONE]`. A failure mid-stream is sent as an `error` event, which the openai client raises."""
    from sftflow.infer.tools import may_start_call

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        return _chunk("chat.completion.chunk", completion_id, created, engine.model_name, choices, **extra)

    stream, prompt_tokens = first
    completion_tokens = 0
    try:
        for index in range(plan.params.n):
            if index > 0:
                stream, _ = engine.stream_ids(plan.prompt_ids, plan.params, index=index)
            yield event(
                [{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
            )
            text, sent = "", 0
            async for piece in stream:
                text += piece
                safe = may_start_call(text, plan.tool_format) if plan.tool_format else len(text)
                if safe > sent:
                    yield event(
                        [{"index": index, "delta": {"content": text[sent:safe]}, "finish_reason": None}]
                    )
                    sent = safe
            completion_tokens += stream.completion_tokens
            content, calls = plan.split(text)
            if calls:
                for k, call in enumerate(calls):
                    head = {
                        "index": k,
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": ""},
                    }
                    yield event([{"index": index, "delta": {"tool_calls": [head]}, "finish_reason": None}])
                    args = {"index": k, "function": {"arguments": call.arguments}}
                    yield event([{"index": index, "delta": {"tool_calls": [args]}, "finish_reason": None}])
            elif len(text) > sent:
                yield event([{"index": index, "delta": {"content": text[sent:]}, "finish_reason": None}])
            logprobs = None
            if plan.params.logprobs and stream.completion is not None:
                logprobs = chat_logprobs(stream.completion.logprobs, plan.top_logprobs)
            finish = "tool_calls" if calls else stream.finish_reason
            yield event([{"index": index, "delta": {}, "finish_reason": finish, "logprobs": logprobs}])
        if include_usage:
            yield event([], usage=usage(prompt_tokens, completion_tokens))
    except Exception as exc:
        yield _error_event(exc)
    finally:
        stream.close()  # the client went away or the stream ended: stop generating for it
    yield "data: [DONE]\n\n"


# -- completions --------------------------------------------------------------------------------


def completion_prompts(engine: ChatEngine, prompt: Any) -> list[list[int]]:
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
        from sftflow.infer.engine import RequestError

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


async def completion_events(
    engine: ChatEngine,
    prompt_ids: list[int],
    params: SamplingParams,
    first: tuple[Any, int],
    completion_id: str,
    created: int,
    include_usage: bool,
) -> AsyncIterator[str]:
    """Server-sent events of a streamed completion (text deltas; logprobs, if asked, with the last chunk)."""

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        return _chunk("text_completion", completion_id, created, engine.model_name, choices, **extra)

    stream, prompt_tokens = first
    completion_tokens = 0
    try:
        for index in range(params.n):
            if index > 0:
                stream, _ = engine.stream_ids(prompt_ids, params, index=index)
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
        stream.close()
    yield "data: [DONE]\n\n"
