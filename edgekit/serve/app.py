"""The OpenAI-compatible HTTP API over loaded model pools (FastAPI on Starlette).

Every error is OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}`` with the status code
the official clients map to their exception classes (400 BadRequest, 401 Authentication, 404 NotFound,
429 RateLimit, 500 InternalServer).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgekit.errors import EdgekitError
from edgekit.httpbody import BodyLimit
from edgekit.serve.metrics import CONTENT_TYPE, ServerMetrics
from edgekit.serve.pool import Job, ModelPool, QueueFull, Sampling
from edgekit.serve.schemas import ChatRequest, CompletionRequest, EmbeddingRequest

log = logging.getLogger("edgekit.serve")


@dataclass
class Limits:
    max_tokens: int = 1024  # per request, whatever the client asks
    max_body_bytes: int = 1 << 20
    max_inputs: int = 256  # texts per embeddings request
    body_timeout_s: float = 30.0  # a request body must arrive within this (a trickling client is answered 408)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}


def _envelope(status: int, message: str, type_: str, code: str | None = None, param: str | None = None,
              headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


def create_app(pools: list[ModelPool], metrics: ServerMetrics, api_key: str | None = None,
               limits: Limits | None = None) -> Any:
    limits = limits or Limits()
    by_name = {p.name: p for p in pools}
    app = FastAPI(title="edgekit serve", docs_url=None, redoc_url=None, openapi_url=None)

    # ------------------------------------------------------------------ errors

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _envelope(exc.status, exc.message, exc.type, exc.code, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        if first.get("type") == "json_invalid":
            msg, loc = "the body is not valid JSON", None
        return _envelope(400, f"{loc}: {msg}" if loc else msg, "invalid_request_error", "invalid_value", loc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        what = "not_found" if exc.status_code == 404 else "method_not_allowed" if exc.status_code == 405 else None
        return _envelope(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", "invalid_request_error", what)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        # the operator gets the traceback on stderr; the client one line without internals
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return _envelope(500, f"internal error: {type(exc).__name__}", "server_error")

    @app.middleware("http")
    async def _count(request: Request, call_next):
        resp = await call_next(request)
        if request.url.path.startswith("/v1/"):
            metrics.requests.labels(getattr(request.state, "model", ""), request.url.path, str(resp.status_code)).inc()
        return resp

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        # constant-time: the comparison takes as long for a near miss as for a wild guess
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key (send `Authorization: Bearer KEY`)",
                           "invalid_request_error", "invalid_api_key")

    def pool_for(request: Request, name: str, kind: str) -> ModelPool:
        request.state.model = name
        pool = by_name.get(name)
        if pool is None:
            raise APIError(404, f"the model '{name}' is not served here (served: {', '.join(by_name)})",
                           "invalid_request_error", "model_not_found", "model")
        if pool.kind != kind:
            what = "a sentence encoder: call /v1/embeddings" if pool.kind == "encoder" else "a decoder: it does not embed"
            raise APIError(400, f"'{name}' is {what}", "invalid_request_error", "wrong_model_kind", "model")
        return pool

    def submit(pool: ModelPool, job: Job) -> None:
        try:
            pool.submit(job)
        except QueueFull as exc:
            raise APIError(429, exc.one_line(), "rate_limit_error", "queue_full",
                           headers={"Retry-After": str(exc.retry_after)}) from None

    # ------------------------------------------------------------------ open endpoints

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": {p.name: {"kind": p.kind, "sessions": len(p.sessions)} for p in pools}}

    @app.get("/metrics")
    async def prometheus(request: Request):
        authorize(request)
        return Response(metrics.text(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [_model_card(p) for p in pools]}

    @app.get("/v1/models/{name}")
    async def model(name: str, request: Request):
        authorize(request)
        if name not in by_name:
            raise APIError(404, f"the model '{name}' is not served here", "invalid_request_error", "model_not_found", "model")
        return _model_card(by_name[name])

    # ------------------------------------------------------------------ generation

    def prepare(pool: ModelPool, body, prompt: str) -> tuple[list[int], Sampling]:
        try:
            ids = pool.session.tokenize(prompt, special=True)
        except EdgekitError as exc:
            raise APIError(400, exc.one_line()) from None
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        n_ctx = pool.n_ctx or (len(ids) + limits.max_tokens)
        asked = body.limit()
        if asked is not None and asked > limits.max_tokens:
            raise APIError(400, f"max_tokens {asked} exceeds this server's limit of {limits.max_tokens}",
                           param="max_tokens", code="max_tokens_exceeded")
        room = n_ctx - len(ids)
        want = asked if asked is not None else min(limits.max_tokens, room)
        if room < 1 or want > room:
            raise APIError(400, f"the prompt is {len(ids)} tokens and max_tokens {want}: together more than the model's "
                           f"context of {n_ctx} tokens; shorten the prompt or ask for fewer tokens",
                           param="messages" if isinstance(body, ChatRequest) else "prompt", code="context_length_exceeded")
        return ids, Sampling(want, body.temperature, body.top_p, body.seed, list(body.stop or []))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        authorize(request)
        pool = pool_for(request, body.model, "decoder")
        try:
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
            prompt = pool.session.chat_prompt(messages)
        except Exception as exc:  # the artifact's template refused these messages (e.g. a role it has no slot for)
            raise APIError(400, f"the chat template of '{pool.name}' could not render these messages: {exc}",
                           param="messages") from None
        return await generate(request, pool, body, prompt, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        authorize(request)
        pool = pool_for(request, body.model, "decoder")
        return await generate(request, pool, body, body.prompt, chat=False)

    async def generate(request: Request, pool: ModelPool, body, prompt: str, chat: bool):
        ids, sampling = prepare(pool, body, prompt)
        job = Job(asyncio.get_running_loop(), "generate", prompt_ids=ids, sampling=sampling)
        submit(pool, job)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if body.stream:
            return StreamingResponse(_sse(job, rid, created, pool.name, chat, body.include_usage()),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text, finish, usage = [], None, None
        try:
            while finish is None:
                try:
                    event = await asyncio.wait_for(job.events.get(), 0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancelled.set()
                        return Response(status_code=499)
                    continue
                if event[0] == "delta":
                    text.append(event[1])
                elif event[0] == "done":
                    finish, usage = event[1], event[2]
                else:
                    raise APIError(500, event[1], "server_error")
        finally:
            job.cancelled.set()  # no-op once done; stops the worker when this handler is cancelled
        content = "".join(text)
        choice = ({"index": 0, "message": {"role": "assistant", "content": content, "refusal": None},
                   "finish_reason": finish, "logprobs": None} if chat else
                  {"index": 0, "text": content, "finish_reason": finish, "logprobs": None})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": pool.name, "choices": [choice], "usage": usage, "system_fingerprint": None}

    # ------------------------------------------------------------------ embeddings

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request):
        authorize(request)
        pool = pool_for(request, body.model, "encoder")
        texts = body.texts()
        if not texts or len(texts) > limits.max_inputs:
            raise APIError(400, f"input must hold 1 to {limits.max_inputs} texts, not {len(texts)}", param="input")
        dim = getattr(pool.session, "dim", None)
        if body.dimensions is not None and body.dimensions != dim:
            raise APIError(400, f"'{pool.name}' embeds into {dim} dimensions; it cannot return {body.dimensions}",
                           param="dimensions")
        job = Job(asyncio.get_running_loop(), "embed", texts=texts)
        submit(pool, job)
        try:
            event = await job.events.get()
        finally:
            job.cancelled.set()
        if event[0] == "error":
            raise APIError(500, event[1], "server_error")
        _, vectors, n_tokens = event
        data = [{"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)} for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": pool.name,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    return BodyLimit(app, limits.max_body_bytes, limits.body_timeout_s)


def _encode(vector: np.ndarray, fmt: str):
    if fmt == "base64":  # what the official client asks for by default: little-endian float32 bytes
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


def _model_card(pool: ModelPool) -> dict[str, Any]:
    fmt = pool.manifest.get("artifact", {}).get("format")
    return {"id": pool.name, "object": "model", "created": pool.created, "owned_by": "edgekit",
            "edgekit": {"kind": pool.kind, "format": fmt, "runtime": pool.session.runtime, "n_ctx": pool.n_ctx,
                        "sessions": len(pool.sessions), "path": str(pool.path)}}


async def _sse(job: Job, rid: str, created: int, model: str, chat: bool, include_usage: bool) -> AsyncIterator[bytes]:
    """Server-sent events as OpenAI streams them: a role chunk, content deltas, a chunk with the finish
    reason, the usage chunk (empty choices) only when asked, then ``data: [DONE]``."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: str | None, finish: str | None = None, role: bool = False) -> bytes:
        if chat:
            d: dict[str, Any] = {} if delta is None else {"content": delta}
            if role:
                d["role"] = "assistant"
            choice = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        body = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice], "system_fingerprint": None}
        if include_usage:
            body["usage"] = None
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    try:
        if chat:
            yield chunk("", role=True)
        while True:
            event = await job.events.get()
            if event[0] == "delta":
                yield chunk(event[1])
            elif event[0] == "done":
                yield chunk(None, event[1])
                if include_usage:
                    yield b"data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": model,
                                                  "choices": [], "usage": event[2], "system_fingerprint": None}).encode() + b"\n\n"
                break
            else:  # headers are sent: the error travels as an event, as OpenAI's own streams do
                yield b"data: " + json.dumps({"error": {"message": event[1], "type": "server_error", "param": None,
                                                        "code": None}}).encode() + b"\n\n"
                break
        yield b"data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # the client went away (or we finished): the worker stops between tokens
