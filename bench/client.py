"""The bench's HTTP client: streaming chat completions sent at a concurrency and an arrival rate,
each measured from the client's side of the stream (time to first token, per output token,
latency, the path the server chose). The probe (bench/probe.py) sends its requests with it too."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx
import numpy as np

from bench.workload import BenchRequest


@dataclass
class RequestResult:
    index: int
    group: str
    modalities: list[str]
    ok: bool
    error: str | None = None
    status: int | None = None
    path: str | None = None  # the engine path the server chose
    exit_layer: int | None = None
    devices: dict[str, str] = field(default_factory=dict)  # engine -> device it ran on
    engines: list[str] = field(default_factory=list)
    prompt_tokens: int | None = None
    cached_tokens: int = 0  # of the prompt's, served from the server's prefix cache (usage.prompt_tokens_details; 0 without)
    completion_tokens: int | None = None
    finish_reason: str | None = None
    start_s: float = 0.0  # when it was sent, from the start of the run
    queued_s: float = 0.0  # waiting for a free concurrency slot in the bench, before it was sent
    ttft_s: float | None = None  # sent -> first chunk carrying generated text
    latency_s: float | None = None  # sent -> [DONE]
    tpot_s: float | None = None  # (latency - ttft) / (completion tokens - 1)
    tokens: list[str] = field(default_factory=list)  # each generated token's chunk text, in order (bench/quality.py)
    speculation: dict[str, int] | None = None  # drafted, accepted, verifications, tokens: when the server speculated
    timeline: dict[str, float] = field(default_factory=dict)  # the server's parts of the time to first token, ms (runtime.requests.Timeline)
    cut: bool = False  # not sent, or cut off mid-stream, when the run's time limit ran out (drive's limit_s)


async def send(client: httpx.AsyncClient, url: str, request: BenchRequest, body: dict, mode: str, t_run: float,
               queued_s: float) -> RequestResult:
    result = RequestResult(request.index, request.group, list(request.modalities), ok=False, queued_s=queued_s)
    t0 = time.perf_counter()
    result.start_s = t0 - t_run
    info: dict = {}
    usage: dict = {}
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            result.status = response.status_code
            header_path = response.headers.get("x-dyngraph-path")
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {error_message(text)}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                now = time.perf_counter()
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    # the first generated token (a chunk per token, its text possibly empty), not the
                    # role-only opening chunk
                    if "role" not in delta and ("content" in delta or "reasoning_content" in delta):
                        result.tokens.append(delta.get("reasoning_content") or delta.get("content") or "")
                    if result.ttft_s is None and "role" not in delta and ("content" in delta or "reasoning_content" in delta):
                        result.ttft_s = now - t0
                    if choice.get("finish_reason"):
                        result.finish_reason = choice["finish_reason"]
                        if result.ttft_s is None:  # a stream whose tokens decoded to no text at all
                            result.ttft_s = now - t0
                usage = chunk.get("usage") or usage
                info = chunk.get("dyngraph") or info
            result.latency_s = time.perf_counter() - t0
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.path = info.get("path") or header_path
    result.exit_layer = info.get("exit_layer")
    result.devices = dict(info.get("devices") or {})
    result.engines = list(info.get("engines") or [])
    result.speculation = info.get("speculation")
    result.timeline = dict(info.get("timeline") or {})
    result.prompt_tokens, result.completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
    result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    if not usage:
        result.error = "the stream carried no usage (stream_options.include_usage)"
    elif not result.path:
        result.error = "the response named no path (x-dyngraph-path header, dyngraph field)"
    elif info.get("mode") not in (None, mode):
        result.error = f"the server answered in {info.get('mode')} mode, the bench asked for {mode}"
    elif header_path and info.get("path") and header_path != info["path"]:
        result.error = f"x-dyngraph-path says {header_path} but the dyngraph field says {info['path']}"
    else:
        result.ok = True
        if result.completion_tokens and result.completion_tokens > 1 and result.ttft_s is not None:
            result.tpot_s = (result.latency_s - result.ttft_s) / (result.completion_tokens - 1)
    return result


def error_message(text: str) -> str:
    try:
        return json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return text.strip()[:200]


def arrival_times(n: int, rate: float | None, seed: int, concurrency: int) -> list[float]:
    """Poisson arrivals at `rate` per second (seeded: every mode sees the same schedule), or all at 0."""
    if not rate:
        return [0.0] * n
    rng = np.random.default_rng([seed, concurrency])
    return np.cumsum(rng.exponential(1.0 / rate, size=n)).tolist()


async def drive(url: str, requests: list[BenchRequest], bodies: list[dict], mode: str, concurrency: int, arrivals: list[float],
                timeout_s: float, on_done, limit_s: float | None = None) -> list[RequestResult]:
    """Send every request, at most `concurrency` at a time, each no earlier than its arrival time.
    `limit_s`: the run stops that long after its start; a request not sent by then is not sent, one
    in flight is cut off (closing its stream cancels it in the server), both marked `cut`.
    (`timeout_s` bounds the wait for each chunk, not a request's whole time.)"""
    slots = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=30.0), limits=limits) as client:
        t_run = time.perf_counter()
        end = t_run + limit_s if limit_s else None

        async def one(request: BenchRequest, body: dict, arrival: float) -> RequestResult:
            await asyncio.sleep(max(0.0, t_run + arrival - time.perf_counter()))
            waited = time.perf_counter()
            async with slots:
                queued = time.perf_counter() - waited
                if end is None:
                    result = await send(client, url, request, body, mode, t_run, queued)
                else:
                    result = RequestResult(request.index, request.group, list(request.modalities), ok=False, queued_s=queued,
                                           cut=True, error=f"cut: the run's time limit of {limit_s:g} s ran out")
                    if time.perf_counter() < end:
                        try:
                            result = await asyncio.wait_for(send(client, url, request, body, mode, t_run, queued), end - time.perf_counter())
                        except asyncio.TimeoutError:
                            pass
            on_done(result)
            return result

        return list(await asyncio.gather(*(one(r, b, a) for r, b, a in zip(requests, bodies, arrivals))))
