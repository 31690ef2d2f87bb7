"""The engine cut: which part of the model becomes which engine, with what tensors and dynamic axes,
and which engines each dynamic path chains.

Everything downstream derives from the declarations here: torch.export's dynamic shapes, the
ONNX axis names, TensorRT's optimisation profiles, the validation shapes and the manifest that
the runtime binds tensors by. Dynamic engines hold disjoint weights (a test checks it):

  embed          input_ids -> hidden                          (token embedding)
  vision, audio  pixels / log-mel -> media tokens             (encoders + projectors)
  cross_kv.k     media -> cross_kv                            (segment k's media keys/values, once per request)
  cross_attn.k   hidden, cross_kv, media_mask -> hidden_out   (gated cross-attention, only with media)
  segment.k      hidden, seqlens_k, total_sequence_length, past_key.i, past_value.i
                   -> hidden_out, exit_hidden, present_key.i, present_value.i   (in place: see below)
  lm_head        exit_hidden -> logits                        (shared by every exit)

Prefill and decode share every engine through the dynamic `seq` axis. A segment's cache is
in place, as ONNX Runtime's GroupQueryAttention keeps it: per layer, keys and values
[batch, kv_heads, capacity, head_dim] are bound as both past input and present output (the same
memory); row b holds `seqlens_k[b] + 1 - seq` entries before the call and the engine writes the
`seq` new ones right after them, touching nothing else. Nothing is concatenated or allocated per
step, so a decode step has one shape per batch size and can be captured as a CUDA graph.

The static baseline runs the same engines as a fixed graph: both encoders (placeholders, masked,
when a modality is absent), every cross-attention block and all 24 layers, whatever the input.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch
from torch import nn

from model.autoglm import AutoGLM
from model.glm import Segment

MODALITY_SETS: list[tuple[str, ...]] = [("text",), ("text", "image"), ("text", "audio"), ("text", "image", "audio")]


@dataclass(frozen=True)
class Dim:
    """A dynamic axis: its range, and the sizes that validation runs at (the second one also traces)."""

    name: str
    min: int
    max: int
    probes: tuple[int, int]
    multiple: int = 1  # sizes are multiples of this (audio frames)

    @property
    def trace(self) -> int:
        # torch.export specialises example sizes 0 and 1, so trace at the larger probe
        return self.probes[1]

    @property
    def opt(self) -> int:
        """A typical size, for TensorRT's profile optimum."""
        return max(self.min, min(self.max, self.probes[1]))


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]  # ints are fixed; strings name a Dim or an expression of Dims ("audio_frames/8")
    dtype: str  # "float" (the export dtype), "int64", "int32" or "bool"
    fill: str = "normal"  # how validation draws it: normal | tokens | media_mask | seqlens | total_length
    high: int = 0  # exclusive upper bound of "tokens"
    inplace_of: str | None = None  # an output written into this input's memory (a session binds both to one buffer)


@dataclass
class EngineSpec:
    name: str
    graph: str  # engines with the same graph differ only in weights and share one trace
    module: nn.Module  # forward(*inputs in order) -> outputs in order
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    config: dict  # the model config this engine depends on (cache key)
    layers: tuple[int, int] | None = None  # decoder layers [first, end) it runs, for placement
    fused: bool = False  # the backend builds it from fused operators (a segment) instead of tracing `module`
    probes: tuple[dict[str, int], ...] = ()  # validation sizes that replace the common probes' (see probe_sizes)


@dataclass
class PathSpec:
    name: str
    exit_layer: int
    modalities: tuple[str, ...]
    encode: list[str]  # run once per request, before the first step
    step: list[str]  # run for every forward: the prefill and each decode step
    static: bool = False  # the baseline: every engine, whatever the input


@dataclass
class Limits:
    max_batch: int = 8
    max_seq: int = 512
    max_context: int = 2048


def eval_dim(expr: int | str, sizes: dict[str, int]) -> int:
    """Evaluate a shape entry: an int, a Dim name, or a sum of terms `name`, `int`, `name/int`, `int*name`."""
    if isinstance(expr, int):
        return expr
    total = 0
    for term in expr.split("+"):
        m = re.fullmatch(r"(?:(\d+)\*)?(\w+)(?:/(\d+))?", term.strip())
        if not m:
            raise ValueError(f"bad shape expression {expr!r}")
        mul, name, div = m.groups()
        value = int(name) if name.isdigit() else sizes[name]
        total += value * int(mul or 1) // int(div or 1)
    return total


def concrete_shape(spec: TensorSpec, sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(eval_dim(d, sizes) for d in spec.shape)


def bind_sizes(specs: list[TensorSpec], shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Recover Dim sizes from actual input shapes (entries that are plain Dim names)."""
    sizes: dict[str, int] = {}
    for spec in specs:
        for entry, size in zip(spec.shape, shapes[spec.name]):
            if isinstance(entry, str) and entry.isidentifier():
                sizes[entry] = size
    return sizes


# --- engine modules: thin wrappers where a part's own forward is not the engine's signature ----


def segment_engine(k: int) -> str:
    """The name of segment k's engine (layers of the k-th exit's span and its exit head)."""
    return f"segment.{k}"


def cross_kv_engine(k: int) -> str:
    """The name of the engine that projects the media into segment k's cross-attention keys/values."""
    return f"cross_kv.{k}"


def cross_attn_engine(k: int) -> str:
    """The name of the gated cross-attention block in front of segment k."""
    return f"cross_attn.{k}"


def cache_names(n_layers: int) -> list[tuple[str, str]]:
    """(input, output) names of a segment's in-place cache: layer 0's keys, its values, layer 1's keys, ..."""
    return [(f"past_{kv}.{i}", f"present_{kv}.{i}") for i in range(n_layers) for kv in ("key", "value")]


def total_sequence_length(seq: int, capacity: int, seqlens_k: torch.Tensor) -> int:
    """GroupQueryAttention's total_sequence_length: the capacity for a decode step (one value for
    every step, so a captured graph replays it), past + seq for a prompt chunk of one sequence."""
    return capacity if seq == 1 else int(seqlens_k.max()) + 1


class SegmentEngine(nn.Module):
    """segment.k with the in-place cache, in eager torch: the reference the fused engine is
    validated against, and the eager backend's segment."""

    def __init__(self, segment: Segment):
        super().__init__()
        self.segment = segment

    def forward(self, hidden, seqlens_k, total_sequence_length, *cache):
        # hidden [B, S, D], seqlens_k [B] int32, cache: past_key.0, past_value.0, ... each [B, Hkv, C, hd]
        b, s, _ = hidden.shape
        capacity = cache[0].shape[2]
        past = seqlens_k.long() + 1 - s  # [B] entries cached before these tokens
        new_pos = past[:, None] + torch.arange(s, device=hidden.device)  # [B, S]
        kv_mask = torch.arange(capacity, device=hidden.device)[None] < past[:, None]  # [B, C]
        kv = torch.stack(cache).unflatten(0, (-1, 2))  # [L, 2, B, Hkv, C, hd]
        h, kv_out = self.segment(hidden, new_pos, kv_mask, kv)  # kv_out [L, 2, B, Hkv, C + S, hd]
        new = kv_out[:, :, :, :, capacity:]
        index = new_pos[None, None, :, None, :, None].expand_as(new)
        present = kv.scatter(4, index, new)  # the S new entries right after each row's own
        # the exit at every position: prefill and decode sample from the last, a speculative
        # verification (runtime/speculation.py) scores each drafted position
        return (h, self.segment.exit(h), *present.flatten(0, 1).unbind(0))


class CrossAttnEngine(nn.Module):
    def __init__(self, xattn):
        super().__init__()
        self.xattn = xattn

    def forward(self, hidden, cross_kv, media_mask):
        return self.xattn(hidden, cross_kv, media_mask)


# --- the cut -------------------------------------------------------------------------------


def model_dims(model: AutoGLM, limits: Limits) -> dict[str, Dim]:
    a = model.cfg.audio
    n_image = model.cfg.vision.n_tokens
    max_audio_tokens = a.max_frames // a.frame_multiple
    return {
        "batch": Dim("batch", 1, limits.max_batch, (1, 2)),
        "seq": Dim("seq", 1, limits.max_seq, (1, 5)),
        "capacity": Dim("capacity", 2, limits.max_context, (16, 16)),  # a segment cache's positions per row
        "media": Dim("media", 1, n_image + max_audio_tokens, (3, 11)),
        "audio_frames": Dim("audio_frames", a.frame_multiple, a.max_frames, (a.frame_multiple, 3 * a.frame_multiple), a.frame_multiple),
    }


def engine_specs(model: AutoGLM, limits: Limits) -> list[EngineSpec]:
    cfg = model.cfg
    t = cfg.text
    D, V, Hkv, hd = t.dim, t.vocab_size, t.n_kv_heads, t.head_dim
    text_cfg = {"text": asdict(t)}
    hidden = TensorSpec("hidden", ("batch", "seq", D), "float")
    hidden_out = TensorSpec("hidden_out", ("batch", "seq", D), "float")
    exits = TensorSpec("exit_hidden", ("batch", "seq", D), "float")  # a segment's exit at every position
    exit_hidden = TensorSpec("exit_hidden", ("batch", D), "float")  # the head's input: one position per row
    seqlens_k = TensorSpec("seqlens_k", ("batch",), "int32", "seqlens")
    total_len = TensorSpec("total_sequence_length", (), "int32", "total_length")
    media_mask = TensorSpec("media_mask", ("batch", "media"), "bool", "media_mask")
    cross_kv = TensorSpec("cross_kv", (2, "batch", Hkv, "media", hd), "float")
    media = TensorSpec("media", ("batch", "media", D), "float")
    logits = TensorSpec("logits", ("batch", V), "float")
    frames = f"audio_frames/{cfg.audio.frame_multiple}"

    specs = [
        EngineSpec("embed", "embed", model.text.embed_tokens,
                   [TensorSpec("input_ids", ("batch", "seq"), "int64", "tokens", V)], [hidden],
                   {"dim": D, "vocab_size": V}),
        EngineSpec("vision", "vision", model.vision,
                   [TensorSpec("pixel_values", ("batch", 3, cfg.vision.image_size, cfg.vision.image_size), "float")],
                   [TensorSpec("image_tokens", ("batch", cfg.vision.n_tokens, D), "float")],
                   {"vision": asdict(cfg.vision), "dim": D}),
        EngineSpec("audio", "audio", model.audio,
                   [TensorSpec("mel", ("batch", cfg.audio.n_mels, "audio_frames"), "float")],
                   [TensorSpec("audio_tokens", ("batch", frames, D), "float")],
                   {"audio": asdict(cfg.audio), "dim": D}),
    ]
    # GroupQueryAttention takes several rows with several new tokens only without a past: validate
    # what the runtime runs, a batched decode step and one sequence's prompt chunk after a past
    segment_probes = ({"batch": 2, "seq": 1}, {"batch": 1, "seq": 5})
    for k, (first, end) in enumerate(t.segment_bounds):
        L = end - first
        cache = [(TensorSpec(i, ("batch", Hkv, "capacity", hd), "float"),
                  TensorSpec(o, ("batch", Hkv, "capacity", hd), "float", inplace_of=i)) for i, o in cache_names(L)]
        specs += [
            EngineSpec(cross_kv_engine(k), "cross_kv", model.cross_kv[k], [media], [cross_kv], text_cfg, (first, first)),
            EngineSpec(cross_attn_engine(k), "cross_attn", CrossAttnEngine(model.cross_attn[k]),
                       [hidden, cross_kv, media_mask], [hidden_out], text_cfg, (first, first)),
            # segments of equal depth share a graph; an uneven cut gets one graph per depth
            EngineSpec(segment_engine(k), f"segment{L}", SegmentEngine(model.text.segments[k]),
                       [hidden, seqlens_k, total_len, *(i for i, _ in cache)],
                       [hidden_out, exits, *(o for _, o in cache)], text_cfg, (first, end),
                       fused=True, probes=segment_probes),
        ]
    specs.append(EngineSpec("lm_head", "lm_head", model.text.lm_head, [exit_hidden], [logits], {"dim": D, "vocab_size": V}))

    for spec in specs:
        spec.module.eval()
    return specs


def path_specs(exit_layers: list[int]) -> list[PathSpec]:
    paths = []
    for n_seg, exit_layer in enumerate(exit_layers, start=1):
        for modalities in MODALITY_SETS:
            encode, step = chain(n_seg, media=len(modalities) > 1)
            encode = [e for e in ("vision", "audio") if {"vision": "image", "audio": "audio"}[e] in modalities] + encode
            paths.append(PathSpec(path_name(exit_layer, modalities), exit_layer, modalities, encode, step))
    # the static graph: every encoder (placeholders for what is absent) and every layer, always
    encode, step = chain(len(exit_layers), media=True)
    paths.append(PathSpec("static", exit_layers[-1], MODALITY_SETS[-1], ["vision", "audio", *encode], step, static=True))
    return paths


def chain(n_segments: int, media: bool) -> tuple[list[str], list[str]]:
    """The media keys/values a path computes once, and the engines of each of its forwards."""
    encode, step = [], ["embed"]
    for k in range(n_segments):
        if media:
            encode.append(cross_kv_engine(k))
            step.append(cross_attn_engine(k))
        step.append(segment_engine(k))
    return encode, [*step, "lm_head"]


def path_name(exit_layer: int, modalities: tuple[str, ...]) -> str:
    return f"exit{exit_layer}-" + "+".join(modalities)


# --- inputs ---------------------------------------------------------------------------------

EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_BYTES = {name: dtype.itemsize for name, dtype in EXPORT_DTYPES.items()}  # a weight's bytes in each export dtype
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64,
                "int32": torch.int32, "bool": torch.bool}


def tensor_dtype(spec: TensorSpec, float_dtype: torch.dtype) -> torch.dtype:
    return float_dtype if spec.dtype == "float" else TORCH_DTYPES[spec.dtype]


def random_inputs(spec: EngineSpec, sizes: dict[str, int], dtype: torch.dtype,
                  device: str | torch.device, generator: torch.Generator) -> list[torch.Tensor]:
    """Fresh inputs for one engine at the given Dim sizes, drawn to look like what the runtime feeds."""
    tensors, seqlens = [], None
    for t in spec.inputs:
        shape = concrete_shape(t, sizes)
        if t.fill == "tokens":
            x = torch.randint(0, t.high, shape, generator=generator)
        elif t.fill == "seqlens":  # each row its own past, up to a full cache
            past = torch.randint(0, sizes["capacity"] - sizes["seq"] + 1, shape, generator=generator)
            if shape[0] > 1:
                past[-1] = sizes["capacity"] - sizes["seq"]  # one row fills its cache to the last position
            x = seqlens = past + sizes["seq"] - 1
        elif t.fill == "total_length":
            x = torch.tensor(total_sequence_length(sizes["seq"], sizes["capacity"], seqlens))
        elif t.fill == "media_mask":
            x = torch.ones(shape, dtype=torch.bool)
            if shape[0] > 1:
                x[1, shape[1] // 2:] = False  # a shorter media sequence
            if shape[0] > 2:
                x[2] = False  # no media at all: the block must add nothing
        else:
            x = torch.randn(shape, generator=generator)
        tensors.append(x.to(device=device, dtype=tensor_dtype(t, dtype)))
    return tensors


def probe_sizes(dims: dict[str, Dim], spec: EngineSpec | None = None) -> list[dict[str, int]]:
    common = [{name: d.probes[i] for name, d in dims.items()} for i in range(2)]
    return [base | override for base, override in zip(common, spec.probes)] if spec and spec.probes else common


def trace_sizes(dims: dict[str, Dim]) -> dict[str, int]:
    return {name: d.trace for name, d in dims.items()}
