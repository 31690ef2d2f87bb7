"""A Whisper-style audio encoder: 80-bin log-mel at 16 kHz -> audio tokens at the decoder's width.

Two convolutions (the second strided by 2) turn 100 mel frames per second into 50 positions,
transformer blocks mix them, and average pooling by `pool` shortens the sequence before the
projection, so that 30 s of audio costs 375 media tokens rather than 1500.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .block import EncoderBlock, Projector


@dataclass
class AudioArgs:
    n_mels: int = 80
    sample_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160  # 10 ms: 100 frames per second
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    ffn_dim: int = 3072
    pool: int = 4
    max_seconds: float = 30.0
    norm_eps: float = 1e-5

    @property
    def frame_multiple(self) -> int:
        """Mel frames come in multiples of this (conv stride 2 times pooling)."""
        return 2 * self.pool

    @property
    def max_frames(self) -> int:
        per_second = self.sample_rate // self.hop_length
        return int(self.max_seconds * per_second) // self.frame_multiple * self.frame_multiple


def sinusoids(length: int, channels: int, device=None) -> torch.Tensor:
    """Whisper's fixed positional embedding, [length, channels]."""
    log_timescale = math.log(10000) / (channels // 2 - 1)
    inv = torch.exp(-log_timescale * torch.arange(channels // 2, device=device).float())
    t = torch.arange(length, device=device).float()[:, None] * inv[None, :]
    return torch.cat([t.sin(), t.cos()], dim=1)


class AudioEncoder(nn.Module):
    def __init__(self, args: AudioArgs, out_dim: int):
        super().__init__()
        self.args = args
        self.conv1 = nn.Conv1d(args.n_mels, args.dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(args.dim, args.dim, kernel_size=3, stride=2, padding=1)
        self.blocks = nn.ModuleList(EncoderBlock(args.dim, args.n_heads, args.ffn_dim, args.norm_eps) for _ in range(args.n_layers))
        self.norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.projector = Projector(args.dim, out_dim)

    def forward(self, mel):
        # mel [B, n_mels, F] with F a multiple of frame_multiple
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # [B, F/2, C]
        b, n, c = x.shape
        x = x + sinusoids(n, c, x.device).to(x.dtype)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x).view(b, n // self.args.pool, self.args.pool, c).mean(2)  # [B, F/(2*pool), C]
        return self.projector(x)


@lru_cache(maxsize=4)
def mel_filters(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Slaney-scale, area-normalised mel filterbank [n_mels, n_fft/2 + 1] (librosa's default, Whisper's)."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0

    def hz_to_mel(f):
        f = np.asarray(f, dtype=np.float64)
        return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, min_log_hz) / min_log_hz) / logstep, f / f_sp)

    def mel_to_hz(m):
        return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)

    fft_freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    weights = np.maximum(0, np.minimum(-ramps[:-2] / fdiff[:-1, None], ramps[2:] / fdiff[1:, None]))
    weights *= (2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels]))[:, None]
    return weights.astype(np.float32)


def log_mel(wave: np.ndarray, args: AudioArgs) -> torch.Tensor:
    """Mono float waveform at args.sample_rate -> Whisper-normalised log-mel [n_mels, F].

    F is rounded up to a multiple of args.frame_multiple by padding with silence.
    """
    frames = max(1, len(wave) // args.hop_length)
    frames = -(-frames // args.frame_multiple) * args.frame_multiple
    wave = np.pad(wave.astype(np.float32), (0, max(0, frames * args.hop_length - len(wave))))
    stft = torch.stft(torch.from_numpy(wave), args.n_fft, args.hop_length, window=torch.hann_window(args.n_fft), return_complex=True)
    power = stft[:, :frames].abs() ** 2  # [n_fft/2 + 1, F]
    mel = torch.from_numpy(mel_filters(args.sample_rate, args.n_fft, args.n_mels)) @ power
    logspec = mel.clamp(min=1e-10).log10()
    logspec = torch.maximum(logspec, logspec.max() - 8.0)
    return (logspec + 4.0) / 4.0
