"""`python -m pipeline bench bench=soak`: one server under load for a fixed time, watched for leaks.

`bench.soak.streams` clients each send one request after another, streaming, drawn from the mix:
good requests (text, an image or audio), good ones whose client leaves after a few chunks,
malformed ones and ones over the server's limits. The run has three phases: a warm-up under the
same load (not counted in the latencies), then the soak itself, then nothing; the server's RSS,
open file descriptors and GPU memory (NVML, on a GPU placement) are sampled idle after the warm-up
(start), under load half-way (middle) and idle after the soak (end), and polled in between for
the peaks.

It fails, after writing its report, on any 5xx (in the status line or inside a stream), on any
answer other than the one its kind should get (a good request that is not a whole stream, a
malformed one that is not a 4xx), on RSS or GPU memory growing from start to end past
`max_rss_growth` / `max_gpu_growth`, or open files past `max_fd_growth`, and on a server that is
not healthy at the end or does not drain cleanly on SIGTERM.

Reports go to `<output_dir>/<date>-<device>-<model>-<backend>[-<quantize>]-soak/`: soak.json, soak.md and the
server's log.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import struct
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from contract.manifest import engines_path
from bench.host import cpu_model, git_state, open_nvml, report_folder, slug
from bench.server import BenchError, Server
from contract.config import BenchApp, SoakConfig
from bench.gpu_monitor import Nvml, Sampler, rss_bytes
from bench.workload import draw_chart, encode_png, encode_wav, synth_sound
from pipeline.console import make_console

KINDS = ("good", "disconnect", "malformed", "over_limit")
EXPECTED = {"good": {200}, "disconnect": {200}, "malformed": {400, 404}, "over_limit": {400, 413}}
GOOD_PROMPTS = ("你是谁?", "Open WeChat and send Alice the photo from this morning",
                "Explain step by step how to change the phone's wallpaper, then lock the screen")


@dataclass
class Outcome:
    phase: str  # warmup | soak
    kind: str
    variant: str
    status: int | None  # HTTP status; None: no response (a transport error)
    ok: bool  # what this kind should get
    error: str | None = None
    at_s: float = 0.0  # sent, from the start of the phase
    latency_s: float | None = None  # sent -> [DONE], or the whole error response
    ttft_s: float | None = None
    completion_tokens: int | None = None


@dataclass
class Sample:
    at: str  # start | middle | end
    t_s: float  # since the soak phase began
    rss_bytes: int | None
    open_fds: int | None
    gpu_used_bytes: dict[str, int | None] = field(default_factory=dict)  # NVML, the whole device
    gpu_process_bytes: dict[str, int | None] = field(default_factory=dict)  # NVML, the server's process
    server_devices: dict = field(default_factory=dict)  # the server's /stats devices block


# --- the requests -------------------------------------------------------------------------------


def bomb_png(side: int = 30000) -> bytes:
    """A PNG of a few hundred bytes whose header declares side x side pixels: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * (3 * side + 1))) + chunk(b"IEND", b"")


class Mix:
    """Every request body the soak sends, by kind and variant, built once and deterministically."""

    def __init__(self, cfg: SoakConfig, seed: int, model_id: str):
        rng = np.random.default_rng([seed, 0])
        image = "data:image/png;base64," + base64.b64encode(encode_png(draw_chart("bars", 224, rng))).decode()
        audio = base64.b64encode(encode_wav(synth_sound("tone", 1.0, rng))).decode()
        image_part = {"type": "image_url", "image_url": {"url": image}}
        audio_part = {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}}

        def body(messages, **extra) -> dict:
            return {"model": model_id, "messages": messages, "max_tokens": cfg.max_tokens, **extra}

        def user(text: str, *parts) -> list[dict]:
            return [{"role": "user", "content": [{"type": "text", "text": text}, *parts]}]

        stream = {"stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True, "temperature": 0.7}
        good = {f"text-{i}": body([{"role": "user", "content": p}], **stream) for i, p in enumerate(GOOD_PROMPTS)}
        good["image"] = body(user("描述这张图表的趋势。", image_part), **stream)
        good["audio"] = body(user("请转写这段音频。", audio_part), **stream)
        self.good = {name: json.dumps(b).encode() for name, b in good.items()}
        self.disconnect = {name: json.dumps({**json.loads(b), "max_tokens": 4 * cfg.max_tokens}).encode() for name, b in self.good.items()}
        hi = [{"role": "user", "content": "hi"}]
        bomb = "data:image/png;base64," + base64.b64encode(bomb_png()).decode()
        self.malformed = {
            "broken json": b'{"model": "' + model_id.encode() + b'", "messages": [',
            "not an object": b"[1, 2, 3]",
            "wrong type": json.dumps(body(hi, temperature="hot")).encode(),
            "unknown model": json.dumps({**body(hi), "model": "gpt-4"}).encode(),
            "lone surrogate": json.dumps(body([{"role": "user", "content": "a\ud800b"}])).encode(),  # json.dumps writes \ud800
            "NaN": json.dumps(body(hi, temperature=float("nan"))).encode(),
            "deep nesting": b"[" * 100_000 + b"]" * 100_000,
            "decompression bomb": json.dumps(body(user("what is this?", {"type": "image_url", "image_url": {"url": bomb}}))).encode(),
            "bad audio": json.dumps(body(user("listen", {"type": "input_audio", "input_audio": {
                "data": base64.b64encode(b"RIFF\0\0\0\0WAVEjunk").decode(), "format": "wav"}}))).encode(),
        }
        limits = cfg.limits
        over: dict[str, bytes] = {"max_tokens": json.dumps(body(hi, max_tokens=10**6)).encode()}
        if "max_messages" in limits:
            over["messages"] = json.dumps(body(hi * (limits["max_messages"] + 1))).encode()
        if "max_stop" in limits:
            over["stop strings"] = json.dumps(body(hi, stop=[f"s{i}" for i in range(limits["max_stop"] + 1)])).encode()
        if "max_images" in limits:
            over["images"] = json.dumps(body(user("compare", *[image_part] * (limits["max_images"] + 1)))).encode()
        if "max_body_bytes" in limits:
            over["body bytes"] = json.dumps(body([{"role": "user", "content": "x" * (limits["max_body_bytes"] + 1024)}])).encode()
        self.over_limit = over
        weights = np.array([max(0.0, float(cfg.mix.get(k, 0.0))) for k in KINDS])
        if weights.sum() <= 0 or set(cfg.mix) - set(KINDS):
            raise BenchError(f"bench.soak.mix={dict(cfg.mix)} must give positive weights to some of {', '.join(KINDS)}, and only to those")
        self.weights = weights / weights.sum()

    def draw(self, rng: np.random.Generator) -> tuple[str, str, bytes]:
        kind = KINDS[int(rng.choice(len(KINDS), p=self.weights))]
        bodies: dict[str, bytes] = getattr(self, kind)
        variant = list(bodies)[int(rng.integers(len(bodies)))]
        return kind, variant, bodies[variant]


# --- the clients -------------------------------------------------------------------------------


async def send(client: httpx.AsyncClient, url: str, kind: str, variant: str, body: bytes, cfg: SoakConfig, t_phase: float,
               phase: str) -> Outcome:
    out = Outcome(phase, kind, variant, None, ok=False)
    t0 = time.perf_counter()
    out.at_s = t0 - t_phase
    try:
        async with client.stream("POST", url, content=body, headers={"content-type": "application/json"}) as response:
            out.status = response.status_code
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                out.latency_s = time.perf_counter() - t0
                out.error = error_message(text)
                out.ok = response.status_code in EXPECTED[kind]
                return out
            chunks, done, usage = 0, False, {}
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:  # a failure after the status line: a 5xx in all but name
                    out.error = f"error inside the stream: {chunk['error'].get('message')}"
                    return out
                chunks += 1
                if out.ttft_s is None and chunks == 2:  # the first chunk only opens the assistant message
                    out.ttft_s = time.perf_counter() - t0
                usage = chunk.get("usage") or usage
                if kind == "disconnect" and chunks >= cfg.disconnect_after:
                    out.ok, out.error = True, f"left after {chunks} chunks"
                    return out  # leaving the block closes the connection mid-stream
            out.latency_s = time.perf_counter() - t0
            out.completion_tokens = usage.get("completion_tokens")
            if not done:
                out.error = "the stream ended without [DONE]"
            elif kind == "good" and out.completion_tokens != cfg.max_tokens:
                out.error = f"{out.completion_tokens} tokens generated, {cfg.max_tokens} asked for (ignore_eos)"
            else:
                out.ok = True
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        out.error = f"{type(e).__name__}: {e}"
    return out


def error_message(text: str) -> str:
    try:
        return str(json.loads(text)["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return text.strip()[:300]


async def run_phase(url: str, mix: Mix, cfg: SoakConfig, seed: int, phase: str, seconds: float, on_middle=None) -> list[Outcome]:
    """`cfg.streams` clients sending back to back until `seconds` have passed; `on_middle()` runs half-way."""
    limits = httpx.Limits(max_connections=cfg.streams, max_keepalive_connections=cfg.streams)
    outcomes: list[Outcome] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.request_timeout_s, connect=30.0), limits=limits) as client:
        t_phase = time.perf_counter()
        end = t_phase + seconds

        async def one_client(i: int) -> None:
            rng = np.random.default_rng([seed, 1 if phase == "warmup" else 2, i])
            while time.perf_counter() < end:
                kind, variant, body = mix.draw(rng)
                outcomes.append(await send(client, url + "/v1/chat/completions", kind, variant, body, cfg, t_phase, phase))

        async def middle() -> None:
            await asyncio.sleep(seconds / 2)
            await asyncio.to_thread(on_middle)

        tasks = [one_client(i) for i in range(cfg.streams)] + ([middle()] if on_middle else [])
        await asyncio.gather(*tasks)
    return outcomes


# --- measurements --------------------------------------------------------------------------------


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def take_sample(at: str, t0: float, server: Server, nvml: Nvml | None, labels: list[str]) -> Sample:
    sample = Sample(at, time.perf_counter() - t0, rss_bytes(server.pid), open_fds(server.pid))
    if nvml is not None and labels:
        sample.gpu_used_bytes = nvml.memory_used(labels)
        sample.gpu_process_bytes = nvml.process_memory(labels, server.pid)
    sample.server_devices = server.stats().get("devices", {})
    return sample


def server_statuses(url: str) -> dict[str, float]:
    """dyngraph_requests_total by status, as the server counted them."""
    text = httpx.get(url + "/metrics", timeout=30).text
    return {m[1]: float(m[2]) for m in re.finditer(r'^dyngraph_requests_total\{status="(\d+)"\} ([0-9.e+]+)$', text, re.M)}


def percentiles(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    p50, p99 = np.percentile(values, [50, 99])
    return {"n": len(values), "p50_s": float(p50), "p99_s": float(p99), "max_s": float(max(values))}


def growth(start: int | None, end: int | None) -> float | None:
    return None if not start or end is None else (end - start) / start


# --- the run -----------------------------------------------------------------------------------------


def run_soak(app: BenchApp, server_overrides: list[str], console: Console | None = None) -> Path:
    """Soak one server; return the report folder. Raises BenchError when the soak failed (after writing the report)."""
    console = console or make_console()
    cfg = app.bench.soak
    if cfg.streams < 1 or cfg.duration_s <= 0 or cfg.warmup_s < 0:
        raise BenchError(f"bench.soak: streams={cfg.streams} must be at least 1, duration_s={cfg.duration_s} positive, "
                         f"warmup_s={cfg.warmup_s} not negative")
    limits = [f"server.{name}={value}" for name, value in cfg.limits.items()]
    nvml = open_nvml(app)
    labels = [g.label for g in nvml.gpus] if nvml is not None else []
    log_dir = Path(tempfile.mkdtemp(prefix="dyngraph-soak-"))
    console.print(f"[bold]soak[/]: {cfg.streams} streams x {cfg.duration_s:g} s (after {cfg.warmup_s:g} s of warm-up), "
                  f"{app.model.name} in {cfg.mode} mode, placement {app.server.runtime}")
    outcomes: list[Outcome] = []
    samples: list[Sample] = []
    try:
        with Server(app, cfg.mode, server_overrides + limits, log_dir / "server.log") as server:
            url = server.url
            mix = Mix(cfg, app.bench.seed, server.model_id)
            if cfg.warmup_s > 0:
                outcomes += asyncio.run(run_phase(url, mix, cfg, app.bench.seed, "warmup", cfg.warmup_s))
            t0 = time.perf_counter()
            samples.append(take_sample("start", t0, server, nvml, labels))
            poller = Sampler(server.pid, cfg.sample_interval_s, nvml, labels).start()
            outcomes += asyncio.run(run_phase(url, mix, cfg, app.bench.seed, "soak", cfg.duration_s,
                                              on_middle=lambda: samples.append(take_sample("middle", t0, server, nvml, labels))))
            soak_s = time.perf_counter() - t0
            time.sleep(1.0)  # the last cancelled generations leave their slots
            peaks = poller.stop()
            samples.append(take_sample("end", t0, server, nvml, labels))
            health = httpx.get(url + "/health", timeout=30)
            counted = server_statuses(url)
            server.stop()
            exit_code = server.process.returncode
    finally:
        if nvml is not None:
            nvml.close()
    report = build_report(app, cfg, outcomes, samples, peaks, soak_s, health.status_code, health.json(), counted, exit_code, nvml, labels)
    engines = engines_path(app.engines_dir, app.model.name, app.export.backend, app.export.quantize)
    report_dir = report_folder(app, f"{datetime.now(timezone.utc):%Y-%m-%d}-{report['environment']['device_slug']}-{app.model.name}-{engines.name}-soak",
                               log_dir)
    (report_dir / "soak.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (report_dir / "soak.md").write_text(render_markdown(report))
    print_summary(report, console)
    console.print(f"report: {report_dir / 'soak.md'}")
    if report["failures"]:
        raise BenchError(f"the soak failed: {'; '.join(report['failures'])} (report: {report_dir})")
    return report_dir


def build_report(app: BenchApp, cfg: SoakConfig, outcomes: list[Outcome], samples: list[Sample], peaks, soak_s: float,
                 health_status: int, health: dict, counted: dict[str, float], exit_code: int | None, nvml: Nvml | None,
                 labels: list[str]) -> dict:
    soak = [o for o in outcomes if o.phase == "soak"]
    by_kind = {k: dict(sorted(Counter(str(o.status) for o in soak if o.kind == k).items())) for k in KINDS}
    server_errors = [o for o in outcomes if (o.status or 0) >= 500 or (o.error or "").startswith("error inside the stream")]
    unexpected = [o for o in outcomes if not o.ok]
    start, end = samples[0], samples[-1]
    rss_growth = growth(start.rss_bytes, end.rss_bytes)
    gpu_growth = {g: growth(start.gpu_used_bytes.get(g), end.gpu_used_bytes.get(g)) for g in labels}
    fd_growth = None if start.open_fds is None or end.open_fds is None else end.open_fds - start.open_fds
    failures = []
    if server_errors:
        failures.append(f"{len(server_errors)} server errors (first: {server_errors[0].kind}/{server_errors[0].variant}: "
                        f"{server_errors[0].status} {server_errors[0].error})")
    server_5xx = sum(n for status, n in counted.items() if status.startswith("5"))
    if server_5xx:
        failures.append(f"the server counted {server_5xx:g} responses with a 5xx status")
    wrong = [o for o in unexpected if o not in server_errors]
    if wrong:
        failures.append(f"{len(wrong)} requests got another answer than their kind should "
                        f"(first: {wrong[0].kind}/{wrong[0].variant}: {wrong[0].status} {wrong[0].error})")
    if rss_growth is not None and rss_growth > cfg.max_rss_growth:
        failures.append(f"the server's RSS grew by {rss_growth:.1%} from start to end, over bench.soak.max_rss_growth={cfg.max_rss_growth:g}")
    for g, x in gpu_growth.items():
        if x is not None and x > cfg.max_gpu_growth:
            failures.append(f"{g}'s used memory grew by {x:.1%} from start to end, over bench.soak.max_gpu_growth={cfg.max_gpu_growth:g}")
    if fd_growth is not None and fd_growth > cfg.max_fd_growth:
        failures.append(f"the server's open file descriptors grew by {fd_growth}, over bench.soak.max_fd_growth={cfg.max_fd_growth}")
    if health_status != 200 or health.get("status") != "ok":
        failures.append(f"/health answered {health_status} {health} at the end")
    if exit_code != 0:
        failures.append(f"the server exited with {exit_code} on SIGTERM")
    good = [o for o in soak if o.kind == "good" and o.ok]
    device = nvml.info(labels[0]).name if nvml is not None and labels else cpu_model()
    return {
        "kind": "soak", "version": 1,
        "config": asdict(cfg), "model": app.model.name, "backend": app.export.backend, "placement": app.server.runtime,
        "environment": {"device": device, "device_slug": slug(device), "git": git_state(), "cpu_count": os.cpu_count()},
        "soak_s": soak_s,
        "requests": {"soak": len(soak), "warmup": len(outcomes) - len(soak), "per_s": len(soak) / soak_s if soak_s else None},
        "statuses_by_kind": by_kind,
        "statuses": dict(sorted(Counter(str(o.status) for o in soak).items())),
        "server_counted_statuses": counted,
        "latency": {"good": percentiles([o.latency_s for o in good]), "good_ttft": percentiles([o.ttft_s for o in good]),
                    "errors": percentiles([o.latency_s for o in soak if o.kind in ("malformed", "over_limit")])},
        "tokens_per_s": sum(o.completion_tokens or 0 for o in good) / soak_s if soak_s else None,
        "samples": [asdict(s) for s in samples],
        "peaks": {"rss_bytes": peaks.host_rss, "gpu_used_bytes": peaks.device_used, "gpu_process_bytes": peaks.process_used},
        "growth": {"rss": rss_growth, "gpu_used": gpu_growth, "open_fds": fd_growth},
        "tolerances": {"max_rss_growth": cfg.max_rss_growth, "max_gpu_growth": cfg.max_gpu_growth, "max_fd_growth": cfg.max_fd_growth},
        "health_at_end": {"status": health_status, "body": health}, "exit_code": exit_code,
        "unexpected": [asdict(o) for o in unexpected[:50]],
        "failures": failures,
        "passed": not failures,
    }


def mib(x: int | None) -> str:
    return "n/a" if x is None else f"{x / 2**20:.1f} MiB"


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.1%}"


def ms(block: dict | None, key: str) -> str:
    return "n/a" if not block else f"{block[key] * 1e3:.0f} ms"


def render_markdown(r: dict) -> str:
    c = r["config"]
    lines = [f"# Soak: {r['model']} ({r['backend']}, {c['mode']}, {r['placement']}) on {r['environment']['device']}", "",
             f"{c['streams']} concurrent streaming clients for {r['soak_s']:.0f} s after {c['warmup_s']:g} s of warm-up; "
             f"mix {c['mix']}; good requests {c['max_tokens']} tokens each. "
             f"**{'PASSED' if r['passed'] else 'FAILED'}**" + ("" if r["passed"] else ": " + "; ".join(r["failures"])), "",
             "| kind | statuses (count) |", "| --- | --- |"]
    lines += [f"| {k} | {', '.join(f'{s}: {n}' for s, n in v.items()) or '-'} |" for k, v in r["statuses_by_kind"].items()]
    lat = r["latency"]
    lines += ["", f"{r['requests']['soak']} requests ({r['requests']['per_s']:.2f}/s), {r['tokens_per_s']:.1f} generated tokens/s; "
              f"the server counted {r['server_counted_statuses']}.", "",
              "| latency | p50 | p99 |", "| --- | ---: | ---: |",
              f"| good, to [DONE] | {ms(lat['good'], 'p50_s')} | {ms(lat['good'], 'p99_s')} |",
              f"| good, first token | {ms(lat['good_ttft'], 'p50_s')} | {ms(lat['good_ttft'], 'p99_s')} |",
              f"| malformed and over-limit, whole answer | {ms(lat['errors'], 'p50_s')} | {ms(lat['errors'], 'p99_s')} |", "",
              "| sample | at | RSS | open fds | GPU used (NVML) |", "| --- | ---: | ---: | ---: | --- |"]
    for s in r["samples"]:
        gpu = ", ".join(f"{g}: {mib(v)}" for g, v in s["gpu_used_bytes"].items()) or "n/a"
        lines.append(f"| {s['at']} | {s['t_s']:.0f} s | {mib(s['rss_bytes'])} | {s['open_fds']} | {gpu} |")
    g = r["growth"]
    t = r["tolerances"]
    lines += ["", f"Growth from start to end: RSS {pct(g['rss'])} (tolerance {t['max_rss_growth']:.0%}), "
              f"open fds {g['open_fds']:+d} (tolerance {t['max_fd_growth']}), "
              + (", ".join(f"{k} {pct(v)}" for k, v in g["gpu_used"].items()) + f" (tolerance {t['max_gpu_growth']:.0%})" if g["gpu_used"] else "no GPU")
              + f"; peak RSS {mib(r['peaks']['rss_bytes'])}.", ""]
    return "\n".join(lines)


def print_summary(r: dict, console: Console) -> None:
    table = Table(title=f"soak: {'passed' if r['passed'] else 'FAILED'}")
    for column in ("kind", "statuses"):
        table.add_column(column)
    for kind, statuses in r["statuses_by_kind"].items():
        table.add_row(kind, ", ".join(f"{s}: {n}" for s, n in statuses.items()))
    console.print(table)
    start, end = r["samples"][0], r["samples"][-1]
    console.print(f"RSS {mib(start['rss_bytes'])} -> {mib(end['rss_bytes'])} ({pct(r['growth']['rss'])}), open fds "
                  f"{start['open_fds']} -> {end['open_fds']}; good p50/p99 {ms(r['latency']['good'], 'p50_s')}/{ms(r['latency']['good'], 'p99_s')}")
    for failure in r["failures"]:
        console.print(f"[red]{failure}[/]")
