"""Request bodies read under a size limit and a deadline, before the application sees them (ASGI middleware
shared by ``edgekit serve`` and ``edgekit agent``). Starlette reads a body whole and without a deadline; a
client announcing or streaming gigabytes, or trickling one byte a minute, must cost the server nothing."""

from __future__ import annotations

import asyncio
from typing import Callable

from fastapi.responses import JSONResponse


def error_response(status: int, message: str, code: str, type_: str = "invalid_request_error") -> JSONResponse:
    """The error envelope both servers answer with: ``{"error": {"message", "type", "param", "code"}}``."""
    return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": code}}, status_code=status)


class BodyLimit:
    """Refuses request bodies over the limit (by Content-Length, or while a chunked body streams in) and
    bodies that do not arrive within ``timeout_s`` (408). The body is read here, at most limit bytes of it,
    and replayed to the app; later messages (a disconnect) pass through. ``limit`` is a number of bytes or a
    function of the ASGI scope (an upload route may take larger bodies than a JSON route)."""

    def __init__(self, app, limit: int | Callable[[dict], int], timeout_s: float = 30.0, status_too_large: int = 400):
        self.app, self.timeout_s, self.status_too_large = app, timeout_s, status_too_large
        self.limit_for = limit if callable(limit) else (lambda scope: limit)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await self._refuse(limit, scope, receive, send)
        body, more = [], True
        size = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while more:
            try:  # a client trickling its body would otherwise hold the connection and its buffer forever
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                resp = error_response(408, f"the request body did not arrive within {self.timeout_s:g} s", "request_timeout")
                return await resp(scope, receive, send)
            if message["type"] != "http.request":  # the client left before sending its body
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await self._refuse(limit, scope, receive, send)
            body.append(chunk)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, limit, scope, receive, send):
        resp = error_response(self.status_too_large, f"the request body exceeds the server's limit of {limit} bytes",
                              "request_too_large")
        await resp(scope, receive, send)


def bind(host: str, port: int):
    """(listening socket, host as it goes in a URL, port): bound before the app starts, so a taken port is one line."""
    import socket

    from edgekit.errors import InputError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port} ({exc.strerror})", "pick another --port (0 picks a free one)") from None
    return sock, (f"[{host}]" if family == socket.AF_INET6 else host), sock.getsockname()[1]


def run_server(app, sock, on_started: Callable[[], None], **uvicorn_options) -> None:
    """Serve ``app`` with uvicorn on ``sock`` until interrupted; ``on_started()`` once it accepts connections."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5, lifespan="off",
                            **uvicorn_options)
    server = uvicorn.Server(config)

    async def started():
        while not server.started:
            await asyncio.sleep(0.01)
        on_started()

    async def main():
        watcher = asyncio.ensure_future(started())
        try:
            await server.serve(sockets=[sock])
        finally:
            watcher.cancel()

    asyncio.run(main())
