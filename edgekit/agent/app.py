"""The agent's HTTP API (protocol version 1; see the README's "On-device profiling" section).

    GET    /health                         open: {"status", "agent", "protocol", "version"}
    GET    /v1/device                      device facts (OS, CPU, RAM, accelerators, runtimes, thermal)
    GET    /v1/storage                     quota, usage, bytes received
    HEAD   /v1/blobs/{sha256}              200 when stored, 404 otherwise
    GET    /v1/uploads/{sha256}            {"offset", "total", "complete"} of an upload (404: none)
    PUT    /v1/blobs/{sha256}?offset=&total=   one chunk (header X-Chunk-Sha256); resumable
    POST   /v1/artifacts                   {"files": [{"path", "sha256", "bytes"}]} -> {"artifact": id}
    POST   /v1/jobs                        a JobSpec -> 202 {"id", "state"}
    GET    /v1/jobs/{id}?since=N           state, progress events from N, result or error
    GET    /v1/jobs/{id}/events            the same as server-sent events until the job ends
    DELETE /v1/jobs/{id}                   cancel

Errors are ``{"error": {"message", "type", "param", "code"}}`` with extra fields where a client needs them
(``offset`` for a resumed upload, ``missing`` for blobs to send).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgekit.agent import auth
from edgekit.agent.jobs import FINISHED, JobRunner
from edgekit.agent.spec import JobSpec
from edgekit.agent.store import BlobStore, StoreError, check_digest
from edgekit.httpbody import BodyLimit

PROTOCOL = 1
log = logging.getLogger("edgekit.agent")


@dataclass
class AgentLimits:
    max_json_bytes: int = 1 << 20  # artifact lists and job specs
    max_chunk_bytes: int = 16 << 20  # one upload request
    body_timeout_s: float = 60.0


def _error(status: int, message: str, code: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                                   "param": None, "code": code, **extra}}, status_code=status)


def create_app(store: BlobStore, runner: JobRunner, token: str, limits: AgentLimits | None = None):
    from edgekit import __version__

    limits = limits or AgentLimits()
    app = FastAPI(title="edgekit agent", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(StoreError)
    async def _store_error(request: Request, exc: StoreError):
        return _error(exc.status, exc.message, exc.code, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = (exc.errors() or [{}])[0]
        loc = ".".join(str(x) for x in first.get("loc", ())[1:])
        msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        if first.get("type") == "json_invalid":
            msg, loc = "the body is not valid JSON", ""
        return _error(400, f"{loc}: {msg}" if loc else msg, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                      "not_found" if exc.status_code == 404 else "http_error")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, f"internal error: {type(exc).__name__}", "internal_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "agent": "edgekit", "protocol": PROTOCOL, "version": __version__}

    @app.get("/v1/device")
    def device_facts():
        from edgekit.agent import device

        return device.facts() | {"protocol": PROTOCOL, "version": __version__, "jobs_running": runner.running()}

    @app.get("/v1/storage")
    def storage():
        return store.summary() | {"max_chunk_bytes": limits.max_chunk_bytes, "max_json_bytes": limits.max_json_bytes}

    @app.head("/v1/blobs/{digest}")
    def head_blob(digest: str):
        size = store.has(check_digest(digest))
        if size is None:
            return Response(status_code=404)
        return Response(status_code=200, headers={"Content-Length": str(size), "X-Blob-Size": str(size)})

    @app.get("/v1/uploads/{digest}")
    def upload_status(digest: str):
        st = store.upload_status(digest)
        if st is None:
            raise StoreError(404, "no_upload", "no upload of this blob is in progress", offset=0)
        return st

    @app.put("/v1/blobs/{digest}")
    async def put_blob(digest: str, request: Request, offset: int, total: int):
        data = await request.body()
        return await asyncio.to_thread(store.put_chunk, digest, offset, total, data, request.headers.get("x-chunk-sha256"))

    @app.post("/v1/artifacts")
    async def create_artifact(request: Request):
        body = await _json(request)
        if not isinstance(body, dict) or set(body) - {"files", "name"}:
            raise StoreError(400, "invalid_artifact", "the body is {\"files\": [...], \"name\": optional}")
        return await asyncio.to_thread(store.create_artifact, body.get("files"))

    @app.post("/v1/jobs", status_code=202)
    def submit(spec: JobSpec):
        job = runner.submit(spec.model_dump())
        return {"id": job.id, "state": job.state}

    @app.get("/v1/jobs/{job_id}")
    def job_state(job_id: str, since: int = 0):
        return runner.get(job_id).public(max(0, since))

    @app.delete("/v1/jobs/{job_id}")
    def cancel(job_id: str):
        return {"id": job_id, "state": runner.cancel(job_id).state}

    @app.get("/v1/jobs/{job_id}/events")
    async def events(job_id: str, request: Request):
        job = runner.get(job_id)

        async def stream():
            sent = 0
            while True:
                while sent < len(job.events):
                    yield f"event: progress\ndata: {json.dumps(job.events[sent])}\n\n"
                    sent += 1
                if job.state in FINISHED:
                    yield f"event: {job.state}\ndata: {json.dumps({'result': job.result, 'error': job.error})}\n\n"
                    return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(0.2)

        return StreamingResponse(stream(), media_type="text/event-stream")

    def limit_for(scope) -> int:
        upload = scope.get("method") == "PUT" and scope.get("path", "").startswith("/v1/blobs/")
        return limits.max_chunk_bytes if upload else limits.max_json_bytes

    return AuthGate(BodyLimit(app, limit_for, limits.body_timeout_s, status_too_large=413), token)


class AuthGate:
    """Checks the token from the request's headers before any body is read: a client without the token
    costs the agent one header parse, whatever it announces."""

    def __init__(self, app, token: str):
        self.app, self.token = app, token

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path") != "/health":
            header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            if not auth.authorized(header, self.token):
                resp = _error(401, "invalid or missing agent token (send `Authorization: Bearer TOKEN`; the agent "
                              "printed it when it first started)", "invalid_token")
                return await resp(scope, receive, send)
        return await self.app(scope, receive, send)


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (ValueError, RecursionError):
        raise StoreError(400, "invalid_json", "the body is not valid JSON") from None
