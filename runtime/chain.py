"""Running one path's engine chain: encode once, then one step per forward.

A `ChainState` holds what a batch of sequences carries between steps on a path: the KV cache of
each segment the path runs (on that segment's device), the validity mask of cached entries, the
next positions, and the media keys/values when the request has media.

The stateless pieces underneath (`embed`, `run_stage`, `head`, `forward`) are what the serving
runtime drives: it keeps each request's cache in its own slot, prefills one segment at a time
(the confidence policy decides at each exit whether to go on), and batches decode steps of
several requests by handing `forward` gathered caches with a kv_mask over their padding.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipeline.manifest import PathRecord
from runtime.engines import EngineSet

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ChainState:
    kv: dict[str, torch.Tensor]  # segment engine -> [L, 2, B, Hkv, P, hd]
    kv_mask: torch.Tensor  # [B, P] bool
    positions: torch.Tensor  # [B] next position of each sequence
    cross_kv: dict[str, torch.Tensor] = field(default_factory=dict)  # cross_attn engine -> [2, B, Hkv, M, hd] (static: all segments)
    media_mask: torch.Tensor | None = None  # [B, M]

    @property
    def length(self) -> int:
        return self.kv_mask.shape[1]


@dataclass(frozen=True)
class Stage:
    """One segment of a dynamic path, with the cross-attention block in front of it when the path has media."""

    segment: str
    cross_attn: str | None
    cross_kv: str | None
    exit_layer: int


@dataclass(frozen=True)
class KVLayout:
    """The cache one engine keeps: [layers, 2, B, kv_heads, P, head_dim] on `device`."""

    layers: int
    kv_heads: int
    head_dim: int
    device: torch.device


class PathRunner:
    def __init__(self, engines: EngineSet, path: PathRecord):
        self.engines, self.path = engines, path
        self.dtype = DTYPES[engines.manifest.dtype]
        records = engines.manifest.engines
        self.stages: list[Stage] = []
        for name in [] if path.static else path.step:
            if name.startswith("segment."):
                k = name.split(".")[1]
                media = f"cross_attn.{k}" in path.step
                self.stages.append(Stage(name, f"cross_attn.{k}" if media else None, f"cross_kv.{k}" if media else None,
                                         records[name].layers[1]))

    def kv_layouts(self) -> dict[str, KVLayout]:
        """The engines of this path that keep a cache, in chain order."""
        layouts = {}
        for name in self.path.step:
            for t in self.engines.manifest.engines[name].inputs:
                if t["name"] == "kv":
                    layers, _, _, heads, _, head_dim = t["shape"]
                    layouts[name] = KVLayout(layers, heads, head_dim, self.engines.device(name))
        return layouts

    def empty_state(self, batch: int, media: dict[str, torch.Tensor] | None = None) -> ChainState:
        kv = {name: torch.zeros(k.layers, 2, batch, k.kv_heads, 0, k.head_dim, dtype=self.dtype, device=k.device)
              for name, k in self.kv_layouts().items()}
        first = self.engines.device(self.path.step[0])
        state = ChainState(kv, torch.zeros(batch, 0, dtype=torch.bool, device=first), torch.zeros(batch, dtype=torch.long))
        if media:
            state.cross_kv, state.media_mask = media["cross_kv"], media["media_mask"]
        return state

    # --- encode: once per request ---------------------------------------------------------------

    def encode(self, pixel_values: torch.Tensor | None = None, mel: torch.Tensor | None = None) -> dict | None:
        """Run the path's encoders once: media keys/values for every cross-attention block."""
        if not self.path.encode:
            return None
        if self.path.static:
            return self.encode_static(pixel_values, mel)
        media = self.media_tokens(pixel_values, mel)
        return {"media": media, "cross_kv": {s.cross_attn: self.cross_kv(s, media) for s in self.stages},
                "media_mask": torch.ones(media.shape[:2], dtype=torch.bool, device=media.device)}

    def media_tokens(self, pixel_values: torch.Tensor | None, mel: torch.Tensor | None, batch: int | None = None) -> torch.Tensor:
        """Media tokens [B, M, D]: each row's images (pixel_values holds batch * n of them, row by row), then its audio."""
        parts = []
        if pixel_values is not None:
            tokens = self.engines.run("vision", {"pixel_values": pixel_values.to(self.dtype)})["image_tokens"]
            rows = batch or tokens.shape[0]
            parts.append(tokens.reshape(rows, -1, tokens.shape[-1]))
        if mel is not None:
            parts.append(self.engines.run("audio", {"mel": mel.to(self.dtype)})["audio_tokens"])
        return torch.cat([p.to(parts[0].device) for p in parts], dim=1)

    def cross_kv(self, stage: Stage, media: torch.Tensor) -> torch.Tensor:
        """The media keys/values [2, B, Hkv, M, hd] of one stage's cross-attention block."""
        return self.engines.run(stage.cross_kv, {"media": media})["cross_kv"]

    def encode_static(self, pixel_values, mel) -> dict:
        """Placeholders for absent modalities; the mask hides them, so the answer is unchanged."""
        record = self.engines.manifest.engines["static.encode"]
        shapes = {t["name"]: t["shape"] for t in record.inputs}
        batch = (pixel_values if pixel_values is not None else mel).shape[0] if (pixel_values is not None or mel is not None) else 1
        image_shape, mel_shape = shapes["pixel_values"][1:], shapes["mel"][1:]
        pixels = pixel_values if pixel_values is not None else torch.zeros(batch, *image_shape)
        full_mel = torch.full((batch, *mel_shape), -1.5)  # log-mel of silence after Whisper's scaling
        frames = 0
        if mel is not None:
            frames = mel.shape[-1]
            full_mel[..., :frames] = mel
        # the media sequence is the image's tokens, then one audio token per `multiple` mel frames
        engines = self.engines.manifest.engines
        n_image = engines["vision"].outputs[0]["shape"][1]
        n_media = engines["static.encode"].outputs[0]["shape"][4]
        per_token = self.engines.manifest.dims["audio_frames"]["multiple"]
        mask = torch.zeros(batch, n_media, dtype=torch.bool)
        mask[:, :n_image] = pixel_values is not None
        mask[:, n_image:n_image + frames // per_token] = True
        out = self.engines.run("static.encode", {"pixel_values": pixels.to(self.dtype), "mel": full_mel.to(self.dtype)})
        return {"cross_kv": {"static.decode": out["cross_kv"]}, "media_mask": mask.to(out["cross_kv"].device)}

    # --- one forward: stateless pieces ------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.engines.run("embed", {"input_ids": input_ids})["hidden"]

    def run_stage(self, stage: Stage, hidden: torch.Tensor, position_ids: torch.Tensor, kv_mask: torch.Tensor,
                  kv: torch.Tensor, media: dict | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cross-attention (with media) and one segment: hidden_out, exit_hidden [B, D], kv_out."""
        if stage.cross_attn:
            hidden = self.engines.run(stage.cross_attn, {"hidden": hidden, "cross_kv": media["cross_kv"][stage.cross_attn],
                                                         "media_mask": media["media_mask"]})["hidden_out"]
        out = self.engines.run(stage.segment, {"hidden": hidden, "position_ids": position_ids, "kv_mask": kv_mask, "kv": kv})
        return out["hidden_out"], out["exit_hidden"], out["kv_out"]

    def head(self, exit_hidden: torch.Tensor) -> torch.Tensor:
        # the shared head runs where the exit is (a replica on a second GPU) rather than moving the state back
        return self.engines.run("lm_head", {"exit_hidden": exit_hidden}, device=exit_hidden.device)["logits"]

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, kv_mask: torch.Tensor, kv: dict[str, torch.Tensor],
                media: dict | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """S new tokens for B sequences: logits [B, V] of the last position, and each cache engine's kv_out
        ([L, 2, B, Hkv, P + S, hd]: the P entries it was given, then the S new ones)."""
        if self.path.static:
            out = self.engines.run("static.decode", {
                "input_ids": input_ids, "position_ids": position_ids, "kv_mask": kv_mask, "kv": kv["static.decode"],
                "cross_kv": media["cross_kv"]["static.decode"], "media_mask": media["media_mask"]})
            return out["logits"], {"static.decode": out["kv_out"]}
        hidden = self.embed(input_ids)
        kv_out = {}
        for stage in self.stages:
            hidden, exit_hidden, kv_out[stage.segment] = self.run_stage(stage, hidden, position_ids, kv_mask, kv[stage.segment], media)
        return self.head(exit_hidden), kv_out

    def step(self, state: ChainState, input_ids: torch.Tensor) -> torch.Tensor:
        """One forward of S new tokens per sequence: logits [B, V] of the last; the state advances."""
        b, s = input_ids.shape
        positions = state.positions[:, None] + torch.arange(s)[None, :]  # [B, S]
        media = {"cross_kv": state.cross_kv, "media_mask": state.media_mask}
        logits, kv_out = self.forward(input_ids, positions, state.kv_mask, state.kv, media)
        state.kv.update(kv_out)
        state.kv_mask = torch.cat([state.kv_mask, torch.ones(b, s, dtype=torch.bool, device=state.kv_mask.device)], dim=1)
        state.positions = state.positions + s
        return logits
