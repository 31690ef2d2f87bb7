"""Typed schemas of the runtime: where the engines run (placement), how depth is decided (policy),
batching, CUDA graphs and modules on demand. conf/runtime/*.yaml sets them; the server's own
settings (`server`, `cluster`) and the whole serve config (`ServeApp`) are serving/config.py's.
"""
from __future__ import annotations

from dataclasses import dataclass, field


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
    # after the first read, for a disk too slow to reread. False by default: ONNX Runtime builds a CUDA session from
    # the files an order of magnitude faster than from a host copy (README, modules on demand, has the figures)
    host_copy: bool = False

    def check(self) -> None:
        if self.gpu_memory_budget_gb < 0 or self.idle_unload_s < 0:
            raise ValueError(f"runtime.offload.gpu_memory_budget_gb={self.gpu_memory_budget_gb} and "
                             f"idle_unload_s={self.idle_unload_s} must not be negative (0: no limit, never)")


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
class PrefixCacheConfig:
    # Prompts' keys/values kept by content (runtime/prefix.py): a later request whose prompt starts with the same
    # blocks of tokens (a system prompt, earlier turns, after the same media) copies them into its cache rows and
    # prefills only the rest. Exact: the rest is prefilled in the same chunks as without the cache.
    enabled: bool = True
    block_tokens: int = 16  # tokens per cached block: a prompt's prefix is reused in whole blocks
    memory_gb: float = 1.0  # per device, the blocks of every segment together; least recently used blocks go first
    # true: positions are reused (and kept) in whole prefill chunks (the export's seq, 512), which the uncached prefill
    # computes in the same shapes: the same bits on a GPU too. false: in whole blocks, for more reuse; on a GPU in fp16
    # the positions after the reused blocks then run in other kernel shapes than uncached, which round differently
    # (on the CPU in fp32 the tokens are the same either way)
    exact: bool = True

    def check(self) -> None:
        if self.block_tokens < 1 or self.memory_gb < 0:
            raise ValueError(f"runtime.prefix_cache.block_tokens={self.block_tokens} must be at least 1 and "
                             f"memory_gb={self.memory_gb} must not be negative")


@dataclass
class RuntimeConfig:
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    mode: str = "dynamic"  # dynamic | static (also forced by ENABLE_DYNAMIC_GRAPH=False)
    backend: str = "engines"  # engines: the export's files, verified; eager: the torch modules they were exported from (exporters/eager.py)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    max_batch_size: int = 8  # requests generating at once (a cache row each in the segments they reach); one decode step runs them all
    max_queue: int = 64  # requests waiting for a slot; one more is refused with 429
    max_context: int | None = None  # prompt + completion tokens; default and upper bound: the export's context
    # prompt chunks run at a few fixed lengths (powers of two from 16, and the export's seq), each warmed at start:
    # a GPU session's first run at a new length is slow, and nearly every prompt has a new one (runtime/step.py);
    # the GPU placements turn it on. Off, a chunk runs at its own length: no padding to compute on a CPU
    prefill_padding: bool = False
    cuda_graphs: bool = False  # decode steps replay CUDA graphs their sessions captured, one per batch size (the GPU placements turn it on)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    speculation: SpeculationConfig = field(default_factory=SpeculationConfig)
    prefix_cache: PrefixCacheConfig = field(default_factory=PrefixCacheConfig)
    verify: bool = True  # sha256 of every engine file against the manifest before it is loaded
