"""Typed schemas of `python -m runtime.serve` above the runtime (registered in Hydra's ConfigStore by
the entry points): how the endpoint is exposed (`server`, its rate limit), how many replicas serve
it (`cluster`), and `ServeApp`, the whole composed config of conf/serve.yaml: the model and export
groups say which engines to serve (<engines_dir>/<model.name>/<export.backend>/), the runtime group
where and how to run them. Only the entry points (cli/) touch Hydra; everything else takes these.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from contract.config import ExportApp
from runtime.config import RuntimeConfig


@dataclass
class RateLimitConfig:
    # a token bucket per API key (with no key configured: per client address) on /v1/chat/completions:
    # `per_second` requests a second on average, bursts of up to `burst`; past that 429 with Retry-After
    per_second: float | None = None  # null: no rate limit
    burst: int = 10
    max_clients: int = 10_000  # buckets kept; the least recently seen client's is dropped (it had refilled)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    model_id: str = "autoglm-phone-9b"  # the name /v1/models lists and requests must use
    api_key: str | None = None  # Bearer key for /v1 and /stats; DYNGRAPH_API_KEY in the environment also sets it
    api_keys: list[str] = field(default_factory=list)  # more accepted keys, one per user: each gets its own rate limit
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)
    # limits that bound the work of one request, checked before anything is decoded or tokenized:
    # a body over max_body_bytes gets 413, the others 400 naming the parameter
    max_body_bytes: int = 32 << 20
    max_messages: int = 256
    max_content_parts: int = 64  # per message
    max_characters: int = 1_000_000  # text characters over all messages (the context bounds the tokens anyway)
    max_stop: int = 4  # stop strings per request (OpenAI's limit)
    max_stop_chars: int = 256  # characters per stop string
    max_n: int = 8  # choices per request (n); each is a sequence of its own, taking a slot
    max_image_pixels: int = 16_000_000  # width * height, read from the header before anything is decoded (Pillow refuses > 179 M itself)
    max_images: int = 1  # image parts per request
    allowed_image_hosts: list[str] = field(default_factory=list)  # remote image URLs are fetched only from these
    image_fetch_timeout_s: float = 10.0
    max_audio_seconds: float | None = None  # default and upper bound: what the audio encoder was exported for
    # slow clients: a request's headers must arrive within header_timeout_s of the connection opening
    # (or of the previous response on it), its body within body_timeout_s of the headers; else 408 and
    # the connection is closed. Neither holds a generation slot: one is taken only once the body is in
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    drain_timeout_s: float = 120.0  # after SIGTERM, how long in-flight requests may take before the server stops anyway
    retry_after_s: int = 1  # the Retry-After of a 429 for a full queue, and of a 503 while draining
    access_log: bool = False

    def check(self) -> None:
        """A port that cannot be bound, and limits and timeouts that would refuse everything, or
        nothing, are a configuration mistake (ValueError, one line)."""
        if not 1 <= self.port <= 65535:
            raise ValueError(f"server.port={self.port} must lie in 1..65535")
        for name in ("max_body_bytes", "max_messages", "max_content_parts", "max_characters", "max_stop_chars", "max_n", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"server.{name}={getattr(self, name)} must be at least 1")
        for name in ("max_stop", "max_images"):
            if getattr(self, name) < 0:
                raise ValueError(f"server.{name}={getattr(self, name)} must not be negative")
        for name in ("header_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"server.{name}={getattr(self, name)} must be positive")
        rate = self.rate_limit
        if rate.per_second is not None and not (rate.per_second > 0 and rate.burst >= 1 and rate.max_clients >= 1):
            raise ValueError(f"server.rate_limit: per_second={rate.per_second} must be positive (or null: off), "
                             f"burst={rate.burst} and max_clients={rate.max_clients} at least 1")


@dataclass
class AutoscalingConfig:
    # on: Serve adds or removes replicas between min and max to keep each replica's in-flight
    # requests near the target; off: cluster.num_replicas replicas
    enabled: bool = False
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 4.0


@dataclass
class ClusterConfig:
    """How many copies of the engine chain serve the endpoint (cli/cluster.py)."""

    name: str = "local"  # local: this process serves; ray: a Ray Serve deployment whose replicas each hold a whole engine chain
    address: str | None = None  # an existing Ray cluster ("auto", "HOST:6379"); null: start one on this machine
    local_cpus: int | None = None  # CPUs a Ray started here offers (null: every core); ignored with an address
    num_replicas: int = 2
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    num_cpus: float = 1.0  # per replica; on the cpu placement also ONNX Runtime's intra-op threads (DYNGRAPH_CPU_THREADS wins)
    num_gpus: float | None = None  # per replica; null: the GPUs its placement uses (cpu 0, one_gpu 1, two_gpu 2)
    max_ongoing_requests: int | None = None  # per replica; null: runtime.max_batch_size + runtime.max_queue
    health_check_period_s: float = 2.0  # a replica whose engine thread died is replaced after one failed check

    def check(self) -> None:
        if self.autoscaling.enabled:
            a = self.autoscaling
            if not 0 < a.min_replicas <= a.max_replicas:
                raise ValueError(f"cluster.autoscaling: need 0 < min_replicas ({a.min_replicas}) <= max_replicas ({a.max_replicas})")
        elif self.num_replicas < 1:
            raise ValueError(f"cluster.num_replicas={self.num_replicas}: need at least one replica")


@dataclass
class ServeApp(ExportApp):
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tokenizer: str | None = None  # a directory with tokenizer.json; default: model.checkpoint's, else the built-in byte-level one

