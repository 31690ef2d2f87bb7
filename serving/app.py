"""The HTTP layer: thin FastAPI routes over ChatService; in front of them the API key, the rate
limit, the body limit and the slow-client deadlines; the OpenAPI document at /openapi.json; and a
uvicorn server that drains on SIGTERM (new requests get 503, in-flight ones finish, then it exits).
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import logging
import math
import signal
import socket
import time
import wave
from collections import OrderedDict
from contextlib import asynccontextmanager
from typing import Any

import h11
import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from serving.config import RateLimitConfig, ServerConfig
from runtime.metrics import Metrics
from serving.protocol import ChatCompletion, ChatCompletionRequest, ErrorResponse, Health, ModelList
from serving.chat import APIError, ChatService, ClientGone

log = logging.getLogger("dyngraph.server")

VERSION = "0.1.0"
CHAT_ROUTE = "/v1/chat/completions"
REF = "#/components/schemas/{model}"  # where the OpenAPI document keeps its schemas
PROTECTED = ("/v1/", "/stats")  # /health and /metrics stay open to load balancers and scrapers
# one server-sent event as OpenAPI 3.1 describes a stream's items: data is a ChatCompletionChunk's JSON, then "[DONE]"
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"event": {"type": "string"}, "data": {"type": "string"}}}
ERROR_DESCRIPTIONS = {
    400: "a parameter the server cannot take; error.param names it", 401: "no API key, or a wrong one", 404: "an unknown model",
    408: "the request arrived too slowly (server.header_timeout_s, server.body_timeout_s)", 413: "the body is over server.max_body_bytes",
    429: "the queue is full, or the client's rate limit is reached; see Retry-After",
    503: "draining after SIGTERM, or an engine of the request's path failed verification",
}


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


class TokenBuckets:
    """A token bucket per client: `per_second` requests a second on average, bursts of `burst`.

    The buckets kept are bounded: past `max_clients` the least recently seen client's is dropped,
    and a client that comes back starts from a full bucket, as it would after that long anyway."""

    def __init__(self, cfg: RateLimitConfig):
        self.rate, self.burst, self.max_clients = cfg.per_second, cfg.burst, cfg.max_clients
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, when counted)

    def take(self, client: str, now: float) -> float:
        """0 when the request may go ahead, else the seconds until it could."""
        tokens, then = self.buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
        self.buckets[client] = (tokens - 1 if wait == 0 else tokens, now)
        if len(self.buckets) > self.max_clients:
            self.buckets.popitem(last=False)
        return wait


class Guard:
    """ASGI middleware, before any route reads a byte: the API key (401), the rate limit (429), the
    body limit (413) and the body's deadline (408).

    The body is read here, counted, and replayed to the app; a Content-Length over the limit is
    refused without reading at all. Nothing is queued for generation before the whole body is in,
    so a client that sends it slowly holds a connection until the deadline, never a slot."""

    def __init__(self, app, server: ServerConfig, metrics: Metrics):
        self.app, self.limit, self.metrics = app, server.max_body_bytes, metrics
        self.keys = [k.encode() for k in [server.api_key, *server.api_keys] if k]
        self.body_timeout_s = server.body_timeout_s
        self.buckets = TokenBuckets(server.rate_limit) if server.rate_limit.per_second is not None else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        chat = scope["path"] == CHAT_ROUTE

        async def refuse(error: APIError):
            if chat:
                self.metrics.requests.labels(str(error.status)).inc()
            return await error_response(error)(scope, receive, send)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        key = None
        if self.keys and scope["path"].startswith(PROTECTED):
            scheme, _, given = headers.get("authorization", "").partition(" ")
            given = given.strip().encode()
            # every key compared, in constant time each: how long a refusal takes says nothing about the keys
            if scheme.lower() != "bearer" or not any([hmac.compare_digest(given, k) for k in self.keys]):
                return await refuse(APIError(401, "Incorrect API key provided; send it as 'Authorization: Bearer <key>'", code="invalid_api_key"))
            key = given
        if self.buckets is not None and chat:
            client = f"key:{hashlib.sha256(key).hexdigest()}" if key else f"address:{(scope.get('client') or ('unknown',))[0]}"
            wait = self.buckets.take(client, time.monotonic())
            if wait > 0:
                self.metrics.rate_limited.labels(client.partition(":")[0]).inc()
                return await refuse(APIError(429, f"rate limit reached: at most {self.buckets.rate:g} requests per second, bursts of "
                                                  f"{self.buckets.burst}, per {'API key' if key else 'client address'} (server.rate_limit); "
                                                  f"retry in {wait:.1f} s", "rate_limit_error", code="rate_limit_exceeded",
                                             headers={"Retry-After": str(math.ceil(wait))}))
        # the connection stays open: uvicorn reads the rest of the body and drops it (bounded by the header
        # deadline of the next request), so that the client reads the 413 instead of a reset mid-upload
        too_large = APIError(413, f"the request body is larger than the server's limit of {self.limit} bytes (server.max_body_bytes)",
                             code="request_too_large")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await refuse(too_large)
        body, more = bytearray(), True
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    body += message.get("body", b"")
                    more = message.get("more_body", False)
                    if len(body) > self.limit:
                        return await refuse(too_large)
        except TimeoutError:
            self.metrics.client_timeouts.labels("body").inc()
            return await refuse(APIError(408, f"the request body did not arrive within {self.body_timeout_s:g} s (server.body_timeout_s)",
                                         code="request_timeout", headers={"Connection": "close"}))
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)


def timed_protocol(header_timeout_s: float, metrics: Metrics) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline for each request's headers, which uvicorn lacks: a
    client that sends them slowly (slowloris) gets 408 and loses the connection after
    `header_timeout_s`, counted from the connection's start or its previous response."""
    error = json.dumps(APIError(408, f"the request headers did not arrive within {header_timeout_s:g} s (server.header_timeout_s)",
                                code="request_timeout").body()).encode()
    reply = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
             b"content-length: %d\r\n\r\n" % len(error)) + error

    class TimedH11Protocol(H11Protocol):
        header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self.arm()

        def arm(self) -> None:
            self.disarm()
            self.header_timer = self.loop.call_later(header_timeout_s, self.headers_too_slow)

        def disarm(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a new request's headers are in
                self.disarm()

        def on_response_complete(self) -> None:
            if not self.transport.is_closing():
                self.arm()  # first: a pipelined request that the call below starts disarms it again
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self.disarm()
            super().connection_lost(exc)

        def headers_too_slow(self) -> None:
            self.header_timer = None
            if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
                return
            metrics.client_timeouts.labels("headers").inc()
            if self.conn.their_state is h11.IDLE:  # else it still sends the body of a request already refused (413)
                self.transport.write(reply)
            self.transport.close()

    return TimedH11Protocol


def create_app(service: ChatService) -> Guard:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.engine.start()
        yield
        service.engine.stop()

    app = FastAPI(title="dyngraph", version=VERSION, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    server = service.server
    error_content = {"application/json": {"schema": {"$ref": REF.format(model="ErrorResponse")}}}  # whatever the route's own type
    errors = lambda *codes: {c: {"content": error_content, "description": ERROR_DESCRIPTIONS[c]} for c in codes}  # noqa: E731
    protected = (401, 408, 413) if server.api_key or server.api_keys else (408, 413)

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

    @app.get("/health", response_model=Health, response_model_exclude_none=True,
             responses={503: {"model": Health, "description": "draining after SIGTERM"}, **errors(408, 413)})
    async def health():
        if service.draining:
            return JSONResponse(Health(status="draining", in_flight=service.in_flight).model_dump(exclude_none=True), status_code=503)
        degraded = service.degraded()
        return Health(status="degraded", degraded_paths=degraded) if degraded else Health(status="ok")

    @app.get("/metrics", response_class=PlainTextResponse, responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}},
                                                                      **errors(408, 413)})
    async def metrics():
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/stats", responses=errors(*protected))
    async def stats() -> dict[str, Any]:
        return service.stats()

    @app.post("/stats/reset", responses=errors(*protected))
    async def reset_stats() -> dict[str, Any]:
        return service.reset_stats()

    @app.get("/v1/models", response_model=ModelList, responses=errors(*protected))
    async def models():
        return service.models()

    @app.post(CHAT_ROUTE, response_model=ChatCompletion, openapi_extra={"requestBody": {
                  "required": True, "content": {"application/json": {"schema": {"$ref": REF.format(model="ChatCompletionRequest")}}}}},
              responses={200: {"content": {"text/event-stream": {"schema": SSE_EVENT}},
                               "description": "the completion, or with stream=true its chunks as server-sent events"},
                         **errors(400, 404, 429, 503, *protected)})
    async def chat_completions(request: Request):
        reply = await service.chat(await request.body(), request.is_disconnected)
        if reply.chunks is not None:
            return StreamReply(reply.chunks, headers=reply.headers, close=reply.close)
        return JSONResponse(reply.body, headers=reply.headers)

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            request, defs = request_schema(service)
            error = ErrorResponse.model_json_schema(ref_template=REF)
            defs.update(error.pop("$defs"), ErrorResponse=error, ChatCompletionRequest=request)
            doc.setdefault("components", {}).setdefault("schemas", {}).update(defs)
            doc["paths"][CHAT_ROUTE]["post"]["requestBody"]["content"]["application/json"]["examples"] = request_examples(service)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi
    return Guard(app, server, service.metrics)


def request_schema(service: ChatService) -> tuple[dict, dict]:
    """ChatCompletionRequest's JSON schema as this server accepts it: the pydantic model's, narrowed
    by what the service checks beyond it (its model id, the server.max_* limits, the context, the
    parameters it refuses), so that a client or a fuzzer reading it can write a request that is
    answered. Returns the schema and the definitions it refers to."""
    server, engine = service.server, service.engine
    schema = ChatCompletionRequest.model_json_schema(ref_template=REF)
    defs = schema.pop("$defs")
    props = schema["properties"]
    nullable = lambda s: {"anyOf": [s, {"type": "null"}]}  # noqa: E731
    text = {"type": "string", "maxLength": server.max_characters}
    props["model"] = {"type": "string", "enum": [server.model_id], "title": "Model"}
    props["messages"].update(maxItems=server.max_messages)
    for name in ("max_tokens", "max_completion_tokens"):
        props[name] = nullable({"type": "integer", "minimum": 1, "maximum": engine.context_len - 1})
    stop = {"type": "string", "minLength": 1, "maxLength": server.max_stop_chars}
    props["stop"] = {"anyOf": [stop, {"type": "array", "items": stop, "maxItems": server.max_stop}, {"type": "null"}]}
    props["n"] = nullable({"type": "integer", "minimum": 1, "maximum": server.max_n})
    exits = engine.exit_layers if engine.request_override else []
    props["exit_layer"] = nullable({"type": "integer", "enum": exits}) if exits else {"type": "null"}
    defs["ChatMessage"]["properties"]["content"] = {"anyOf": [
        text, {"type": "array", "items": defs["ChatMessage"]["properties"]["content"]["anyOf"][1]["items"],
               "maxItems": server.max_content_parts}, {"type": "null"}]}
    defs["TextPart"]["properties"]["text"] = text
    defs["InputAudio"]["properties"]["format"] = {"type": "string", "enum": ["wav"], "default": "wav"}
    # media a client (or a fuzzer) can start from: random base64 is never an image, so without these
    # no generated request would reach the encoders
    image, audio = example_media()
    defs["ImageURL"]["properties"]["url"]["examples"] = [image]
    defs["InputAudio"]["properties"]["data"]["examples"] = [audio]
    return schema, defs


def request_examples(service: ChatService) -> dict:
    """A request per modality set, as the OpenAPI examples of the request body."""
    image, audio = example_media()
    parts = {"text": [], "image": [{"type": "image_url", "image_url": {"url": image}}],
             "audio": [{"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}}]}
    out = {}
    for name, extra, options in (("text", [], {}), ("image", parts["image"], {"stream": True}),
                                 ("audio", parts["audio"], {"temperature": 0.7, "seed": 1}),
                                 ("image+audio", parts["image"] + parts["audio"], {"stream": True, "stream_options": {"include_usage": True}})):
        content = [{"type": "text", "text": f"What is in this {name}?" if extra else "打开微信"}, *extra]
        out[name] = {"value": {"model": service.server.model_id, "messages": [{"role": "user", "content": content}], "max_tokens": 8, **options}}
    return out


def example_media() -> tuple[str, str]:
    """An 8x8 PNG as a data URL and a quarter second of 16 kHz WAV as base64."""
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (40, 120, 200)).save(png, format="PNG")
    wav = io.BytesIO()
    with wave.open(wav, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.sin(np.arange(4000) * 2 * np.pi * 440 / 16000) * 8000).astype("<i2").tobytes())
    return "data:image/png;base64," + base64.b64encode(png.getvalue()).decode(), base64.b64encode(wav.getvalue()).decode()


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


def bind_socket(cfg: ServerConfig) -> socket.socket:
    """The server's socket on server.host:server.port, bound but not listening: taken before the
    engines load, so that a port in use is refused before anything says it is serving, while
    connections are still refused (not queued) until the app is ready. Raises OSError."""
    sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait out TIME_WAIT
    try:
        sock.bind((cfg.host, cfg.port))
    except OSError:
        sock.close()
        raise
    return sock


def run_server(service: ChatService, sock: socket.socket) -> None:
    """Serve on a socket from bind_socket (uvicorn listens on it) until stopped."""
    cfg = service.server
    config = uvicorn.Config(create_app(service), host=cfg.host, port=cfg.port, log_config=None, access_log=cfg.access_log,
                            timeout_graceful_shutdown=5, http=timed_protocol(cfg.header_timeout_s, service.metrics))
    DrainingServer(config, service, cfg.drain_timeout_s).run(sockets=[sock])
