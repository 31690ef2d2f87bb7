"""Typed schemas of `python -m runtime.serve` (registered in Hydra's ConfigStore by the entry points).

conf/serve.yaml composes them: the model and export groups say which engines to serve
(<engines_dir>/<model.name>/<export.backend>/), the runtime group where and how to run them,
`server` how to expose them. Only runtime/serve.py touches Hydra; everything else takes these.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from contract.config import ExportApp


@dataclass
class PlacementConfig:
    name: str = "cpu"
    devices: list[str] = field(default_factory=lambda: ["cpu"])
    # devices[i] holds the decoder layers from first_layers[i] up to first_layers[i + 1]; the
    # embedding, the encoders and the shared LM head live on devices[0]: an exit on another device
    # sends its hidden state back to the head
    first_layers: list[int] = field(default_factory=lambda: [0])


@dataclass
class PolicyConfig:
    name: str = "heuristic"  # heuristic | confidence
    force_exit: int | None = None  # every request exits here, whatever the policy says (comparisons, tests)
    request_override: bool = False  # let a request choose its exit with the `exit_layer` body field (probes, benchmarks)
    # heuristic: score = length + question + media terms, clipped to [0, 1]; a request exits at the
    # i-th exit for the first i with score < thresholds[i], and at full depth when there is none
    # e.g. "你是谁?" scores 0.15 (exit 6); a 400-character request to analyse something 0.7 (full depth)
    thresholds: list[float] = field(default_factory=lambda: [0.2, 0.4, 0.6])
    length_chars: int = 400  # characters of the user's text that earn the whole length weight
    length_weight: float = 0.4
    question_weight: float = 0.3  # reasoning cues ("why", "explain", "step by step") earn all, a plain question half
    image_weight: float = 0.3
    audio_weight: float = 0.2
    # confidence: prefill one segment at a time, stopping at the first exit whose top-1 probability reaches its
    # threshold: null takes the per-exit thresholds calibrated into the engines (python -m pipeline calibrate),
    # and 0.9 at every exit when they have none; a number is that threshold at every exit
    confidence: float | None = None


@dataclass
class OffloadConfig:
    # Modules on demand, dynamic mode only (static keeps every engine resident: it is the baseline).
    # on: only what every request needs (embedding, segment.0, head) loads at start; the encoders,
    # cross-attention blocks and deep segments load on a background thread when a request needs them
    # (the request waits, the others keep decoding), and unload after `idle_unload_s` unused or, under
    # `gpu_memory_budget_gb`, least recently used first. off: every engine of the mode loads at start.
    enabled: bool = True
    gpu_memory_budget_gb: float = 0.0  # engine weights per device (on the cpu placement: host memory); 0 = no limit
    idle_unload_s: float = 30.0  # an on-demand engine unused this long unloads (with its segment's KV buffer); 0 = never
    # where a load reads the engine files from: false, the files (the page cache; hashed once, at start-up on a
    # background thread, and again only if they change); true keeps them in host memory (pinned, for a GPU)
    # after the first read, for a disk too slow to reread. False by default: on one H200, ONNX Runtime 1.31 built a
    # 3.4 GiB phone-9b segment's CUDA session in 0.4 s from the files (unhashed) and in 5.9-6.5 s from a host copy (README)
    host_copy: bool = False


@dataclass
class SpeculationConfig:
    # Self-speculative decoding (runtime/speculation.py): a request whose path runs deeper than the draft
    # exit drafts tokens through its first segments and the shared head, then its deeper segments check
    # them all in one pass; the answer is the full path's (greedy: token for token; sampled: the same
    # distribution). A request turns it on or off with `speculative` (extra_body), and picks `draft_exit`.
    enabled: bool = False
    draft_exit: int | None = None  # the exit that drafts; null: the first. Must be an exit short of the last
    draft_tokens: int = 4  # tokens drafted before each verification (k); adaptive: the most
    # adaptive: after a verification that accepted every draft, two more next time; after one that did not, one
    # fewer, at least one (Hugging Face's heuristic for assisted generation)
    adaptive: bool = False
    # a verification runs one sequence at a time (GroupQueryAttention takes several new tokens after a past for
    # one row only), while a decode step serves every row at once: above this many sequences decoding together,
    # requests decode without drafting
    max_batch: int = 1
    # the draft's engines: null, the served export's own; int8 or int4, that weight quantization of the same export
    # (python -m pipeline export export.quantize=...), read by drafts in steps where every sequence drafts: fewer
    # bytes a draft step, while the verification, from the embedding then, stays the served export's
    draft_quantize: str | None = None


@dataclass
class RuntimeConfig:
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    mode: str = "dynamic"  # dynamic | static (also forced by ENABLE_DYNAMIC_GRAPH=False)
    backend: str = "engines"  # engines: the export's files, verified; eager: the torch modules they were exported from (exporters/eager.py)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    max_batch_size: int = 8  # requests generating at once (a cache row each in the segments they reach); one decode step runs them all
    max_queue: int = 64  # requests waiting for a slot; one more is refused with 429
    max_context: int | None = None  # prompt + completion tokens; default and upper bound: the export's context
    cuda_graphs: bool = False  # decode steps replay CUDA graphs their sessions captured, one per batch size (the GPU placements turn it on)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    speculation: SpeculationConfig = field(default_factory=SpeculationConfig)
    verify: bool = True  # sha256 of every engine file against the manifest before it is loaded


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
    """How many copies of the engine chain serve the endpoint (runtime/cluster.py)."""

    name: str = "local"  # local: this process serves; ray: a Ray Serve deployment whose replicas each hold a whole engine chain
    address: str | None = None  # an existing Ray cluster ("auto", "HOST:6379"); null: start one on this machine
    local_cpus: int | None = None  # CPUs a Ray started here offers (null: every core); ignored with an address
    num_replicas: int = 2
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    num_cpus: float = 1.0  # per replica; on the cpu placement also ONNX Runtime's intra-op threads (DYNGRAPH_CPU_THREADS wins)
    num_gpus: float | None = None  # per replica; null: the GPUs its placement uses (cpu 0, one_gpu 1, two_gpu 2)
    max_ongoing_requests: int | None = None  # per replica; null: runtime.max_batch_size + runtime.max_queue
    health_check_period_s: float = 2.0  # a replica whose engine thread died is replaced after one failed check


@dataclass
class ServeApp(ExportApp):
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tokenizer: str | None = None  # a directory with tokenizer.json; default: model.checkpoint's, else the built-in byte-level one

