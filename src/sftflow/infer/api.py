"""`sftflow api`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for a tuned model.

Routes: `GET /v1/models`, `POST /v1/chat/completions` (plain, or server-sent events with `stream: true`
ending in `data: [DONE]`). Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`:
400 for invalid requests (bad JSON, unknown roles, empty messages, out-of-range values, prompts over
the context length), 401 for a missing or wrong API key. Requests are queued in front of the model by
the engine's single generation worker, so concurrent requests never mix.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException

if TYPE_CHECKING:
    from sftflow.infer.engine import ChatEngine, SamplingParams

logger = logging.getLogger(__name__)

MAX_N = 16
MAX_STOPS = 4


def _error(
    status: int, message: str, kind: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


class TextPart(BaseModel):
    """A text part of a message's content list (images and audio are not supported)."""

    type: Literal["text"]
    text: str


class Message(BaseModel):
    """One chat message of a request."""

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    """`stream_options`: include_usage adds a last chunk with the usage counts."""

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The body of POST /v1/chat/completions; out-of-range values are refused with 400."""

    model_config = ConfigDict(extra="ignore")  # clients send fields we need not act on (user, store, ...)

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    logprobs: bool | None = None
    tools: list[Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise ValueError(f"stop takes up to {MAX_STOPS} non-empty strings")
        return stops

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("logprobs are not supported by this server")
        return value

    @field_validator("tools")
    @classmethod
    def _tools(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError("tools are not supported by this server")
        return value


def create_app(engine: ChatEngine, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine`; with `api_key`, every route needs `Authorization: Bearer <key>`."""
    from sftflow.infer.engine import RequestError, SamplingParams

    app = FastAPI(title="sftflow", description="OpenAI-compatible chat completions for a tuned model")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Any:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return _error(
                400, f"the request body is not valid JSON: {first.get('msg')}", "invalid_request_error"
            )
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
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
    async def chat_completions(body: ChatCompletionRequest) -> Any:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        params = SamplingParams(
            max_new_tokens=body.max_completion_tokens or body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            n=body.n,
            stop=body.stop or [],
            seed=body.seed,
        )
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        try:
            if body.stream:
                # the first stream is queued now, so bad requests get a 400 before any event is sent
                first = engine.stream(messages, params, index=0)
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                events = sse_events(engine, messages, params, first, completion_id, created, include_usage)
                return StreamingResponse(events, media_type="text/event-stream")
            result = await asyncio.wrap_future(engine.submit(messages, params))
        except RequestError as exc:
            return _error(400, str(exc), "invalid_request_error", exc.param)
        except Exception as exc:
            logger.exception("generation failed")
            return _error(500, f"generation failed: {exc}", "server_error")
        completion_tokens = sum(c.completion_tokens for c in result.choices)
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": engine.model_name,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "finish_reason": c.finish_reason,
                    "logprobs": None,
                }
                for i, c in enumerate(result.choices)
            ],
            "usage": usage(result.prompt_tokens, completion_tokens),
        }

    return app


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse_events(
    engine: ChatEngine,
    messages: list[dict[str, str]],
    params: SamplingParams,
    first: tuple[Any, int],
    completion_id: str,
    created: int,
    include_usage: bool,
) -> Iterator[str]:
    """Server-sent events of a streamed completion: the n answers one after another (each chunk names
    its choice index), then usage (if asked) and `data: [DONE]`. A failure mid-stream is sent as an
    `error` event, which the openai client raises."""

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        chunk = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": engine.model_name,
            "choices": choices,
            **extra,
        }
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    stream, prompt_tokens = first
    completion_tokens = 0
    try:
        for index in range(params.n):
            if index > 0:
                stream, _ = engine.stream(messages, params, index=index)
            yield event(
                [{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
            )
            for piece in stream:
                yield event([{"index": index, "delta": {"content": piece}, "finish_reason": None}])
            completion_tokens += stream.completion_tokens
            yield event([{"index": index, "delta": {}, "finish_reason": stream.finish_reason}])
        if include_usage:
            yield event([], usage=usage(prompt_tokens, completion_tokens))
    except Exception as exc:
        logger.exception("generation failed")
        error = {"message": f"generation failed: {exc}", "type": "server_error", "param": None, "code": None}
        yield f"data: {json.dumps({'error': error})}\n\n"
    finally:
        stream.close()  # the client went away or the stream ended: stop generating for it
    yield "data: [DONE]\n\n"
