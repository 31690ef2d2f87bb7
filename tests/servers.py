"""What the tests that run `python -m runtime.serve` share: the server as a subprocess (`Server`),
request parts and bodies, the eager model's greedy text to compare with, and a condition wait."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import time
import wave
from pathlib import Path

import httpx
import numpy as np
import openai
import torch
from PIL import Image

from model.tokenizer import ChatTokenizer

from .conftest import ROOT, free_port

MODEL = "autoglm-phone-9b"
TOK = ChatTokenizer.builtin()
# the dynamic server's heuristic looks at text length only: < 20, 40, 60 characters exit at 6, 12, 18, else 24
DEPTH_POLICY = ["runtime.policy.length_chars=100", "runtime.policy.length_weight=1.0", "runtime.policy.question_weight=0",
                "runtime.policy.image_weight=0", "runtime.policy.audio_weight=0"]
TEXT = {6: "Open the camera", 12: "Open the camera and take a photo", 18: "Open the camera, take a photo of the receipt, then save it",
        24: "Open the camera, take a photo of the receipt, save it to the gallery and send it to Alice on WeChat"}


class Server:
    """One `python -m runtime.serve` process; its log goes to a file the tests read."""

    def __init__(self, engines_root: Path, log: Path, *overrides: str, env: dict | None = None, port: int | None = None):
        self.port = port or free_port()
        self.engines_dir = engines_root
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self.log = open(log, "w")
        args = [sys.executable, "-m", "runtime.serve", f"engines_dir={engines_root}", f"server.port={self.port}", *overrides]
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"server did not come up:\n{self.logs()}")

    def logs(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def client(self, api_key: str = "EMPTY", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, **kw)

    def post(self, body, headers: dict | None = None, timeout: float = 60) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(f"{self.url}/v1/chat/completions", content=content, timeout=timeout,
                          headers={"content-type": "application/json", **(headers or {})})

    def metric(self, name: str, **labels) -> float:
        text = httpx.get(f"{self.url}/metrics").text
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if labels else r"(\{[^}]*\})?") + r" ([0-9.e+-]+)"
        return sum(float(m.group(m.lastindex)) for m in re.finditer(pattern, text))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def png_url(width: int = 64, height: int = 48) -> str:
    image = Image.fromarray(np.random.default_rng(width).integers(0, 255, (height, width, 3), dtype=np.uint8))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def wav_b64(seconds: float, rate: int = 16000, channels: int = 1) -> str:
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.3 * np.sin(2 * np.pi * 330 * t) * 32767).astype(np.int16)
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.repeat(samples, channels).tobytes())
    return base64.b64encode(out.getvalue()).decode()


def user(*parts) -> list[dict]:
    content = [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]
    return [{"role": "user", "content": content}]


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def audio_part(data: str, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}


def chat(server: Server, messages, **kw) -> tuple[dict, httpx.Headers]:
    raw = server.client().chat.completions.with_raw_response.create(model=MODEL, messages=messages, **kw)
    return raw.http_response.json(), raw.headers


def eager_text(model, text: str, exit_layer: int, max_tokens: int) -> tuple[str, int, str]:
    """What greedy decoding of the eager model gives: (text as the server streams it, completion tokens, finish reason)."""
    ids = torch.tensor([TOK.apply_chat_template([{"role": "user", "content": text}])])
    decoder, pieces = TOK.stream_decoder(skip_special_tokens=True), []
    with torch.inference_mode():
        for n in range(1, max_tokens + 1):
            token = int(model(ids, exit_layer)[0, -1, :TOK.vocab_size].argmax())
            if token in TOK.eos_ids:
                return "".join(pieces), n, "stop"
            pieces.append(decoder.step(token))
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return "".join(pieces), max_tokens, "length"


def langchain_round_trip(url: str) -> None:
    """ChatOpenAI as the seed documents configure it: a stream with usage, then a plain call (also run through Ray Serve)."""
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="autoglm-phone-9b", base_url=f"{url}/v1", api_key="EMPTY",
                     extra_body={"enable_thinking": True, "return_reasoning": True}, streaming=True,
                     max_tokens=6, temperature=0, stream_usage=True)
    chunks = list(llm.stream("Open WeChat and say hi to Alice"))
    total = chunks[0]
    for c in chunks[1:]:
        total = total + c
    prompt = TOK.apply_chat_template([{"role": "user", "content": "Open WeChat and say hi to Alice"}], enable_thinking=True)
    assert total.usage_metadata["input_tokens"] == len(prompt)
    assert 1 <= total.usage_metadata["output_tokens"] <= 6
    assert llm.invoke("Open WeChat").response_metadata["finish_reason"] in ("stop", "length")


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
