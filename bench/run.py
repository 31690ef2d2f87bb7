"""`python -m pipeline bench`: the same workload through the real server in static and in dynamic
mode, on the same engines, measured from the client's side of the HTTP stream.

For each mode the bench starts `python -m runtime.serve` as a subprocess, sends one unmeasured
request per group (engine loading, first-call allocations), then drives the whole workload once
per concurrency level with streaming chat completions. Around each run it resets the server's
peak-memory counters, samples memory (NVML for the server's GPUs, the server's RSS on the host)
and reads each GPU's energy counter. With bench.threshold_curve it then runs the curve's servers
(bench/curve.py). After the servers have stopped it measures the two yardsticks in
bench/baseline.py and writes the report (bench/report.py). The server control is bench/server.py,
the HTTP client bench/client.py.
"""
from __future__ import annotations

import asyncio
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from model.tokenizer import ChatTokenizer
from bench.baseline import BaselineSkipped, copy_bandwidth, transformers_baseline
from contract.config import BenchApp, ExportConfig
from bench.gpu_monitor import EnergyReading, MemoryPeaks, Nvml, Sampler, energy_between
from bench import report as reporting
from bench.metrics import machine_class
from contract.manifest import Manifest, ManifestError, engines_path
from bench.peer import PeerSkipped, check_settings, prompt_lengths, run_peer
from bench.client import RequestResult, arrival_times, drive
from bench.compare import load_report
from bench.curve import check_curve, run_curve
from bench.server import BenchError, Server, check_launch
from bench.workload import BenchRequest, WorkloadError, active_groups, build_workload, fingerprint
from bench.host import cpu_model, git_state, open_nvml, report_folder, slug, unique_dir
from pipeline.console import make_console

log = logging.getLogger(__name__)

MODES = ("static", "dynamic")
LIBRARIES = ("torch", "onnxruntime", "onnxruntime-gpu", "onnxruntime-genai", "onnxruntime-genai-cuda", "onnx", "transformers", "numpy", "httpx", "hydra-core", "nvidia-ml-py", "fastapi", "uvicorn")


# --- what one request and one run measured ------------------------------------------------


@dataclass
class RunResult:
    concurrency: int
    request_rate: float | None
    duration_s: float
    requests: list[RequestResult]
    memory: MemoryPeaks
    energy: EnergyReading
    stats: dict  # GET /stats after the run
    stats_before: dict = field(default_factory=dict)  # and before it (after the peaks' reset): cumulative counters' start
    phase: str = ""  # the workload part it sent (run_mode's phases); "": the whole workload


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


# --- one mode -------------------------------------------------------------------------------


def run_mode(app: BenchApp, mode: str, requests: list[BenchRequest], server_overrides: list[str], nvml: Nvml | None,
             log_dir: Path, progress: Progress, console: Console, levels: list[int] | None = None, extra: tuple[str, ...] = (),
             label: str | None = None, phases: dict[str, list[BenchRequest]] | None = None, limit_s: float | None = None) -> ModeResult:
    """One server in `mode` through the workload at each concurrency level (`levels`, default
    bench.concurrency); `extra` and `label`: a threshold curve's point (its settings, its name).
    `phases` (the budget sweep's): parts of the workload sent one after the other to the same server,
    each warmed up and then run at each level, so that the first sees a server that has loaded only
    what its own requests need; default: `requests` as one. `limit_s`: each run's time limit (drive)."""
    cfg = app.bench
    label = label or mode
    baseline_used = nvml.memory_used([g.label for g in nvml.gpus]) if nvml else {}
    log_path = log_dir / f"server-{label}.log"
    server = Server(app, mode, server_overrides, log_path, extra)
    task: TaskID | None = progress.add_task(f"{label}: starting server", total=None)
    paths: dict[str, dict] = {}
    runs = []
    gpu_labels: list[str] | None = None  # known after the first warm-up
    meter = None
    with server:
        for phase, chosen in (phases or {"": requests}).items():
            name = f"{label} {phase}".strip()
            bodies = [r.body(server.model_id, cfg.temperature, cfg.seed) for r in chosen]
            warm = {r.group: r for r in chosen}  # one request per group (the last of each)
            if task is None:
                task = progress.add_task("", total=None)
            progress.update(task, description=f"{name}: warm-up", total=len(warm), completed=0)
            for r in warm.values():
                result = asyncio.run(drive(server.url, [r], [r.body(server.model_id, cfg.temperature, cfg.seed, max_tokens=2)], mode, 1, [0.0],
                                           cfg.request_timeout_s, lambda _, t=task: progress.advance(t)))[0]
                if not result.ok:
                    raise BenchError(f"{name} warm-up request ({r.group}) failed: {result.error} (log: {log_path})")
            progress.remove_task(task)
            task = None
            if gpu_labels is None:
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

            for concurrency in levels or cfg.concurrency:
                task = progress.add_task(f"{name} c={concurrency}", total=len(chosen))
                before = server.reset_stats()
                sampler = Sampler(server.pid, cfg.sample_interval_s, meter, gpu_labels).start()
                e0 = meter.energy_mj(gpu_labels) if meter else {}
                t0 = time.perf_counter()
                results = asyncio.run(drive(server.url, chosen, bodies, mode, concurrency,
                                            arrival_times(len(chosen), cfg.request_rate, cfg.seed, concurrency),
                                            cfg.request_timeout_s, lambda _, t=task: progress.advance(t), limit_s))
                duration = time.perf_counter() - t0
                e1 = meter.energy_mj(gpu_labels) if meter else {}
                peaks = sampler.stop()
                energy = energy_between(e0, e1) if meter else EnergyReading({}, None, "the server runs on the CPU: no GPU energy counter")
                for r in results:
                    if r.ok and r.path not in paths:
                        paths[r.path] = {"exit_layer": r.exit_layer, "engines": r.engines, "devices": r.devices}
                runs.append(RunResult(concurrency, cfg.request_rate, duration, results, peaks, energy, server.stats(), before, phase))
                progress.update(task, description=f"{name} c={concurrency} ({duration:.1f} s)")
            task = None
    console.print(f"{label}: server ready in {server.startup_s:.1f} s; {sum(len(r.requests) for r in runs)} requests measured")
    return ModeResult(mode, server.command, server.startup_s, gpu_labels or [], baseline_used, paths, runs, log_path.name)


# --- the whole bench ------------------------------------------------------------------------


def check_request(app: BenchApp) -> tuple[Path, Manifest, list[BenchRequest]]:
    cfg = app.bench
    bad = [m for m in cfg.modes if m not in MODES]
    if bad or not cfg.modes:
        raise BenchError(f"bench.modes={list(cfg.modes)} must list some of {MODES}")
    if cfg.request_rate is not None and cfg.request_rate <= 0:
        raise BenchError(f"bench.request_rate={cfg.request_rate} must be positive, or null for a closed loop")
    engines, manifest = check_engines(app)
    if "static" in cfg.modes and manifest.static_path is None:
        raise BenchError(f"the engines in {engines} have no static path (an export older than the static path): "
                         "export them again, or bench.modes=[dynamic]")
    check_curve(app)
    try:
        requests = build_workload(cfg, corpus_tokenizer(app), manifest.dims["capacity"]["max"])
    except WorkloadError as e:
        raise BenchError(str(e)) from None
    if not requests:
        raise BenchError(f"bench={cfg.name} has no requests (every group has count 0)")
    return engines, manifest, requests


def check_engines(app: BenchApp) -> tuple[Path, Manifest]:
    """What every bench that sends requests checks before anything runs: the concurrency levels, the
    peer's settings and the export's engines (their folder and manifest)."""
    cfg = app.bench
    if not cfg.concurrency or min(cfg.concurrency) < 1:
        raise BenchError(f"bench.concurrency={list(cfg.concurrency)} must list positive numbers of requests in flight")
    if cfg.peer.enabled:
        try:
            check_settings(app.model.text, cfg.peer)
        except ValueError as e:
            raise BenchError(str(e)) from None
    engines = engines_path(app.engines_dir, app.model.name, app.export.backend, app.export.quantize)
    try:
        manifest = Manifest.load(engines)
    except ManifestError as e:
        # what the composed export differs in from the defaults (a preset sets dtype and device)
        default = ExportConfig()
        settings = "".join(f" export.{k}={getattr(app.export, k)}" for k in ("dtype", "device", "quantize")
                           if getattr(app.export, k) != getattr(default, k))
        raise BenchError(f"{e}; export first: python -m pipeline export model={app.model.name} export={app.export.backend}{settings} "
                         f"engines_dir={app.engines_dir}") from None
    if find_spec("runtime.serve") is None:
        raise BenchError("python -m runtime.serve is not available in this checkout")
    return engines, manifest


def served_tokenizer(app: BenchApp) -> ChatTokenizer:
    """The tokenizer runtime.serve loads for this model: the checkpoint's tokenizer.json, else the built-in byte-level one."""
    folder = Path(app.model.checkpoint).expanduser() if app.model.checkpoint else None
    try:
        return ChatTokenizer.from_dir(folder) if folder and (folder / "tokenizer.json").is_file() else ChatTokenizer.builtin()
    except ValueError as e:
        raise BenchError(str(e)) from None


def corpus_tokenizer(app: BenchApp) -> ChatTokenizer | None:
    """What the corpus groups' prompts are measured with; None where the workload has none. A corpus
    group is for a model trained on that corpus, so a model without a tokenizer of its own is refused."""
    if all(g.source == "prompts" for g in active_groups(app.bench).values()):
        return None
    folder = Path(app.model.checkpoint).expanduser() if app.model.checkpoint else None
    if folder is None or not (folder / "tokenizer.json").is_file():
        raise BenchError(f"bench.corpus={app.bench.corpus}: its groups are for a model trained on that corpus, served with its "
                         f"tokenizer, but model={app.model.name} has {'no model.checkpoint' if folder is None else f'no tokenizer.json in {folder}'}; "
                         "bench.corpus=null leaves them out")
    return served_tokenizer(app)


def run_bench(app: BenchApp, server_overrides: list[str], console: Console | None = None) -> Path:
    """Run the benchmark; return the report folder. `server_overrides` select the same model and
    export for runtime.serve as the bench composed (model=..., export=..., and their overrides)."""
    check_launch(app)
    console = console or make_console()
    if app.bench.quantizations:
        return run_quantizations(app, server_overrides, console)
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
            curve = run_curve(app, manifest, requests, lambda mode, chosen, levels, extra, label: run_mode(
                app, mode, chosen, server_overrides, nvml, log_dir, progress, console, levels, extra, label)) \
                if app.bench.threshold_curve.thresholds else None
        environment = gather_environment(app, nvml, modes)
    finally:
        if nvml is not None:
            nvml.close()
    yardsticks = measure_yardsticks(app, manifest, requests, modes, log_dir, console)
    report_dir = report_folder(app, f"{datetime.now(timezone.utc):%Y-%m-%d}-{environment['device']['slug']}-{app.model.name}-{engines.name}",
                               log_dir)
    report = reporting.build_report(app, manifest, requests, fingerprint(requests), modes, environment, yardsticks, report_dir.name, curve)
    reporting.write_report(report, report_dir)
    reporting.print_headline(report, console)
    console.print(f"report: {report_dir / 'report.md'}")
    failed = [r for m in [*modes.values(), *(m for _, m in (curve or {}).get("results", {}).values())] for run in m.runs for r in run.requests if not r.ok]
    if failed:
        raise BenchError(f"{len(failed)} requests failed (first: {failed[0].error}); the report in {report_dir} records them")
    return report_dir


def run_quantizations(app: BenchApp, server_overrides: list[str], console: Console) -> Path:
    """bench.quantizations: the comparison once per weight quantization, each on its own export
    (a missing one is refused before anything runs), into one folder with a report per quantization
    and `quantizations.md`/`.json` side by side; returns that folder."""
    variants = {quantization_label(q): replace(app, export=replace(app.export, quantize=q), bench=replace(app.bench, quantizations=[]))
                for q in app.bench.quantizations}
    for variant in variants.values():
        check_request(variant)
    name = app.run_name or f"{datetime.now(timezone.utc):%Y-%m-%d}-{app.model.name}-{app.export.backend}-quantizations"
    folder = unique_dir(Path(app.output_dir).expanduser() / name, keep_name=bool(app.run_name))
    reports = {}
    for label, variant in variants.items():
        console.print(f"[bold]quantization {label}[/]")
        overrides = [o for o in server_overrides if not o.startswith("export.quantize=")]
        overrides.append(f"export.quantize={variant.export.quantize or 'null'}")
        run = run_bench(replace(variant, output_dir=str(folder), run_name=label), overrides, console)
        reports[label] = load_report(run / "report.json")
    reporting.write_quantizations(reports, folder)
    console.print(f"quantizations side by side: {folder / 'quantizations.md'}")
    return folder


def quantization_label(quantize: str | None) -> str:
    return quantize or "unquantized"


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
    cores = os.cpu_count()
    return {
        "device": {**device, "placement": app.server.runtime, "gpus": gpus},
        "machine_class": machine_class(device["kind"], name, app.server.runtime, len(labels), cores),
        # other work on the host slows a CPU run (and a GPU run's host side): the 1-minute load average at the end
        "cpu": {"model": cpu_model(), "cores": cores, "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
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
            requests, manifest, app.model, app.export, cfg.transformers, device, served_tokenizer(app)))
    if cfg.peer.enabled:
        console.print(f"building and timing the peer (ORT GenAI) on {device}")
        out["peer"] = yardstick("peer", PeerSkipped, lambda: run_peer(
            app, manifest, prompt_lengths(requests, served_tokenizer(app)), device, log_dir, console))
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
