"""A light ViT: 224x224 RGB -> patch tokens at the decoder's width."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .block import EncoderBlock, Projector

# CLIP's normalisation constants, applied by the runtime before the engine
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionArgs:
    image_size: int = 224
    patch_size: int = 14
    dim: int = 1024
    n_layers: int = 12
    n_heads: int = 16
    ffn_dim: int = 4096
    norm_eps: float = 1e-6

    @property
    def n_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class VisionEncoder(nn.Module):
    def __init__(self, args: VisionArgs, out_dim: int):
        super().__init__()
        if args.image_size % args.patch_size:
            raise ValueError(f"vision.image_size={args.image_size} is not a multiple of patch_size={args.patch_size}")
        self.patch_embed = nn.Conv2d(3, args.dim, kernel_size=args.patch_size, stride=args.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, args.n_tokens, args.dim))
        self.blocks = nn.ModuleList(EncoderBlock(args.dim, args.n_heads, args.ffn_dim, args.norm_eps) for _ in range(args.n_layers))
        self.norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.projector = Projector(args.dim, out_dim)

    def forward(self, pixel_values):
        # pixel_values [B, 3, image_size, image_size], normalised
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)  # [B, N, C]
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.projector(self.norm(x))  # [B, N, D]
