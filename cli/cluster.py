"""Replicas of the engine chain behind one OpenAI endpoint, on Ray Serve (`cluster=ray`).

One plain Serve deployment, `chain`: each replica builds the same ChatService as the
single-process server (build_service: a whole engine chain for the runtime placement, its own
continuous batching) and serves the same FastAPI app around it (create_app: routes, protocol,
limits, API key, error objects), so the per-token loop never leaves a replica: a request crosses
Ray once, as HTTP bytes in and SSE bytes out. Serve's proxy on server.host:server.port routes each
request to the less loaded of two replicas (its default power-of-two choices), restarts a replica
that dies or fails its health check, and scales between min and max replicas when autoscaling.

Every response names its replica: the `x-dyngraph-replica` header, and the `dyngraph` field's
`replica` (`<replica id>/<pid>@<node ip>`). /metrics answers from the replica the request reached.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING

import ray
from ray import serve
from starlette.middleware import Middleware

from serving.protocol import ErrorBody, ErrorResponse

if TYPE_CHECKING:  # Serve's proxies import this module for ReplicaLost: they need neither torch nor the engines
    from serving.config import ServeApp

log = logging.getLogger("dyngraph.cluster")

APP_NAME = "dyngraph"
DEPLOYMENT = "chain"
REPLICA_HEADER = b"x-dyngraph-replica"
# Serve's proxies read their middleware from this import path in their environment (serve_on_ray
# sets it before starting Ray here; on a cluster started with `ray start`, export it there)
PROXY_CALLBACK = ("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "runtime.cluster.proxy_middlewares")


class ReplicaLost:
    """Serve proxy middleware: what the proxy would answer on its own becomes an OpenAI error object.

    - A replica that dies (or is cut off) before the status line: 503 with Retry-After (the openai
      client retries it by itself, and Serve routes the retry to a live replica), not a bare 500.
    - Mid-stream: an SSE `data: {"error": ...}` event, which the openai client raises, then the
      stream's end, not a truncated body.
    - No application to route to (starting, or deleted while stopping): 503, not the proxy's 404."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = finished = stream = unrouted = False

        async def watched(message):
            nonlocal started, finished, stream, unrouted
            if message["type"] == "http.response.start":
                headers = message.get("headers", [])
                if message["status"] == 404 and not any(k.lower() == REPLICA_HEADER for k, _ in headers):
                    unrouted = True  # the proxy's own 404: our application routes every path, so none is deployed
                    return
                started = True
                stream = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)
            elif unrouted:
                return
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception:  # noqa: BLE001 - the proxy logged it; the client still gets an answer below
            log.warning("%s %s failed in the proxy", scope.get("method"), scope["path"], exc_info=True)
        if finished:
            return
        if unrouted:
            error = proxy_error("no replica is serving: the application is starting or shutting down; retry shortly", "no_replica")
        else:
            error = proxy_error("the replica serving this request stopped before its response was complete; "
                                "retry it (another replica takes it)", "replica_unavailable")
        if not started:
            body = error.model_dump_json().encode()
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"retry-after", b"1")]})
            await send({"type": "http.response.body", "body": body})
        elif stream:
            await send({"type": "http.response.body", "body": b"data: " + error.model_dump_json().encode() + b"\n\n"})
        else:
            await send({"type": "http.response.body", "body": b""})


def proxy_error(message: str, code: str) -> ErrorResponse:
    return ErrorResponse(error=ErrorBody(message=message, type="server_error", code=code))


def proxy_middlewares() -> list[Middleware]:
    return [Middleware(ReplicaLost)]


class NameReplica:
    """ASGI middleware: the replica's name in a header on every response, errors included."""

    def __init__(self, app, replica: str):
        self.app, self.header = app, (REPLICA_HEADER, replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def named(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, named)


def replica_logging() -> None:
    """The runtime's log lines ([DYNAMIC GRAPH] decisions, engine loads) on the replica's stderr,
    which Ray forwards to the driver prefixed with the replica's actor name and pid."""
    logger = logging.getLogger("dyngraph")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(levelname)s] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


@serve.deployment(name=DEPLOYMENT)
@serve.ingress()
class ChainReplica:
    """One replica: a whole engine chain and the FastAPI app around it."""

    def __init__(self, app: ServeApp, export_command: str):
        import torch  # here, not at the top: Serve's proxies import this module for ReplicaLost and run no engines

        from serving.app import create_app
        from cli.assemble import build_service

        self.create_app = create_app
        replica_logging()
        # as in cli/serve.py: torch only glues engine calls together, its threads would contend with ONNX Runtime's;
        # and ONNX Runtime gets the CPUs Ray reserved for this replica, not every core of the machine
        torch.set_num_threads(1)
        os.environ.setdefault("DYNGRAPH_CPU_THREADS", str(max(1, int(app.cluster.num_cpus))))
        context = serve.get_replica_context()
        self.name = f"{context.replica_tag}/{os.getpid()}@{ray.util.get_node_ip_address()}"
        self.service = build_service(app, export_command)
        self.service.replica = self.name
        log.info("replica %s ready (placement %s)", self.name, app.runtime.placement.name)

    def __serve_build_asgi_app__(self):
        return NameReplica(self.create_app(self.service), self.name)

    def check_health(self) -> None:
        """Serve calls this every health_check_period_s; a failure replaces the replica."""
        if not self.service.engine.alive():
            raise RuntimeError(f"replica {self.name}: the generation engine's thread has stopped")


def gpus_per_replica(app: ServeApp) -> float:
    if app.cluster.num_gpus is not None:
        return app.cluster.num_gpus
    return float(len({d for d in app.runtime.placement.devices if d.startswith("cuda")}))


def deployment_options(app: ServeApp) -> dict:
    """Serve's options for the chain deployment, derived from the cluster and runtime configs."""
    c, runtime = app.cluster, app.runtime
    options = {
        "ray_actor_options": {"num_cpus": c.num_cpus, "num_gpus": gpus_per_replica(app)},
        # a replica admits what its engine can hold or queue; past that its own 429 answers, as the single server's does
        "max_ongoing_requests": c.max_ongoing_requests or runtime.max_batch_size + runtime.max_queue,
        "health_check_period_s": c.health_check_period_s,
        "graceful_shutdown_timeout_s": app.server.drain_timeout_s,  # a stopping replica finishes its requests first
        "max_constructor_retry_count": 3,  # a replica that cannot load its engines says so soon, not after 20 tries
        # Serve's per-request access line, as the single server's server.access_log (off: on 2 cores, every line that
        # Ray forwards to the driver costs the replicas CPU)
        "logging_config": {"enable_access_log": app.server.access_log},
    }
    c.check()
    if c.autoscaling.enabled:
        a = c.autoscaling
        options["autoscaling_config"] = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                         "target_ongoing_requests": a.target_ongoing_requests}
    else:
        options["num_replicas"] = c.num_replicas
    return options


def application(app: ServeApp, export_command: str) -> serve.Application:
    return ChainReplica.options(**deployment_options(app)).bind(app, export_command)


def replica_count(app: ServeApp) -> str:
    a = app.cluster.autoscaling
    return f"{a.min_replicas}-{a.max_replicas} replicas (autoscaling)" if a.enabled else f"{app.cluster.num_replicas} replica(s)"


class ClusterError(ValueError):
    """The deployment cannot run; the message says why."""


def check_fits(app: ServeApp) -> None:
    """On a Ray started here nothing will join later: a replica that does not fit would wait forever."""
    have = ray.cluster_resources()
    need = {"CPU": app.cluster.num_cpus, "GPU": gpus_per_replica(app)}
    if any(n > have.get(k, 0.0) for k, n in need.items()):
        raise ClusterError(f"one replica of the {app.runtime.placement.name} placement needs {need['CPU']:g} CPU and {need['GPU']:g} GPU, "
                           f"the Ray started here has {have.get('CPU', 0):g} CPU and {have.get('GPU', 0):g} GPU "
                           "(cluster.num_cpus, cluster.num_gpus, cluster.local_cpus; or join a cluster with cluster.address)")


def replica_failure() -> str | None:
    """The last line of the error a failed replica reported to Serve (its exception)."""
    try:
        message = serve.status().applications[APP_NAME].deployments[DEPLOYMENT].message
    except Exception:  # noqa: BLE001 - nothing more to say than serve.run's own error
        return None
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[-1] if lines else None


def serve_on_ray(app: ServeApp, export_command: str) -> None:
    """Deploy the chain on Ray (started here, or the cluster at cluster.address) and serve until
    SIGTERM/SIGINT; then delete the application and, if this process started Ray, stop it."""
    c = app.cluster
    here = c.address is None
    os.environ.setdefault(*PROXY_CALLBACK)  # a Ray started here passes it on to its proxies
    ray.init(address=c.address, num_cpus=c.local_cpus if here else None, include_dashboard=False,
             namespace=APP_NAME, log_to_driver=True)
    stop = threading.Event()

    def on_signal(*_):
        if stop.is_set():
            raise KeyboardInterrupt  # a second signal: stop now, without waiting for the replicas
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):  # in place of Ray's, which abort the driver
        signal.signal(sig, on_signal)
    try:
        if here:
            check_fits(app)
        serve.start(http_options={"host": app.server.host, "port": app.server.port})
        try:
            serve.run(application(app, export_command), name=APP_NAME, route_prefix="/")
        except RuntimeError as e:  # a replica that could not start: say why, in one line
            raise ClusterError(f"the Ray Serve deployment failed: {replica_failure() or e}") from None
        log.info("serving %s through Ray Serve: %s of the %s placement (%.3g CPU, %.3g GPU each) on http://%s:%d",
                 app.model.name, replica_count(app), app.runtime.placement.name, c.num_cpus, gpus_per_replica(app),
                 app.server.host, app.server.port)
        stop.wait()
        log.info("stopping: replicas finish their requests (up to %.0f s, server.drain_timeout_s), new ones get 503",
                 app.server.drain_timeout_s)
        serve.delete(APP_NAME)  # the proxies stay up meanwhile, so in-flight streams reach their clients
    finally:
        if here:
            serve.shutdown()
        elif APP_NAME in serve.status().applications:  # a failed deployment, or a second signal: leave no application behind
            serve.delete(APP_NAME)
        ray.shutdown()  # the Ray started here stops; a cluster at cluster.address stays
