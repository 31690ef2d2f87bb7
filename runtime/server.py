"""The HTTP layer: thin FastAPI routes over ChatService, the body limit and API key in front, and a
uvicorn server that drains on SIGTERM (new requests get 503, in-flight ones finish, then it exits).
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import time
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime.serving import APIError, ChatService, ClientGone

log = logging.getLogger("dyngraph.server")

PROTECTED = ("/v1/", "/stats")  # /health and /metrics stay open to load balancers and scrapers


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class StreamReply(EventSourceResponse):
    """An SSE response whose clean-up runs however it ends: finished, failed, or cut by the client."""

    def __init__(self, *args, close, **kwargs):
        super().__init__(*args, **kwargs)
        self.close = close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.close()


class Guard:
    """ASGI middleware: the body limit (413) and the API key (401), before any route reads a byte.

    The body is read here, counted, and replayed to the app; a Content-Length over the limit is
    refused without reading at all."""

    def __init__(self, app, max_body_bytes: int, api_key: str | None):
        self.app, self.limit, self.api_key = app, max_body_bytes, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and scope["path"].startswith(PROTECTED):
            scheme, _, key = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
                error = APIError(401, "Incorrect API key provided; send it as 'Authorization: Bearer <key>'", code="invalid_api_key")
                return await error_response(error)(scope, receive, send)
        too_large = APIError(413, f"the request body is larger than the server's limit of {self.limit} bytes (server.max_body_bytes)",
                             code="request_too_large")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await error_response(too_large)(scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await error_response(too_large)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)


def create_app(service: ChatService) -> Guard:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.engine.start()
        yield
        service.engine.stop()

    app = FastAPI(title="dyngraph", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    server = service.server

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, e: ClientGone):
        return Response(status_code=499)  # nobody reads it; the metrics counted it

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return error_response(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                       code="not_found" if e.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal server error: {type(e).__name__}", "server_error"))

    @app.get("/health")
    async def health():
        if service.draining:
            return JSONResponse({"status": "draining", "in_flight": service.in_flight}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/stats")
    async def stats():
        return service.stats()

    @app.post("/stats/reset")
    async def reset_stats():
        return service.reset_stats()

    @app.get("/v1/models")
    async def models():
        return service.models()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        reply = await service.chat(await request.body(), request.is_disconnected)
        if reply.chunks is not None:
            return StreamReply(reply.chunks, headers=reply.headers, close=reply.close)
        return JSONResponse(reply.body, headers=reply.headers)

    return Guard(app, server.max_body_bytes, server.api_key)


class DrainingServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM/SIGINT drains: the service refuses new requests with
    503 while the listening socket stays open, and the server stops once nothing is in flight (or
    after drain_timeout_s). A second signal stops it at once."""

    def __init__(self, config: uvicorn.Config, service: ChatService, drain_timeout_s: float):
        super().__init__(config)
        self.service, self.drain_timeout_s = service, drain_timeout_s
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None):
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame):
        if self.service.draining or self.loop is None:
            self.force_exit = self.service.draining
            self.should_exit = True
            return
        self.service.draining = True
        log.info("%s: draining %d in-flight request(s); new requests get 503", signal.Signals(sig).name, self.service.in_flight)
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self.drain()))

    async def drain(self):
        deadline = time.monotonic() + self.drain_timeout_s
        while self.service.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.service.in_flight:
            log.warning("drain timeout: stopping with %d request(s) in flight", self.service.in_flight)
        self.should_exit = True


def run_server(service: ChatService) -> None:
    cfg = service.server
    config = uvicorn.Config(create_app(service), host=cfg.host, port=cfg.port, log_config=None, access_log=cfg.access_log,
                            timeout_graceful_shutdown=5)
    DrainingServer(config, service, cfg.drain_timeout_s).run()
