"""The runtime under the chat service: one export opened and checked against the composed config,
its engines verified and loaded on their placement, the scheduler, the engine client and the chat
service over them (`build_service`). `python -m runtime.serve` (cli/serve.py) serves what this
builds in its own process; cli/cluster.py builds it once per Ray replica.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path

from contract.manifest import Manifest, ManifestError, engines_path
from exporters import get_runtime
from model.tokenizer import ChatTokenizer
from runtime.client import LocalEngine
from runtime.engines import EngineSet
from runtime.generation import GenerationEngine
from runtime.metrics import Metrics
from runtime.placement import Placement
from runtime.step import captured_engines
from serving.chat import ChatService
from serving.config import ServeApp

log = logging.getLogger("dyngraph")
RUNTIME_BACKENDS = ("engines", "eager")  # runtime.backend: the backend that built the export, or the eager one


class ServeError(RuntimeError):
    """Serving cannot start; the message says what to do."""


def check_model_config(cfg: ServeApp, manifest: Manifest, directory: Path) -> None:
    """The composed model must be the exported one: the tokenizer, the media preprocessing and the
    paths are all read from it."""
    exported, asked = flatten(manifest.model["config"]), flatten(asdict(cfg.model))
    differ = [k for k in asked if exported.get(k) != asked[k]]
    if differ:
        k = differ[0]
        raise ServeError(f"the engines in {directory} were exported with model.{k}={exported.get(k)}, this config has "
                         f"model.{k}={asked[k]} ({len(differ)} setting(s) differ): serve with the export's settings or export again")
    if manifest.dtype != cfg.export.dtype:
        raise ServeError(f"the engines in {directory} are {manifest.dtype}, this config asks for export.dtype={cfg.export.dtype}")


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def load_tokenizer(cfg: ServeApp) -> ChatTokenizer:
    source = cfg.tokenizer or cfg.model.checkpoint
    return ChatTokenizer.from_dir(source) if source else ChatTokenizer.builtin()


def serving_backend(cfg: ServeApp, manifest: Manifest) -> str:
    """The registered backend that runs the export: the one that built it (runtime.backend=engines), or eager."""
    if cfg.runtime.backend not in RUNTIME_BACKENDS:
        raise ServeError(f"runtime.backend={cfg.runtime.backend!r} is not one of {', '.join(RUNTIME_BACKENDS)}")
    return manifest.backend["name"] if cfg.runtime.backend == "engines" else cfg.runtime.backend


def open_export(cfg: ServeApp, export_command: str) -> tuple[Path, Manifest]:
    """The export's directory and manifest, checked against the composed model; raises ServeError."""
    directory = engines_path(cfg.engines_dir, cfg.model.name, cfg.export.backend, cfg.export.quantize)
    try:
        manifest = Manifest.load(directory)
    except ManifestError as e:
        if not (directory / "manifest.json").exists():
            raise ServeError(f"no engines at {directory}: export them first with `{export_command}`") from None
        raise ServeError(str(e)) from None
    check_model_config(cfg, manifest, directory)
    return directory, manifest


def build_service(cfg: ServeApp, export_command: str) -> ChatService:
    """Everything behind the endpoint, loaded and verified; raises ServeError with a one-line reason."""
    cfg.server.check()
    directory, manifest = open_export(cfg, export_command)
    placement = Placement(cfg.runtime.placement, manifest)
    metrics = Metrics(cfg.runtime.max_batch_size)
    offload = cfg.runtime.offload
    on_demand = offload.enabled and cfg.runtime.mode == "dynamic"  # static mode keeps everything resident: the baseline
    offload.check()
    cfg.runtime.prefix_cache.check()
    budget = {d: int(offload.gpu_memory_budget_gb * 2**30) for d in placement.devices} if on_demand and offload.gpu_memory_budget_gb > 0 else None
    backend = serving_backend(cfg, manifest)
    if cfg.runtime.cuda_graphs and not get_runtime(backend).cuda_graphs:
        # the backend's sessions cannot replay graphs: decode steps run uncaptured, unpadded
        log.info("runtime.cuda_graphs: %s sessions capture no CUDA graphs; decode steps run uncaptured", backend)
        cfg = replace(cfg, runtime=replace(cfg.runtime, cuda_graphs=False))

    def loaded(name: str, device: str, n: int, seconds: float) -> None:
        metrics.engine_loads.labels(name, device).inc()
        metrics.engine_load_seconds.labels(name).observe(seconds)

    engines = EngineSet(directory, placement, verify=cfg.runtime.verify, budget_bytes=budget,
                        cuda_graphs=captured_engines(manifest) if cfg.runtime.cuda_graphs else (),
                        on_load=loaded, on_unload=lambda name, device, reason: metrics.engine_unloads.labels(name, reason).inc(),
                        announce=on_demand, host_copy=lambda device: on_demand and offload.host_copy, backend=backend)
    tokenizer = load_tokenizer(cfg)
    engine = GenerationEngine(engines, placement, tokenizer, cfg.runtime, metrics, draft_engine_set(cfg, placement, backend, engines.cuda_graphs))
    engine.warm_up()
    if on_demand:
        engines.prefetch()  # the first read and hash of the engines not loaded yet, while the server starts and serves
    return ChatService(cfg.server, LocalEngine(engines, engine), tokenizer, metrics)


def draft_engine_set(cfg: ServeApp, placement: Placement, backend: str, cuda_graphs: set[str]) -> EngineSet | None:
    """The quantized export self-speculation drafts with (runtime.speculation.draft_quantize), if any."""
    quantize = cfg.runtime.speculation.draft_quantize
    if quantize is None:
        return None
    directory = engines_path(cfg.engines_dir, cfg.model.name, cfg.export.backend, quantize)
    if not (directory / "manifest.json").exists():
        raise ServeError(f"runtime.speculation.draft_quantize={quantize}: no engines at {directory}: export them first with "
                         f"`python -m pipeline export export.quantize={quantize}` and the served export's other settings")
    return EngineSet(directory, placement, verify=cfg.runtime.verify, backend=backend, cuda_graphs=cuda_graphs)
