"""Running one path's engine chain: encode once, then one step per forward.

A `ChainState` holds what a batch of sequences carries between steps on a path: the KV cache of
each segment the path runs (on that segment's device), the validity mask of cached entries, the
next positions, and the media keys/values when the request has media.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipeline.manifest import PathRecord
from runtime.engines import EngineSet


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


class PathRunner:
    def __init__(self, engines: EngineSet, path: PathRecord):
        self.engines, self.path = engines, path
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[engines.manifest.dtype]

    def empty_state(self, batch: int, media: dict[str, torch.Tensor] | None = None) -> ChainState:
        kv = {}
        for name in self.path.step:
            record = self.engines.manifest.engines[name]
            for t in record.inputs:
                if t["name"] == "kv":
                    layers, _, _, heads, _, head_dim = t["shape"]
                    kv[name] = torch.zeros(layers, 2, batch, heads, 0, head_dim, dtype=self.dtype, device=self.engines.device(name))
        first = self.engines.device(self.path.step[0])
        state = ChainState(kv, torch.zeros(batch, 0, dtype=torch.bool, device=first), torch.zeros(batch, dtype=torch.long))
        if media:
            state.cross_kv, state.media_mask = media["cross_kv"], media["media_mask"]
        return state

    def encode(self, pixel_values: torch.Tensor | None = None, mel: torch.Tensor | None = None) -> dict | None:
        """Run the path's encoders once: media keys/values for every cross-attention block."""
        if not self.path.encode:
            return None
        if self.path.static:
            return self.encode_static(pixel_values, mel)
        parts = []
        if "vision" in self.path.encode:
            parts.append(self.engines.run("vision", {"pixel_values": pixel_values.to(self.dtype)})["image_tokens"])
        if "audio" in self.path.encode:
            parts.append(self.engines.run("audio", {"mel": mel.to(self.dtype)})["audio_tokens"])
        media = torch.cat([p.to(parts[0].device) for p in parts], dim=1)  # [B, M, D]
        cross_kv = {}
        for name in self.path.encode:
            if name.startswith("cross_kv."):
                cross_kv["cross_attn." + name.split(".")[1]] = self.engines.run(name, {"media": media})["cross_kv"]
        return {"cross_kv": cross_kv, "media_mask": torch.ones(media.shape[:2], dtype=torch.bool, device=media.device)}

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
        n_image = self.engines.manifest.model["config"]["vision"]
        n_image = (n_image["image_size"] // n_image["patch_size"]) ** 2
        audio_cfg = self.engines.manifest.model["config"]["audio"]
        n_audio = mel_shape[-1] // (2 * audio_cfg["pool"])
        mask = torch.zeros(batch, n_image + n_audio, dtype=torch.bool)
        mask[:, :n_image] = pixel_values is not None
        mask[:, n_image:n_image + frames // (2 * audio_cfg["pool"])] = True
        out = self.engines.run("static.encode", {"pixel_values": pixels.to(self.dtype), "mel": full_mel.to(self.dtype)})
        return {"cross_kv": {"static.decode": out["cross_kv"]}, "media_mask": mask.to(out["cross_kv"].device)}

    def step(self, state: ChainState, input_ids: torch.Tensor) -> torch.Tensor:
        """One forward of S new tokens per sequence: logits [B, V] of the last; the state advances."""
        b, s = input_ids.shape
        positions = state.positions[:, None] + torch.arange(s)[None, :]  # [B, S]
        new_mask = torch.ones(b, s, dtype=torch.bool)
        if self.path.static:
            out = self.engines.run("static.decode", {
                "input_ids": input_ids, "position_ids": positions, "kv_mask": state.kv_mask, "kv": state.kv["static.decode"],
                "cross_kv": state.cross_kv["static.decode"], "media_mask": state.media_mask})
            state.kv["static.decode"] = out["kv_out"]
            logits = out["logits"]
        else:
            hidden = self.engines.run("embed", {"input_ids": input_ids})["hidden"]
            exit_hidden = None
            for name in self.path.step[1:]:
                if name.startswith("cross_attn."):
                    hidden = self.engines.run(name, {"hidden": hidden, "cross_kv": state.cross_kv[name], "media_mask": state.media_mask})["hidden_out"]
                elif name.startswith("segment."):
                    out = self.engines.run(name, {"hidden": hidden, "position_ids": positions, "kv_mask": state.kv_mask, "kv": state.kv[name]})
                    hidden, exit_hidden, state.kv[name] = out["hidden_out"], out["exit_hidden"], out["kv_out"]
            logits = self.engines.run("lm_head", {"exit_hidden": exit_hidden})["logits"]
        state.kv_mask = torch.cat([state.kv_mask, new_mask.to(state.kv_mask.device)], dim=1)
        state.positions = state.positions + s
        return logits
