"""AutoGLM-Phone-style multimodal model: GLM decoder + ViT + Whisper-style encoder, joined by
gated cross-attention in front of each decoder segment.

`AutoGLM.forward` is the eager reference that every engine chain is checked against; the
runtime and the exporters never call it, they call the parts (see contract/engines.py).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from .exits import load_exits, resolve_exits
from .glm import ModelArgs, Transformer
from .multimodal.audio import AudioArgs, AudioEncoder
from .multimodal.cross_attention import GatedCrossAttention, MediaProjection
from .multimodal.vision import VisionArgs, VisionEncoder

log = logging.getLogger(__name__)

INIT_STD = 0.02


@dataclass
class ModelConfig:
    name: str = "tiny"
    seed: int = 0  # random weights are drawn per parameter from (seed, parameter name)
    checkpoint: str | None = None  # a Hugging Face GLM checkpoint directory for the decoder
    # calibrated exit heads (python -m pipeline calibrate): a file; "auto": <checkpoint>/exits/exits.safetensors if present; null: none
    exits: str | None = "auto"
    text: ModelArgs = field(default_factory=ModelArgs)
    vision: VisionArgs = field(default_factory=VisionArgs)
    audio: AudioArgs = field(default_factory=AudioArgs)


class AutoGLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.text = Transformer(cfg.text)
        self.cross_kv = nn.ModuleList(MediaProjection(cfg.text) for _ in cfg.text.exit_layers)
        self.cross_attn = nn.ModuleList(GatedCrossAttention(cfg.text) for _ in cfg.text.exit_layers)
        self.vision = VisionEncoder(cfg.vision, cfg.text.dim)
        self.audio = AudioEncoder(cfg.audio, cfg.text.dim)
        self.checkpoint_tensors: frozenset[str] = frozenset()  # parameter names loaded from cfg.checkpoint

    def encode_media(self, pixel_values=None, mel=None):
        """Media tokens [B, M, D] and their mask [B, M], or (None, None) for a text-only input."""
        parts = []
        if pixel_values is not None:
            parts.append(self.vision(pixel_values))
        if mel is not None:
            parts.append(self.audio(mel))
        if not parts:
            return None, None
        media = torch.cat(parts, dim=1)
        return media, torch.ones(media.shape[:2], dtype=torch.bool, device=media.device)

    def forward(self, input_ids, exit_layer: int | None = None, media=None, media_mask=None):
        """Logits [B, S, V] at `exit_layer` for a whole prompt, without a cache."""
        exit_layer = exit_layer or self.cfg.text.n_layers
        b, s = input_ids.shape
        h = self.text.embed_tokens(input_ids)  # [B, S, D]
        position_ids = torch.arange(s, device=h.device).expand(b, s)
        kv_mask = torch.zeros(b, 0, dtype=torch.bool, device=h.device)
        for k in range(self.text.segments_for(exit_layer)):
            if media is not None:
                h = self.cross_attn[k](h, self.cross_kv[k](media), media_mask)
            segment = self.text.segments[k]
            h, _ = segment(h, position_ids, kv_mask, segment.empty_kv(b, h.device, h.dtype))
        return self.text.lm_head(segment.exit(h))


def param_seed(seed: int, name: str) -> int:
    """A generator seed per parameter, so that changing one part never reshuffles another."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


@torch.no_grad()
def init_weights(model: AutoGLM, seed: int, skip: set[str] = frozenset()) -> None:
    norm_types = (nn.LayerNorm,) + tuple({type(m) for m in model.modules() if type(m).__name__ == "RMSNorm"})
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            name = f"{module_name}.{pname}" if module_name else pname
            if name in skip:
                continue
            if isinstance(module, norm_types):
                p.fill_(1.0 if pname == "weight" else 0.0)
            elif pname.endswith("gate"):
                p.fill_(model.cfg.text.cross_gate_init)
            elif name.endswith("exit_adapter.up.weight"):
                p.zero_()  # an untrained exit adapter adds nothing
            else:
                g = torch.Generator(device=p.device).manual_seed(param_seed(seed, name))
                p.copy_(torch.empty(p.shape, device=p.device).normal_(0.0, INIT_STD, generator=g))


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> AutoGLM:
    """The model on `device` in `dtype`: see `materialize`."""
    return materialize(meta_model(cfg), device, dtype)


def meta_model(cfg: ModelConfig) -> AutoGLM:
    """The model's structure without storage: enough to count parameters and plan an export."""
    with torch.device("meta"):
        return AutoGLM(cfg)


def materialize(model: AutoGLM, device: str | torch.device, dtype: torch.dtype) -> AutoGLM:
    """Allocate straight on `device` in `dtype` (phone-9b never exists in float32 on the host),
    load the checkpoint's decoder tensors if one is configured, and draw the rest at random."""
    model = model.to(dtype).to_empty(device=device)
    cfg = model.cfg
    if cfg.checkpoint:
        from .checkpoint import load_glm_checkpoint

        model.checkpoint_tensors = frozenset(load_glm_checkpoint(model, cfg.checkpoint))
        missing = sorted(n for n, _ in model.named_parameters() if n not in model.checkpoint_tensors)
        log.info("checkpoint %s: loaded %d tensors; initialised at random: %s", cfg.checkpoint, len(model.checkpoint_tensors), summarize_names(missing))
    init_weights(model, cfg.seed, skip=model.checkpoint_tensors)
    if exits := resolve_exits(cfg):
        info = load_exits(model, exits)
        log.info("exits %s (sha256 %s): calibrated heads of exits %s loaded", info.path, info.sha256[:12], info.exit_layers)
    return model.eval().requires_grad_(False)


def summarize_names(names: list[str]) -> str:
    """Group parameter names by their first two components for a readable log line."""
    groups: dict[str, int] = {}
    for n in names:
        key = ".".join(n.split(".")[:2])
        groups[key] = groups.get(key, 0) + 1
    return ", ".join(f"{k} ({v})" for k, v in groups.items()) or "none"


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
