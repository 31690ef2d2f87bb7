"""The engine cut: which part of the model becomes which engine, with what tensors and dynamic axes,
and which engines each dynamic path chains.

Everything downstream derives from the declarations here: torch.export's dynamic shapes, the
ONNX axis names, TensorRT's optimisation profiles, the validation shapes and the manifest that
the runtime binds tensors by. Dynamic engines hold disjoint weights (a test checks it):

  embed          input_ids -> hidden                          (token embedding)
  vision, audio  pixels / log-mel -> media tokens             (encoders + projectors)
  cross_kv.k     media -> cross_kv                            (segment k's media keys/values, once per request)
  cross_attn.k   hidden, cross_kv, media_mask -> hidden_out   (gated cross-attention, only with media)
  segment.k      hidden, position_ids, kv_mask, kv -> hidden_out, exit_hidden, kv_out
  lm_head        exit_hidden -> logits                        (shared by every exit)

Prefill and decode share every engine through the dynamic `seq` axis. The static baseline is two
engines holding the whole model: static.encode (both encoders on fixed-size inputs, placeholders
when a modality is absent) and static.decode (all 24 layers and cross-attention blocks).
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
    shape: tuple[int | str, ...]  # ints are fixed; strings name a Dim or an expression of Dims ("past+seq", "audio_frames/8")
    dtype: str  # "float" (the export dtype), "int64" or "bool"
    fill: str = "normal"  # how validation draws it: normal | tokens | positions | kv_mask | media_mask
    high: int = 0  # exclusive upper bound of "tokens"


@dataclass
class EngineSpec:
    name: str
    graph: str  # engines with the same graph differ only in weights and share one trace
    module: nn.Module  # forward(*inputs in order) -> outputs in order
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    config: dict  # the model config this engine depends on (cache key)
    layers: tuple[int, int] | None = None  # decoder layers [first, end) it runs, for placement
    static: bool = False


@dataclass
class PathSpec:
    name: str
    exit_layer: int
    modalities: tuple[str, ...]
    encode: list[str]  # run once per request, before the first step
    step: list[str]  # run for every forward: the prefill and each decode step
    static: bool = False


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


class SegmentEngine(nn.Module):
    def __init__(self, segment: Segment):
        super().__init__()
        self.segment = segment

    def forward(self, hidden, position_ids, kv_mask, kv):
        h, kv_out = self.segment(hidden, position_ids, kv_mask, kv)
        # the exit head needs only the last position: prefill and decode both sample from it
        return h, self.segment.exit(h[:, -1]), kv_out


class CrossAttnEngine(nn.Module):
    def __init__(self, xattn):
        super().__init__()
        self.xattn = xattn

    def forward(self, hidden, cross_kv, media_mask):
        return self.xattn(hidden, cross_kv, media_mask)


class StaticEncodeEngine(nn.Module):
    """Both encoders on fixed-size inputs and every segment's media keys/values."""

    def __init__(self, model: AutoGLM):
        super().__init__()
        self.vision, self.audio, self.cross_kv = model.vision, model.audio, model.cross_kv

    def forward(self, pixel_values, mel):
        media = torch.cat([self.vision(pixel_values), self.audio(mel)], dim=1)  # [B, M, D]
        return torch.stack([proj(media) for proj in self.cross_kv])  # [n_seg, 2, B, Hkv, M, hd]


class StaticDecodeEngine(nn.Module):
    """All layers and cross-attention blocks, whatever the input needs."""

    def __init__(self, model: AutoGLM):
        super().__init__()
        self.text, self.cross_attn = model.text, model.cross_attn

    def forward(self, input_ids, position_ids, kv_mask, kv, cross_kv, media_mask):
        h = self.text.embed_tokens(input_ids)
        presents, first = [], 0
        for k, segment in enumerate(self.text.segments):
            h = self.cross_attn[k](h, cross_kv[k], media_mask)
            end = first + len(segment.layers)
            h, present = segment(h, position_ids, kv_mask, kv[first:end])
            presents.append(present)
            first = end
        logits = self.text.lm_head(self.text.segments[-1].exit(h[:, -1]))
        return logits, torch.cat(presents)


# --- the cut -------------------------------------------------------------------------------


def model_dims(model: AutoGLM, limits: Limits) -> dict[str, Dim]:
    a = model.cfg.audio
    n_image = model.cfg.vision.n_tokens
    max_audio_tokens = a.max_frames // a.frame_multiple
    return {
        "batch": Dim("batch", 1, limits.max_batch, (1, 2)),
        "seq": Dim("seq", 1, limits.max_seq, (1, 5)),
        "past": Dim("past", 0, limits.max_context, (0, 7)),
        "media": Dim("media", 1, n_image + max_audio_tokens, (3, 11)),
        "audio_frames": Dim("audio_frames", a.frame_multiple, a.max_frames, (a.frame_multiple, 3 * a.frame_multiple), a.frame_multiple),
    }


def engine_specs(model: AutoGLM, limits: Limits, static: bool = True) -> list[EngineSpec]:
    cfg = model.cfg
    t = cfg.text
    D, V, Hkv, hd = t.dim, t.vocab_size, t.n_kv_heads, t.head_dim
    text_cfg = {"text": asdict(t)}
    hidden = TensorSpec("hidden", ("batch", "seq", D), "float")
    hidden_out = TensorSpec("hidden_out", ("batch", "seq", D), "float")
    exit_hidden = TensorSpec("exit_hidden", ("batch", D), "float")
    position_ids = TensorSpec("position_ids", ("batch", "seq"), "int64", "positions")
    kv_mask = TensorSpec("kv_mask", ("batch", "past"), "bool", "kv_mask")
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
    for k, (first, end) in enumerate(t.segment_bounds):
        L = end - first
        kv = TensorSpec("kv", (L, 2, "batch", Hkv, "past", hd), "float")
        kv_out = TensorSpec("kv_out", (L, 2, "batch", Hkv, "past+seq", hd), "float")
        specs += [
            EngineSpec(f"cross_kv.{k}", "cross_kv", model.cross_kv[k], [media], [cross_kv], text_cfg, (first, first)),
            EngineSpec(f"cross_attn.{k}", "cross_attn", CrossAttnEngine(model.cross_attn[k]),
                       [hidden, cross_kv, media_mask], [hidden_out], text_cfg, (first, first)),
            # segments of equal depth share a graph; an uneven cut gets one trace per depth
            EngineSpec(f"segment.{k}", f"segment{L}", SegmentEngine(model.text.segments[k]),
                       [hidden, position_ids, kv_mask, kv], [hidden_out, exit_hidden, kv_out], text_cfg, (first, end)),
        ]
    specs.append(EngineSpec("lm_head", "lm_head", model.text.lm_head, [exit_hidden], [logits], {"dim": D, "vocab_size": V}))

    if static:
        n_seg, M = len(t.exit_layers), cfg.vision.n_tokens + cfg.audio.max_frames // cfg.audio.frame_multiple
        static_kv = TensorSpec("cross_kv", (n_seg, 2, "batch", Hkv, M, hd), "float")
        everything = {"model": asdict(cfg) | {"checkpoint": None, "exits": None}}  # weights are keyed by their hashes
        decoder = {**text_cfg, "media_tokens": M}
        specs += [
            EngineSpec("static.encode", "static.encode", StaticEncodeEngine(model),
                       [TensorSpec("pixel_values", ("batch", 3, cfg.vision.image_size, cfg.vision.image_size), "float"),
                        TensorSpec("mel", ("batch", cfg.audio.n_mels, cfg.audio.max_frames), "float")],
                       [static_kv], everything, (0, 0), static=True),
            EngineSpec("static.decode", "static.decode", StaticDecodeEngine(model),
                       [TensorSpec("input_ids", ("batch", "seq"), "int64", "tokens", V), position_ids, kv_mask,
                        TensorSpec("kv", (t.n_layers, 2, "batch", Hkv, "past", hd), "float"), static_kv,
                        TensorSpec("media_mask", ("batch", M), "bool", "media_mask")],
                       [logits, TensorSpec("kv_out", (t.n_layers, 2, "batch", Hkv, "past+seq", hd), "float")],
                       decoder, (0, t.n_layers), static=True),
        ]
    for spec in specs:
        spec.module.eval()
    return specs


def path_specs(exit_layers: list[int], static: bool = True) -> list[PathSpec]:
    paths = []
    for n_seg, exit_layer in enumerate(exit_layers, start=1):
        for modalities in MODALITY_SETS:
            has_media = len(modalities) > 1
            encode = [m for m in ("image", "audio") if m in modalities]
            encode = [{"image": "vision", "audio": "audio"}[m] for m in encode]
            step = ["embed"]
            for k in range(n_seg):
                if has_media:
                    encode.append(f"cross_kv.{k}")
                    step.append(f"cross_attn.{k}")
                step.append(f"segment.{k}")
            step.append("lm_head")
            paths.append(PathSpec(path_name(exit_layer, modalities), exit_layer, modalities, encode, step))
    if static:
        paths.append(PathSpec("static", exit_layers[-1], ("text", "image", "audio"), ["static.encode"], ["static.decode"], static=True))
    return paths


def path_name(exit_layer: int, modalities: tuple[str, ...]) -> str:
    return f"exit{exit_layer}-" + "+".join(modalities)


# --- inputs ---------------------------------------------------------------------------------

EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64, "bool": torch.bool}


def tensor_dtype(spec: TensorSpec, float_dtype: torch.dtype) -> torch.dtype:
    return float_dtype if spec.dtype == "float" else TORCH_DTYPES[spec.dtype]


def random_inputs(spec: EngineSpec, sizes: dict[str, int], dtype: torch.dtype,
                  device: str | torch.device, generator: torch.Generator) -> list[torch.Tensor]:
    """Fresh inputs for one engine at the given Dim sizes, drawn to look like what the runtime feeds."""
    tensors = []
    for t in spec.inputs:
        shape = concrete_shape(t, sizes)
        if t.fill == "tokens":
            x = torch.randint(0, t.high, shape, generator=generator)
        elif t.fill == "positions":
            x = (sizes.get("past", 0) + torch.arange(shape[1])).expand(shape).contiguous()
        elif t.fill == "kv_mask":
            x = torch.rand(shape, generator=generator) > 0.2  # left padding and gaps, as batched decode has
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


def probe_sizes(dims: dict[str, Dim]) -> list[dict[str, int]]:
    return [{name: d.probes[i] for name, d in dims.items()} for i in range(2)]


def trace_sizes(dims: dict[str, Dim]) -> dict[str, int]:
    return {name: d.trace for name, d in dims.items()}
