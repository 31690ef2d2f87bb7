"""Images and audio from request content parts into encoder inputs, refusing what cannot be decoded
or is too large before it costs memory: an image's pixel count is read from its header before
the pixels are decoded, a WAV's duration before its samples are read.

The bytes come from clients and go through third-party parsers (Pillow's, the wave module's),
which signal bad input with whatever exception their code happens to raise (struct.error,
SyntaxError, IndexError, Pillow's DecompressionBombError...): every one of them is a MediaError,
a 400 for the client, never a 500.
"""
from __future__ import annotations

import base64
import binascii
import io
import re
import wave
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from model.multimodal.audio import AudioArgs, log_mel
from model.multimodal.vision import IMAGE_MEAN, IMAGE_STD

DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*),(?P<payload>.*)", re.DOTALL)
SAMPLE_SCALE = {1: 128.0, 2: 32768.0, 4: 2147483648.0}  # full scale of 8-, 16- and 32-bit PCM
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # what Pillow may try: no parser of a format nobody sends


class MediaError(ValueError):
    """Bad media in a request: a 400 naming the offending parameter."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class MediaLimits:
    max_image_pixels: int
    max_audio_seconds: float
    max_fetch_bytes: int
    allowed_image_hosts: frozenset[str]
    fetch_timeout_s: float


def why(e: Exception) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def decode_base64(payload: str, param: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"{param} is not valid base64", param) from None


async def image_bytes(url: str, limits: MediaLimits, param: str) -> bytes:
    """The bytes behind an image_url: a data: URL, or an http(s) URL on an allow-listed host."""
    if url.startswith("data:"):
        m = DATA_URL.fullmatch(url)
        if not m or ";base64" not in m["params"]:
            raise MediaError(f"{param} must be a base64 data URL (data:image/png;base64,...)", param)
        return decode_base64(m["payload"], param)
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:  # an unclosed IPv6 bracket, a bad port
        raise MediaError(f"{param} is not a valid URL", param) from None
    if parts.scheme not in ("http", "https") or not host:
        raise MediaError(f"{param} must be a data: URL or an http(s) URL", param)
    if host.lower() not in limits.allowed_image_hosts:
        raise MediaError(f"{param}: remote image URLs are refused unless their host is in server.allowed_image_hosts; "
                         f"{host} is not (send the image as a data: URL)", param)
    try:
        async with httpx.AsyncClient(timeout=limits.fetch_timeout_s, follow_redirects=False) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise MediaError(f"{param}: fetching {url} gave HTTP {response.status_code}", param)
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > limits.max_fetch_bytes:
                        raise MediaError(f"{param}: {url} is larger than {limits.max_fetch_bytes} bytes", param)
                return bytes(data)
    except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError, ValueError) as e:  # InvalidURL and StreamError are no HTTPError
        raise MediaError(f"{param}: could not fetch {url}: {type(e).__name__}", param) from None


def decode_image(data: bytes, limits: MediaLimits, size: int, param: str) -> torch.Tensor:
    """Encoded image -> normalised pixels [3, size, size]."""
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # reads the header only
    except UnidentifiedImageError:
        raise MediaError(f"{param} is not an image format the server can decode (PNG, JPEG, WebP, GIF, BMP)", param) from None
    except Image.DecompressionBombError as e:  # Pillow's own guard: a header declaring over twice Image.MAX_IMAGE_PIXELS
        declared = re.search(r"\((\d+) pixels\)", str(e))
        raise MediaError(f"{param} declares {declared[1] if declared else 'more'} pixels in its header, over the limit of {limits.max_image_pixels} "
                         "(a decompression bomb?)", param) from None
    except Exception as e:  # noqa: BLE001 - see the module docstring
        raise MediaError(f"{param} could not be decoded: {why(e)}", param) from None
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise MediaError(f"{param} is {width}x{height} = {width * height} pixels, over the limit of {limits.max_image_pixels}", param)
    try:
        image = image.convert("RGB")  # decodes
    except Exception as e:  # noqa: BLE001 - see the module docstring
        raise MediaError(f"{param} could not be decoded: {why(e)}", param) from None
    # squash rather than crop: a phone screenshot is tall, and a centre crop would drop most of the screen
    image = image.resize((size, size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (pixels - torch.tensor(IMAGE_MEAN)[:, None, None]) / torch.tensor(IMAGE_STD)[:, None, None]


def decode_audio(data: bytes, fmt: str, limits: MediaLimits, args: AudioArgs, param: str) -> torch.Tensor:
    """A base64-decoded WAV -> log-mel [1, n_mels, frames] at the encoder's sample rate."""
    if fmt.lower() != "wav":
        raise MediaError(f"{param}.format={fmt!r} is not supported; send 16-bit PCM WAV (format 'wav')", f"{param}.format")
    try:
        with wave.open(io.BytesIO(data)) as w:
            channels, width, rate, frames = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            if width not in SAMPLE_SCALE or rate <= 0 or channels <= 0:
                raise MediaError(f"{param}.data: {8 * width}-bit WAV at {rate} Hz is not supported; send 8-, 16- or 32-bit PCM", f"{param}.data")
            seconds = frames / rate
            if seconds > limits.max_audio_seconds:
                raise MediaError(f"{param}.data is {seconds:.2f} s of audio, over the limit of {limits.max_audio_seconds:g} s", f"{param}.data")
            raw = w.readframes(frames)
    except MediaError:
        raise
    except Exception as e:  # noqa: BLE001 - wave.Error, EOFError, struct.error...: see the module docstring
        raise MediaError(f"{param}.data is not a PCM WAV file: {why(e)}", f"{param}.data") from None
    if frames == 0 or len(raw) < frames * channels * width:
        raise MediaError(f"{param}.data holds no audio, or fewer samples than its header announces", f"{param}.data")
    dtype = {1: np.uint8, 2: np.int16, 4: np.int32}[width]
    samples = np.frombuffer(raw[:frames * channels * width], dtype=dtype).astype(np.float32)
    if width == 1:  # 8-bit WAV is unsigned
        samples -= 128.0
    wave_ = (samples / SAMPLE_SCALE[width]).reshape(frames, channels).mean(axis=1)
    if rate != args.sample_rate:  # linear resampling: the mel filterbank is far coarser than what it loses
        n = int(round(frames * args.sample_rate / rate))
        wave_ = np.interp(np.arange(n) * (rate / args.sample_rate), np.arange(frames), wave_).astype(np.float32)
    return log_mel(wave_, args)[None]
