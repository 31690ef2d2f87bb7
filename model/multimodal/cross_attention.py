"""Flamingo-style gated cross-attention from text tokens to media tokens.

One block stands in front of each decoder segment. The media keys and values are projected once
per request (`MediaProjection`, a module of its own so that it can be its own engine) and reused
by every decode step; the tanh gates scale what the block adds
to the residual stream. A row with no valid media token adds nothing, which is what lets the
static graph feed placeholder media without changing a text-only answer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..glm import MLP, ModelArgs, RMSNorm, expand_kv


class MediaProjection(nn.Module):
    """Media tokens -> the keys and values one cross-attention block attends to."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_kv_heads, self.head_dim = args.n_kv_heads, args.head_dim
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)

    def forward(self, media):
        # media [B, M, D] -> [2, B, Hkv, M, hd]
        b, m, _ = media.shape
        k = self.k_proj(media).view(b, m, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(media).view(b, m, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return torch.stack([k, v])


class GatedCrossAttention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.attn_gate = nn.Parameter(torch.full((1,), args.cross_gate_init))
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args.dim, args.cross_ffn_dim)
        self.ffn_gate = nn.Parameter(torch.full((1,), args.cross_gate_init))

    def forward(self, h, media_kv, media_mask):
        # h [B, S, D], media_kv [2, B, Hkv, M, hd], media_mask [B, M]
        b, s, _ = h.shape
        q = self.q_proj(self.norm(h)).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        valid = media_mask.bool()[:, None, None, :]  # [B, 1, 1, M]
        zero = torch.zeros((), dtype=h.dtype, device=h.device)
        mask = torch.where(valid, zero, torch.finfo(h.dtype).min)
        n_rep = self.n_heads // self.n_kv_heads
        out = F.scaled_dot_product_attention(q, expand_kv(media_kv[0], n_rep), expand_kv(media_kv[1], n_rep), attn_mask=mask)
        out = self.o_proj(out.transpose(1, 2).reshape(b, s, -1))
        has_media = media_mask.bool().any(dim=-1).to(h.dtype)[:, None, None]  # [B, 1, 1]
        h = h + has_media * torch.tanh(self.attn_gate).to(h.dtype) * out
        return h + has_media * torch.tanh(self.ffn_gate).to(h.dtype) * self.mlp(self.ffn_norm(h))
