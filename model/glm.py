"""GLM-style decoder with early exits.

The layer stack is cut into segments that end at the exit depths (6/12/18/24 by default). Each
segment owns its layers and the RMSNorm of the exit that follows it; the LM head is shared by
every exit (as in LayerSkip), so exiting early costs no extra vocabulary matrix. Module and
parameter names follow Hugging Face's `GlmForCausalLM` so that checkpoints map one-to-one.

Shapes: B batch, S new tokens, P cached tokens, T = P + S, D model width, H query heads,
Hkv key/value heads, hd head width, L layers of a segment.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 24
    n_heads: int = 32
    n_kv_heads: int = 2
    head_dim: int = 128
    vocab_size: int = 151552
    ffn_dim: int = 13696
    norm_eps: float = 1.5625e-07
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5  # GLM rotates only the first half of each head
    attention_bias: bool = True  # GLM has biases on q/k/v, none on o
    exit_layers: list[int] = field(default_factory=lambda: [6, 12, 18, 24])
    cross_ffn_dim: int = 4096  # width of the gated feed-forward behind each cross-attention
    cross_gate_init: float = 0.5  # tanh gate start; Flamingo uses 0, random weights need > 0 to be tested
    exit_adapter_rank: int = 0  # low-rank adapter after each exit norm (python -m pipeline calibrate trains it); 0: none

    def check(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        exits = list(self.exit_layers)
        if not exits or exits != sorted(set(exits)):
            raise ValueError(f"model.text.exit_layers={exits} must be strictly increasing")
        if exits[0] < 1 or exits[-1] != self.n_layers:
            raise ValueError(
                f"model.text.exit_layers={exits} must lie in 1..{self.n_layers} and end at "
                f"n_layers={self.n_layers}, so that the exits split the layers into segments"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if int(self.head_dim * self.partial_rotary_factor) % 2:
            raise ValueError("head_dim * partial_rotary_factor must be even")
        if not 0 <= self.exit_adapter_rank <= self.dim:
            raise ValueError(f"model.text.exit_adapter_rank={self.exit_adapter_rank} must lie in 0..dim={self.dim}")

    @property
    def segment_bounds(self) -> list[tuple[int, int]]:
        """[(first_layer, end_layer)] of each segment."""
        starts = [0, *self.exit_layers[:-1]]
        return list(zip(starts, self.exit_layers))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32 like HF, then cast back before the scale
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(args: ModelArgs, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for GLM's interleaved partial rotary embedding: [B, 1, S, rot]."""
    rot = int(args.head_dim * args.partial_rotary_factor)
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, rot, 2, device=position_ids.device).float() / rot))
    freqs = position_ids.float()[..., None] * inv_freq  # [B, S, rot/2]
    # pairs (2i, 2i+1) rotate together at frequency i
    freqs = freqs.repeat_interleave(2, dim=-1)[:, None]  # [B, 1, S, rot]
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
    rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)


def expand_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, T, hd] -> [B, Hkv * n_rep, T, hd] for grouped-query attention."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def causal_mask(kv_mask: torch.Tensor, seq_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B, 1, S, T] from the validity of cached entries kv_mask [B, P].

    New tokens always see each other causally; a cached entry is visible where kv_mask is true.
    A finite minimum rather than -inf keeps fully masked rows (never produced here) NaN-free.
    """
    b, past = kv_mask.shape
    new = torch.ones(b, seq_len, dtype=torch.bool, device=kv_mask.device)
    visible = torch.cat([kv_mask.bool(), new], dim=1)[:, None, None, :]  # [B, 1, 1, T]
    key_pos = torch.arange(past + seq_len, device=kv_mask.device)
    query_pos = past + torch.arange(seq_len, device=kv_mask.device)
    causal = key_pos[None, :] <= query_pos[:, None]  # [S, T]
    allowed = visible & causal[None, None]
    zero = torch.zeros((), dtype=dtype, device=kv_mask.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.attention_bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.attention_bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.attention_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, mask, past_kv):
        # x [B, S, D], mask [B, 1, S, T], past_kv [2, B, Hkv, P, hd]
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, S, hd]
        k = self.k_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, S, hd]
        v = self.v_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k = torch.cat([past_kv[0], k], dim=2)  # [B, Hkv, T, hd]
        v = torch.cat([past_kv[1], v], dim=2)
        n_rep = self.n_heads // self.n_kv_heads
        out = F.scaled_dot_product_attention(q, expand_kv(k, n_rep), expand_kv(v, n_rep), attn_mask=mask)
        out = out.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim)
        return self.o_proj(out), torch.stack([k, v])  # [B, S, D], [2, B, Hkv, T, hd]


class MLP(nn.Module):
    """SwiGLU with GLM's fused gate/up projection."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(dim, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args.dim, args.ffn_dim)

    def forward(self, x, cos, sin, mask, past_kv):
        attn, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, past_kv)
        h = x + attn
        return h + self.mlp(self.post_attention_layernorm(h)), kv


class LowRankAdapter(nn.Module):
    """up(down(x)), added to x by its owner: `up` starts at zero, so an untrained adapter adds nothing."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)  # weight [r, D]
        self.up = nn.Linear(rank, dim, bias=False)  # weight [D, r], zero-initialised (model/autoglm.py init_weights)

    def forward(self, x):
        return self.up(self.down(x))


class Segment(nn.Module):
    """The layers between two exits, and the head of the exit that closes them: a norm and an
    optional low-rank adapter, both trained by `python -m pipeline calibrate` (backbone frozen)."""

    def __init__(self, args: ModelArgs, n_layers: int):
        super().__init__()
        self.args = args
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(n_layers))
        self.exit_norm = RMSNorm(args.dim, args.norm_eps)
        # every segment has one, the full-depth exit's included (left at identity), so that segments of equal depth share a graph
        self.exit_adapter = LowRankAdapter(args.dim, args.exit_adapter_rank) if args.exit_adapter_rank else None

    def exit(self, h: torch.Tensor) -> torch.Tensor:
        """What the shared LM head reads at this exit: [..., D] -> [..., D].

        Norm first, so that the adapter sees unit-RMS input whatever the residual stream's scale at
        this depth (it grows by orders of magnitude over a real checkpoint's layers)."""
        h = self.exit_norm(h)
        if self.exit_adapter is not None:
            h = h + self.exit_adapter(h)
        return h

    def forward(self, h, position_ids, kv_mask, kv):
        # h [B, S, D], position_ids [B, S], kv_mask [B, P], kv [L, 2, B, Hkv, P, hd]
        cos, sin = rope_tables(self.args, position_ids, h.dtype)
        mask = causal_mask(kv_mask, h.shape[1], h.dtype)
        presents = []
        for i, layer in enumerate(self.layers):
            h, present = layer(h, cos, sin, mask, kv[i])
            presents.append(present)
        return h, torch.stack(presents)  # [B, S, D], [L, 2, B, Hkv, T, hd]

    def empty_kv(self, batch: int, device=None, dtype=None) -> torch.Tensor:
        a = self.args
        return torch.zeros(len(self.layers), 2, batch, a.n_kv_heads, 0, a.head_dim, device=device, dtype=dtype)


class Transformer(nn.Module):
    """Token embedding, the exit segments and the shared LM head."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        args.check()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.segments = nn.ModuleList(Segment(args, end - start) for start, end in args.segment_bounds)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)

    def segments_for(self, exit_layer: int) -> int:
        """How many segments run for a given exit depth."""
        if exit_layer not in self.args.exit_layers:
            raise ValueError(f"exit depth {exit_layer} is not one of {self.args.exit_layers}")
        return self.args.exit_layers.index(exit_layer) + 1
