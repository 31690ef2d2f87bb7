"""The benchmark workload: chat requests built from a `BenchConfig`, byte for byte the same on
every run and every machine.

Media is synthetic so that nothing is downloaded and nothing changes under the benchmark's feet:
charts drawn with Pillow from data drawn from a seeded generator (bars, lines, a pie), and WAV
files of tones, chirps and beeps synthesised with numpy. Every random draw comes from a generator
seeded by (workload seed, group, request number), so adding a group or a request never reshuffles
the others.

For a model trained on scripts/build_corpus.py --code's corpus (`bench.corpus`), two kinds of group
draw from its held-out part, which the training never saw: `source: code`, a held-out .py file cut at
a line boundary after an instruction to continue it, and `source: docstrings`, the held-out docstring
questions (heldout/chats.jsonl). Files and questions are taken in a seeded order; a code prompt's
length is drawn between half and all of its budget (`max_prompt_tokens`, and never past the engines'
context less `max_tokens`), counted with the served model's tokenizer, chat template included.
Without `bench.corpus` those groups send nothing.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import wave
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from contract.config import BenchConfig, RequestGroup
from model.tokenizer import ChatTokenizer

MODALITIES = ("text", "image", "audio")
SOURCES = ("prompts", "code", "docstrings")  # RequestGroup.source
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


def build_workload(cfg: BenchConfig, tokenizer: ChatTokenizer | None = None, context: int | None = None) -> list[BenchRequest]:
    """Every request of the workload in send order: groups interleaved by a seeded permutation,
    so that each concurrency level sees the same mix from its first request on. `tokenizer` (the
    served model's) and `context` (the engines' tokens) size the corpus groups' prompts; they are
    needed only with bench.corpus."""
    if not cfg.groups:
        raise WorkloadError(f"bench={cfg.name} has no request groups (bench.groups is empty)")
    made: list[BenchRequest] = []
    corpus = None
    for name, group in active_groups(cfg).items():
        check_group(name, group)
        if group.source == "prompts":
            made += [make_request(cfg.seed, name, group, i) for i in range(group.count)]
            continue
        if tokenizer is None or context is None:
            raise WorkloadError(f"bench.groups.{name} (source {group.source}) needs the served model's tokenizer and context")
        corpus = corpus or HeldOut.load(cfg.corpus)
        made += corpus_requests(corpus, cfg.seed, name, group, tokenizer, context)
    order = np.random.default_rng(cfg.seed).permutation(len(made))
    return [replace(made[j], index=k) for k, j in enumerate(order)]


def active_groups(cfg: BenchConfig) -> dict[str, RequestGroup]:
    """The groups that send requests: those of source code or docstrings only with bench.corpus."""
    return {name: g for name, g in cfg.groups.items() if g.source == "prompts" or cfg.corpus}


def check_group(name: str, group: RequestGroup) -> None:
    where = f"bench.groups.{name}"
    if group.count < 0 or group.max_tokens < 1:
        raise WorkloadError(f"{where}: count must be >= 0 and max_tokens >= 1")
    if group.source not in SOURCES:
        raise WorkloadError(f"{where}.source={group.source!r} is not one of {SOURCES}")
    if group.source != "prompts" and group.modalities != ["text"]:
        raise WorkloadError(f"{where}: a group of source {group.source} is text only (modalities [text])")
    if group.max_prompt_tokens < 0:
        raise WorkloadError(f"{where}.max_prompt_tokens={group.max_prompt_tokens} must be >= 0 (0: the context left after max_tokens)")
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


# --- the held-out corpus ------------------------------------------------------------------------


@dataclass(frozen=True)
class HeldOut:
    """The held-out part of a scripts/build_corpus.py --code folder: its .py files and docstring questions."""

    directory: Path
    code: list[str]  # file names under heldout/, in the corpus's seeded order
    questions: list[str]  # the user turns of heldout/chats.jsonl, in file order

    @classmethod
    def load(cls, folder: str | None) -> HeldOut:
        root = Path(folder or "").expanduser()
        record_file = root / "corpus.json"
        try:
            record = json.loads(record_file.read_text())
            names = record["parts"]["heldout"]["names"]
            chats = (root / "heldout" / "chats.jsonl").read_text(encoding="utf-8").splitlines()
            questions = [json.loads(line)["messages"][0]["content"] for line in chats if line.strip()]
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            raise WorkloadError(f"bench.corpus={folder}: not a scripts/build_corpus.py --code folder ({type(e).__name__}: {e})") from None
        # build_corpus names the held-out files NNNNN-py-<module>.txt (sources) and NNNNN-readme-<package>.txt
        code = [n for n in names if n.split("-", 1)[-1].startswith("py-")]
        return cls(root / "heldout", code, questions)


def corpus_requests(corpus: HeldOut, seed: int, name: str, group: RequestGroup, tokenizer: ChatTokenizer, context: int) -> list[BenchRequest]:
    """`group.count` requests of a code or docstrings group: the corpus's files or questions in a
    seeded order, each prompt within the group's budget (a file or question that cannot fit is passed over)."""
    items = corpus.code if group.source == "code" else corpus.questions
    budget = context - group.max_tokens
    if group.max_prompt_tokens:
        budget = min(budget, group.max_prompt_tokens)
    order = np.random.default_rng([seed, zlib.crc32(name.encode())]).permutation(len(items))
    made: list[BenchRequest] = []
    for j in order:
        if len(made) == group.count:
            break
        i = len(made)
        if group.source == "docstrings":
            prompt = items[j]
            if prompt_tokens(tokenizer, prompt) > budget:
                continue
        else:
            rng = np.random.default_rng([seed, zlib.crc32(name.encode()), i])
            text = (corpus.directory / items[j]).read_text(encoding="utf-8")
            prompt = cut_at_line(group.prompts[i % len(group.prompts)], text, int(budget * rng.uniform(0.5, 1.0)), tokenizer)
            if prompt is None:
                continue
        made.append(BenchRequest(0, name, ("text",), prompt, group.max_tokens))
    if len(made) < group.count:
        raise WorkloadError(f"bench.groups.{name}: {corpus.directory} has {len(made)} {group.source} prompts within "
                            f"{budget} tokens, not the {group.count} asked for")
    return made


def cut_at_line(instruction: str, text: str, budget: int, tokenizer: ChatTokenizer) -> str | None:
    """The instruction, a newline and the longest run of the text's first lines whose prompt holds at most
    `budget` tokens, with at least one line left for the model to continue; None where not even one line fits."""
    lines = text.splitlines(keepends=True)
    lines = lines[:min(len(lines) - 1, budget)]  # the search's bound: past runs of blank lines, a line takes a token at least
    lo, hi = 0, len(lines)  # the prompt of lines[:lo] fits; find the largest such lo
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if prompt_tokens(tokenizer, instruction + "\n" + "".join(lines[:mid])) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return instruction + "\n" + "".join(lines[:lo]) if lo else None


def prompt_tokens(tokenizer: ChatTokenizer, prompt: str) -> int:
    """The tokens the server will prefill for this prompt as the one user message."""
    return len(tokenizer.apply_chat_template([{"role": "user", "content": prompt}]))


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
