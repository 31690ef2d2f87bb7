"""`python -m pipeline bench`: the same workload through the real server in static and in dynamic
mode, on the same engines, measured from the client's side of the HTTP stream.

For each mode the bench starts `python -m runtime.serve` as a subprocess, sends one unmeasured
request per group (engine loading, first-call allocations), then drives the whole workload once
per concurrency level with streaming chat completions. Around each run it resets the server's
peak-memory counters, samples memory (NVML for the server's GPUs, the server's RSS on the host)
and reads each GPU's energy counter. After both servers have stopped it measures the two
yardsticks in pipeline/baseline.py and writes the report (pipeline/report.py).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from model.tokenizer import ChatTokenizer
from bench.baseline import BaselineSkipped, copy_bandwidth, transformers_baseline
from contract.config import BenchApp
from bench.gpu_monitor import EnergyReading, MemoryPeaks, Nvml, NvmlUnavailable, Sampler, energy_between
from bench import report as reporting
from contract.manifest import Manifest, ManifestError, engines_path
from bench.peer import PeerSkipped, check_settings, run_peer
from bench.workload import BenchRequest, WorkloadError, build_workload, fingerprint

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
MODES = ("static", "dynamic")
MODEL_ID = "autoglm-phone-9b"
LIBRARIES = ("torch", "onnxruntime", "onnxruntime-gpu", "onnxruntime-genai", "onnxruntime-genai-cuda", "onnx", "transformers", "numpy", "httpx", "hydra-core", "nvidia-ml-py", "fastapi", "uvicorn")


class BenchError(Exception):
    """A problem with the request, the environment or the server, reported as one line."""


# --- what one request and one run measured ------------------------------------------------


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
    completion_tokens: int | None = None
    finish_reason: str | None = None
    start_s: float = 0.0  # when it was sent, from the start of the run
    queued_s: float = 0.0  # waiting for a free concurrency slot in the bench, before it was sent
    ttft_s: float | None = None  # sent -> first chunk carrying generated text
    latency_s: float | None = None  # sent -> [DONE]
    tpot_s: float | None = None  # (latency - ttft) / (completion tokens - 1)
    tokens: list[str] = field(default_factory=list)  # each generated token's chunk text, in order (pipeline/quality.py)


@dataclass
class RunResult:
    concurrency: int
    request_rate: float | None
    duration_s: float
    requests: list[RequestResult]
    memory: MemoryPeaks
    energy: EnergyReading
    stats: dict  # GET /stats after the run


@dataclass
class ModeResult:
    mode: str
    command: list[str]
    startup_s: float
    gpu_labels: list[str]  # the server's CUDA devices ("cuda:N"); empty on the CPU
    baseline_device_used: dict[str, int | None]  # NVML, before the server started
    paths: dict[str, dict]  # path -> the server's dyngraph block (engines, devices) as first seen
    runs: list[RunResult]
    log_file: str


# --- the server -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m runtime.serve` in one mode, as a subprocess that the bench owns and stops."""

    def __init__(self, app: BenchApp, mode: str, server_overrides: list[str], log_path: Path):
        self.port = app.server.port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "runtime.serve", *server_overrides, f"runtime={app.server.runtime}",
                        f"runtime.mode={mode}", f"server.port={self.port}",
                        f"engines_dir={Path(app.engines_dir).expanduser().resolve()}", f"cluster={app.server.cluster}",
                        *([f"cluster.num_replicas={app.server.replicas}"] if app.server.cluster == "ray" else []), *app.server.args]
        self.replicas = app.server.replicas if app.server.cluster == "ray" else 0  # replicas that must answer before it is ready
        self.env = server_env(mode)
        self.log_path = log_path
        self.startup_timeout_s = app.server.startup_timeout_s
        self.process: subprocess.Popen | None = None
        self.startup_s = 0.0

    def __enter__(self) -> Server:
        t0 = time.perf_counter()
        self.log_file = self.log_path.open("wb")
        self.process = subprocess.Popen(self.command, cwd=ROOT, env=self.env, stdout=self.log_file, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
        try:
            self.wait_ready(t0 + self.startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - t0
        return self

    def wait_ready(self, deadline: float) -> None:
        replicas = set()  # cluster=ray: ready once every replica has answered (x-dyngraph-replica), not just the first
        with httpx.Client(timeout=5.0) as client:
            while True:
                if self.process.poll() is not None:
                    raise BenchError(f"the server exited with code {self.process.returncode} before it was ready: "
                                     f"{last_line(self.log_path)} (log: {self.log_path})")
                try:
                    health = client.get(self.url + "/health")
                    replicas.add(health.headers.get("x-dyngraph-replica"))
                    if health.status_code == 200 and len(replicas - {None}) >= self.replicas:
                        return
                except httpx.HTTPError:
                    pass
                if time.perf_counter() > deadline:
                    raise BenchError(f"the server was not ready after {self.startup_timeout_s:.0f} s "
                                     f"(server.startup_timeout_s; log: {self.log_path})")
                time.sleep(0.25)

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # lets in-flight requests finish
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not self.log_file.closed:
            self.log_file.close()

    def stats(self) -> dict:
        return self.call("GET", "/stats")

    def reset_stats(self) -> None:
        self.call("POST", "/stats/reset")

    def call(self, method: str, route: str) -> dict:
        try:
            response = httpx.request(method, self.url + route, timeout=30.0)
            response.raise_for_status()
            return response.json() if response.content else {}
        except (httpx.HTTPError, ValueError) as e:
            if self.process.poll() is not None:
                raise BenchError(f"the server exited with code {self.process.returncode}: {last_line(self.log_path)} "
                                 f"(log: {self.log_path})") from None
            raise BenchError(f"{method} {route} failed: {e} (log: {self.log_path})") from None


def server_env(mode: str) -> dict[str, str]:
    env = dict(os.environ)
    # the mode must not depend on what the caller's shell exports: set the switch either way
    env["ENABLE_DYNAMIC_GRAPH"] = "True" if mode == "dynamic" else "False"
    # NVML numbers GPUs in PCI order; with the same order in the server, cuda:N maps onto NVML
    env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1].strip() if lines else "the log is empty"


# --- the client side: streaming requests ----------------------------------------------------


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
    result.prompt_tokens, result.completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
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
                timeout_s: float, on_done) -> list[RequestResult]:
    """Send every request, at most `concurrency` at a time, each no earlier than its arrival time."""
    slots = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=30.0), limits=limits) as client:
        t_run = time.perf_counter()

        async def one(request: BenchRequest, body: dict, arrival: float) -> RequestResult:
            await asyncio.sleep(max(0.0, t_run + arrival - time.perf_counter()))
            waited = time.perf_counter()
            async with slots:
                result = await send(client, url, request, body, mode, t_run, time.perf_counter() - waited)
            on_done(result)
            return result

        return list(await asyncio.gather(*(one(r, b, a) for r, b, a in zip(requests, bodies, arrivals))))


# --- one mode -------------------------------------------------------------------------------


def run_mode(app: BenchApp, mode: str, requests: list[BenchRequest], server_overrides: list[str], nvml: Nvml | None,
             log_dir: Path, progress: Progress, console: Console) -> ModeResult:
    cfg = app.bench
    bodies = [r.body(MODEL_ID, cfg.temperature, cfg.seed) for r in requests]
    baseline_used = nvml.memory_used([g.label for g in nvml.gpus]) if nvml else {}
    log_path = log_dir / f"server-{mode}.log"
    server = Server(app, mode, server_overrides, log_path)
    task = progress.add_task(f"{mode}: starting server", total=None)
    with server:
        progress.update(task, description=f"{mode}: warm-up", total=len(cfg.groups), completed=0)
        warm = {r.group: r for r in requests}  # one request per group (the last of each)
        for r in warm.values():
            result = asyncio.run(drive(server.url, [r], [r.body(MODEL_ID, cfg.temperature, cfg.seed, max_tokens=2)], mode, 1, [0.0],
                                       cfg.request_timeout_s, lambda _, t=task: progress.advance(t)))[0]
            if not result.ok:
                raise BenchError(f"{mode} warm-up request ({r.group}) failed: {result.error} (log: {log_path})")
        progress.remove_task(task)
        stats = server.stats()
        if stats.get("mode") not in (None, mode):
            raise BenchError(f"the server reports mode {stats.get('mode')!r} but was started with runtime.mode={mode}")
        gpu_labels = sorted(d for d in (stats.get("devices") or {}) if d.startswith("cuda"))
        if gpu_labels and nvml is None:
            log.warning("the server runs on %s but NVML is unavailable: no GPU memory samples or energy", ", ".join(gpu_labels))
        unknown = [d for d in gpu_labels if nvml and d not in nvml.handles]
        if unknown:
            raise BenchError(f"the server uses {', '.join(unknown)} which NVML does not see with this CUDA_VISIBLE_DEVICES")
        meter = nvml if gpu_labels else None

        paths: dict[str, dict] = {}
        runs = []
        for concurrency in cfg.concurrency:
            task = progress.add_task(f"{mode} c={concurrency}", total=len(requests))
            server.reset_stats()
            sampler = Sampler(server.pid, cfg.sample_interval_s, meter, gpu_labels).start()
            e0 = meter.energy_mj(gpu_labels) if meter else {}
            t0 = time.perf_counter()
            results = asyncio.run(drive(server.url, requests, bodies, mode, concurrency,
                                        arrival_times(len(requests), cfg.request_rate, cfg.seed, concurrency),
                                        cfg.request_timeout_s, lambda _, t=task: progress.advance(t)))
            duration = time.perf_counter() - t0
            e1 = meter.energy_mj(gpu_labels) if meter else {}
            peaks = sampler.stop()
            energy = energy_between(e0, e1) if meter else EnergyReading({}, None, "the server runs on the CPU: no GPU energy counter")
            for r in results:
                if r.ok and r.path not in paths:
                    paths[r.path] = {"exit_layer": r.exit_layer, "engines": r.engines, "devices": r.devices}
            runs.append(RunResult(concurrency, cfg.request_rate, duration, results, peaks, energy, server.stats()))
            progress.update(task, description=f"{mode} c={concurrency} ({duration:.1f} s)")
    console.print(f"{mode}: server ready in {server.startup_s:.1f} s; {sum(len(r.requests) for r in runs)} requests measured")
    return ModeResult(mode, server.command, server.startup_s, gpu_labels, baseline_used, paths, runs, log_path.name)


# --- the whole bench ------------------------------------------------------------------------


def check_request(app: BenchApp) -> tuple[Path, Manifest, list[BenchRequest]]:
    cfg = app.bench
    bad = [m for m in cfg.modes if m not in MODES]
    if bad or not cfg.modes:
        raise BenchError(f"bench.modes={list(cfg.modes)} must list some of {MODES}")
    if not cfg.concurrency or min(cfg.concurrency) < 1:
        raise BenchError(f"bench.concurrency={list(cfg.concurrency)} must list positive numbers of requests in flight")
    if cfg.request_rate is not None and cfg.request_rate <= 0:
        raise BenchError(f"bench.request_rate={cfg.request_rate} must be positive, or null for a closed loop")
    if cfg.peer.enabled:
        try:
            check_settings(app.model.text, cfg.peer)
        except ValueError as e:
            raise BenchError(str(e)) from None
    engines = engines_path(app.engines_dir, app.model.name, app.export.backend)
    try:
        manifest = Manifest.load(engines)
    except ManifestError as e:
        raise BenchError(f"{e}; export first: python -m pipeline export model={app.model.name} export={app.export.backend} "
                         f"engines_dir={app.engines_dir}") from None
    if "static" in cfg.modes and manifest.static_path is None:
        raise BenchError(f"the engines in {engines} have no static path (exported with export.static=false): export it, or bench.modes=[dynamic]")
    if find_spec("runtime.serve") is None:
        raise BenchError("python -m runtime.serve is not available in this checkout")
    try:
        requests = build_workload(cfg)
    except WorkloadError as e:
        raise BenchError(str(e)) from None
    if not requests:
        raise BenchError(f"bench={cfg.name} has no requests (every group has count 0)")
    return engines, manifest, requests


def run_bench(app: BenchApp, server_overrides: list[str], console: Console | None = None) -> Path:
    """Run the benchmark; return the report folder. `server_overrides` select the same model and
    export for runtime.serve as the bench composed (model=..., export=..., and their overrides)."""
    if app.bench.soak is not None:  # bench=soak: one server under load for a fixed time (pipeline/soak.py)
        from bench.soak import run_soak

        return run_soak(app, server_overrides, console)
    console = console or Console(stderr=True)
    engines, manifest, requests = check_request(app)
    # the bench's own torch (bandwidth, transformers) must number GPUs as the server and NVML do
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    nvml = open_nvml(app)
    log_dir = Path(tempfile.mkdtemp(prefix="dyngraph-bench-"))  # server logs; they move into the report folder
    console.print(f"[bold]bench[/] {app.bench.name}: {len(requests)} requests x concurrency {list(app.bench.concurrency)} x "
                  f"{'/'.join(app.bench.modes)}, placement {app.server.runtime}; engines {engines}")
    modes: dict[str, ModeResult] = {}
    progress = Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, disable=not app.progress)
    try:
        with progress:
            for mode in app.bench.modes:
                modes[mode] = run_mode(app, mode, requests, server_overrides, nvml, log_dir, progress, console)
        environment = gather_environment(app, nvml, modes)
    finally:
        if nvml is not None:
            nvml.close()
    yardsticks = measure_yardsticks(app, manifest, requests, modes, log_dir, console)
    name = app.run_name or f"{datetime.now(timezone.utc):%Y-%m-%d}-{environment['device']['slug']}-{app.model.name}-{app.export.backend}"
    report_dir = unique_dir(Path(app.output_dir).expanduser() / name, keep_name=bool(app.run_name))
    for f in log_dir.iterdir():
        shutil.move(f, report_dir / f.name)
    log_dir.rmdir()
    report = reporting.build_report(app, manifest, requests, fingerprint(requests), modes, environment, yardsticks, report_dir.name)
    reporting.write_report(report, report_dir)
    reporting.print_headline(report, console)
    console.print(f"report: {report_dir / 'report.md'}")
    failed = [r for m in modes.values() for run in m.runs for r in run.requests if not r.ok]
    if failed:
        raise BenchError(f"{len(failed)} requests failed (first: {failed[0].error}); the report in {report_dir} records them")
    return report_dir


def open_nvml(app: BenchApp) -> Nvml | None:
    """NVML, only for a GPU placement: a CPU run never touches the driver."""
    if app.server.runtime == "cpu":
        return None
    try:
        return Nvml.open(server_env("dynamic"))
    except NvmlUnavailable as e:
        log.warning("no GPU measurements: %s", e)
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def slug(text: str) -> str:
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    text = re.sub(r"\b(cpu|processor)\b|@.*$", "", text)  # "Intel(R) Xeon(R) CPU @ 2.20GHz" -> "intel-xeon"
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "device"


def unique_dir(path: Path, keep_name: bool) -> Path:
    """A fresh report folder: a second run on the same day gets -2, -3, ... unless named explicitly."""
    candidate, n = path, 2
    while not keep_name and candidate.exists():
        candidate, n = path.with_name(f"{path.name}-{n}"), n + 1
    try:
        candidate.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BenchError(f"cannot create the report folder {candidate}: {e.strerror}") from None
    return candidate


def gather_environment(app: BenchApp, nvml: Nvml | None, modes: dict[str, ModeResult]) -> dict:
    versions = {}
    for lib in LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            pass
    labels = sorted({label for m in modes.values() for label in m.gpu_labels})
    gpus = [asdict(nvml.info(label)) for label in labels] if nvml else []
    if labels:
        # without NVML, torch names the GPU (the servers have stopped: a context here costs nothing)
        name = gpus[0]["name"] if gpus else cuda_name(labels[0])
        device = {"kind": "cuda", "name": name, "slug": (f"{len(labels)}x-" if len(labels) > 1 else "") + slug(name),
                  "driver": nvml.driver_version() if nvml else None}
    else:
        name = cpu_model()
        device = {"kind": "cpu", "name": name, "slug": "cpu-" + slug(name), "driver": None}
    return {
        "device": {**device, "placement": app.server.runtime, "gpus": gpus},
        # other work on the host slows a CPU run (and a GPU run's host side): the 1-minute load average at the end
        "cpu": {"model": cpu_model(), "cores": os.cpu_count(), "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": versions,
        "git": git_state(),
    }


def cuda_name(label: str) -> str:
    import torch

    try:
        return torch.cuda.get_device_name(torch.device(label))
    except (RuntimeError, AssertionError):
        return "unknown GPU"


def git_state() -> dict:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def measure_yardsticks(app: BenchApp, manifest: Manifest, requests: list[BenchRequest], modes: dict[str, ModeResult],
                       log_dir: Path, console: Console) -> dict:
    """Transformers' eager generate, the copy bandwidth and the peer (ORT GenAI), on the devices the
    servers used; the peer's builder and timing logs go to `log_dir`, beside the servers'.

    A failure here is recorded in the report rather than raised: it must not cost the servers'
    measurements, which took far longer to make."""
    labels = sorted({label for m in modes.values() for label in m.gpu_labels})
    out: dict = {"transformers": None, "bandwidth": {}, "bandwidth_skipped": "bench.roofline.enabled=false",
                 "peer": {"skipped": "bench.peer.enabled=false"}}
    cfg = app.bench
    if cfg.roofline.enabled:
        for device in labels or ["cpu"]:
            console.print(f"measuring the copy bandwidth of {device}")
            try:
                out["bandwidth"][device] = asdict(copy_bandwidth(device, cfg.roofline))
            except (RuntimeError, MemoryError) as e:  # torch reports CUDA out-of-memory as a RuntimeError
                log.warning("bandwidth of %s not measured: %s", device, e)
                out["bandwidth"] = {}  # a roofline on some devices only would be wrong for paths across them
                out["bandwidth_skipped"] = f"the copy bandwidth of {device} could not be measured: {e}"
                break
    device = labels[0] if labels else "cpu"
    if cfg.transformers.enabled:
        console.print(f"running transformers' generate on {device}")
        out["transformers"] = yardstick("transformers comparison", BaselineSkipped, lambda: transformers_baseline(
            requests, manifest, app.model, app.export, cfg.transformers, device, ChatTokenizer.builtin()))
    if cfg.peer.enabled:
        console.print(f"building and timing the peer (ORT GenAI) on {device}")
        out["peer"] = yardstick("peer", PeerSkipped, lambda: run_peer(
            app, manifest, requests, device, ChatTokenizer.builtin(), log_dir, console))
    return out


def yardstick(what: str, skipped: type[Exception], measure: Callable[[], dict]) -> dict:
    """One yardstick's record: its measurement, or why it was skipped or failed."""
    try:
        return measure()
    except skipped as e:
        log.warning("%s skipped: %s", what, e)
        return {"skipped": str(e)}
    except Exception as e:  # noqa: BLE001 - recorded in the report with its type
        log.warning("%s failed: %s: %s", what, type(e).__name__, e)
        return {"skipped": f"it failed: {type(e).__name__}: {e}"}
