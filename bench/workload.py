"""The benchmark workload: chat requests built from a `BenchConfig`, byte for byte the same on
every run and every machine.

Media is synthetic so that nothing is downloaded and nothing changes under the benchmark's feet:
charts drawn with Pillow from data drawn from a seeded generator (bars, lines, a pie), and WAV
files of tones, chirps and beeps synthesised with numpy. Every random draw comes from a generator
seeded by (workload seed, group, request number), so adding a group or a request never reshuffles
the others.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import wave
import zlib
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

from contract.config import BenchConfig, RequestGroup

MODALITIES = ("text", "image", "audio")
SAMPLE_RATE = 16000  # what the audio encoder's log-mel expects; the server resamples anything else
CHART_KINDS = ("bars", "lines", "pie")
SOUND_KINDS = ("tone", "chirp", "beeps")
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


class WorkloadError(ValueError):
    """A workload config that cannot produce requests; the message names the field."""


@dataclass(frozen=True)
class BenchRequest:
    index: int  # position in the send order
    group: str
    modalities: tuple[str, ...]
    prompt: str
    max_tokens: int
    image_png: bytes | None = None
    audio_wav: bytes | None = None
    media_digest: str = ""  # sha256 of the decoded media (pixels, PCM): stable across PNG encoders

    @property
    def text_only(self) -> bool:
        return self.modalities == ("text",)

    def messages(self) -> list[dict]:
        if self.text_only:
            return [{"role": "user", "content": self.prompt}]
        parts: list[dict] = []
        if self.image_png is not None:
            url = "data:image/png;base64," + base64.b64encode(self.image_png).decode()
            parts.append({"type": "image_url", "image_url": {"url": url}})
        if self.audio_wav is not None:
            parts.append({"type": "input_audio", "input_audio": {"data": base64.b64encode(self.audio_wav).decode(), "format": "wav"}})
        parts.append({"type": "text", "text": self.prompt})
        return [{"role": "user", "content": parts}]

    def body(self, model_id: str, temperature: float, seed: int, max_tokens: int | None = None) -> dict:
        """An OpenAI chat.completions request that streams and reports usage in its last chunk."""
        return {
            "model": model_id,
            "messages": self.messages(),
            "max_tokens": max_tokens or self.max_tokens,
            "temperature": temperature,
            "seed": seed,
            "stream": True,
            "stream_options": {"include_usage": True},
        }


def build_workload(cfg: BenchConfig) -> list[BenchRequest]:
    """Every request of the workload in send order: groups interleaved by a seeded permutation,
    so that each concurrency level sees the same mix from its first request on."""
    if not cfg.groups:
        raise WorkloadError(f"bench={cfg.name} has no request groups (bench.groups is empty)")
    made: list[BenchRequest] = []
    for name, group in cfg.groups.items():
        check_group(name, group)
        for i in range(group.count):
            made.append(make_request(cfg.seed, name, group, i))
    order = np.random.default_rng(cfg.seed).permutation(len(made))
    return [replace(made[j], index=k) for k, j in enumerate(order)]


def check_group(name: str, group: RequestGroup) -> None:
    where = f"bench.groups.{name}"
    if group.count < 0 or group.max_tokens < 1:
        raise WorkloadError(f"{where}: count must be >= 0 and max_tokens >= 1")
    if "text" not in group.modalities or any(m not in MODALITIES for m in group.modalities):
        raise WorkloadError(f"{where}.modalities={list(group.modalities)} must hold 'text' and only {MODALITIES}")
    if not group.prompts:
        raise WorkloadError(f"{where}.prompts is empty")
    if "image" in group.modalities and group.image_size < 32:
        raise WorkloadError(f"{where}.image_size={group.image_size} is too small for a chart (>= 32)")
    if "audio" in group.modalities and (not group.audio_seconds or min(group.audio_seconds) <= 0):
        raise WorkloadError(f"{where}.audio_seconds must list positive lengths")


def make_request(seed: int, group_name: str, group: RequestGroup, i: int) -> BenchRequest:
    # crc32, not hash(): Python salts str hashes per process
    rng = np.random.default_rng([seed, zlib.crc32(group_name.encode()), i])
    png = wav = None
    digest = hashlib.sha256()
    if "image" in group.modalities:
        image = draw_chart(CHART_KINDS[i % len(CHART_KINDS)], group.image_size, rng)
        digest.update(image.tobytes())
        png = encode_png(image)
    if "audio" in group.modalities:
        seconds = group.audio_seconds[i % len(group.audio_seconds)]
        pcm = synth_sound(SOUND_KINDS[i % len(SOUND_KINDS)], seconds, rng)
        digest.update(pcm.tobytes())
        wav = encode_wav(pcm)
    modalities = tuple(m for m in MODALITIES if m in group.modalities)
    return BenchRequest(0, group_name, modalities, group.prompts[i % len(group.prompts)], group.max_tokens, png, wav,
                        digest.hexdigest() if png or wav else "")


def fingerprint(requests: list[BenchRequest]) -> str:
    """One hash of what the workload sends: two reports with equal fingerprints ran the same requests."""
    rows = [[r.group, list(r.modalities), r.prompt, r.max_tokens, r.media_digest] for r in requests]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()


# --- synthetic charts -------------------------------------------------------------------------


def draw_chart(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """A chart without text (font rendering differs between FreeType builds; shapes do not)."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = int(size * 0.12), int(size * 0.08), int(size * 0.95), int(size * 0.88)
    if kind == "pie":
        shares = rng.dirichlet(np.ones(int(rng.integers(3, 7))))
        start = 0.0
        box = (int(size * 0.15), int(size * 0.15), int(size * 0.85), int(size * 0.85))
        for k, share in enumerate(shares):
            end = start + 360.0 * float(share)
            draw.pieslice(box, start, end, fill=PALETTE[k % len(PALETTE)], outline="white")
            start = end
        return image
    for k in range(1, 5):  # grid lines
        y = bottom - (bottom - top) * k // 4
        draw.line([(left, y), (right, y)], fill=(220, 220, 220), width=1)
    if kind == "bars":
        values = rng.integers(10, 101, size=int(rng.integers(4, 9)))
        slot = (right - left) / len(values)
        for k, v in enumerate(values):
            x0 = left + int(slot * k + slot * 0.15)
            x1 = left + int(slot * (k + 0.85))
            draw.rectangle([x0, bottom - int((bottom - top) * v / 100), x1, bottom], fill=PALETTE[k % len(PALETTE)])
    else:  # lines: a few random walks
        n = int(rng.integers(8, 16))
        for k in range(int(rng.integers(2, 4))):
            walk = np.clip(50 + np.cumsum(rng.normal(0, 8, size=n)), 2, 98)
            points = [(left + (right - left) * j // (n - 1), bottom - int((bottom - top) * v / 100)) for j, v in enumerate(walk)]
            draw.line(points, fill=PALETTE[k], width=max(2, size // 150))
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black", width=max(1, size // 224))  # axes
    return image


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


# --- synthetic audio --------------------------------------------------------------------------


def synth_sound(kind: str, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Mono 16-bit PCM at 16 kHz: a chord of harmonics, a sweep, or bursts of a tone."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    if kind == "tone":
        f0 = float(rng.choice([220.0, 261.63, 329.63, 440.0]))
        x = sum(np.sin(2 * np.pi * f0 * h * t) / h for h in (1, 2, 3))
    elif kind == "chirp":
        f0, f1 = float(rng.uniform(200, 600)), float(rng.uniform(1200, 3000))
        if rng.random() < 0.5:
            f0, f1 = f1, f0  # falling as often as rising
        x = np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * seconds)))
    else:  # beeps: a tone gated on and off
        f0, rate = float(rng.uniform(600, 1500)), float(rng.uniform(2, 6))
        x = np.sin(2 * np.pi * f0 * t) * (np.sin(2 * np.pi * rate * t) > 0)
    x = x / max(1e-9, float(np.abs(x).max()))
    fade = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.01) if len(t) > 1 else np.ones_like(t)  # no clicks at the ends
    return np.round(0.5 * 32767 * x * fade).astype("<i2")


def encode_wav(pcm: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())
    return buffer.getvalue()
