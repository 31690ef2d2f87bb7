"""python -m runtime.serve [overrides]: serve an export through the OpenAI chat completions API.

    python -m runtime.serve model=tiny runtime=cpu server.port=8000

An entry point: it composes conf/serve.yaml, applies the environment (ENABLE_DYNAMIC_GRAPH=False
forces static mode, DYNGRAPH_API_KEY sets the key) and assembles the layers: the runtime
(engines, placement, scheduler) behind an engine client, the chat service over it, the app over
that (build_service; runtime/cluster.py builds each Ray replica with it too). A problem it can name (no export, engines that fail verification, a
placement the machine cannot hold, a port out of range or in use, checked before the engines load)
ends it with one line and exit status 2.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, replace
import shlex
import sys
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from contract.manifest import Manifest, ManifestError, engines_path
from exporters import BackendUnavailable, get_runtime
from model.tokenizer import ChatTokenizer
from pipeline.commands import Command, hydra_command, shared, unknown_setting
from runtime.client import LocalEngine
from runtime.config import ServeApp, ServerConfig
from runtime.engines import EngineMismatch, EngineSet
from runtime.generation import EngineConfigError, GenerationEngine
from runtime.metrics import Metrics
from runtime.placement import Placement, PlacementError
from runtime.policy import PolicyError
from runtime.step import captured_engines
from serving.app import bind_socket, run_server
from serving.chat import ChatService

log = logging.getLogger("dyngraph")
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")  # absolute: a relative config_path breaks under `python -m`
RUNTIME_BACKENDS = ("engines", "eager")  # runtime.backend: the backend that built the export, or the eager one
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


# --- assembly: the runtime under the chat service ---------------------------------------------------------------------------------------------


class ServeError(RuntimeError):
    """Serving cannot start; the message says what to do."""


def check_server_config(server: ServerConfig) -> None:
    """A port that cannot be bound, and limits and timeouts that would refuse everything, or nothing,
    are a configuration mistake."""
    if not 1 <= server.port <= 65535:
        raise ServeError(f"server.port={server.port} must lie in 1..65535")
    for name in ("max_body_bytes", "max_messages", "max_content_parts", "max_characters", "max_stop_chars", "max_image_pixels"):
        if getattr(server, name) < 1:
            raise ServeError(f"server.{name}={getattr(server, name)} must be at least 1")
    for name in ("max_stop", "max_images"):
        if getattr(server, name) < 0:
            raise ServeError(f"server.{name}={getattr(server, name)} must not be negative")
    for name in ("header_timeout_s", "body_timeout_s"):
        if not getattr(server, name) > 0:
            raise ServeError(f"server.{name}={getattr(server, name)} must be positive")
    rate = server.rate_limit
    if rate.per_second is not None and not (rate.per_second > 0 and rate.burst >= 1 and rate.max_clients >= 1):
        raise ServeError(f"server.rate_limit: per_second={rate.per_second} must be positive (or null: off), "
                         f"burst={rate.burst} and max_clients={rate.max_clients} at least 1")


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
    check_server_config(cfg.server)
    directory, manifest = open_export(cfg, export_command)
    placement = Placement(cfg.runtime.placement, manifest)
    metrics = Metrics(cfg.runtime.max_batch_size)
    offload = cfg.runtime.offload
    on_demand = offload.enabled and cfg.runtime.mode == "dynamic"  # static mode keeps everything resident: the baseline
    if offload.gpu_memory_budget_gb < 0 or offload.idle_unload_s < 0:
        raise ServeError(f"runtime.offload.gpu_memory_budget_gb={offload.gpu_memory_budget_gb} and "
                         f"idle_unload_s={offload.idle_unload_s} must not be negative (0: no limit, never)")
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


def dynamic_graph_env() -> bool | None:
    """ENABLE_DYNAMIC_GRAPH as a boolean, None when unset."""
    value = os.environ.get("ENABLE_DYNAMIC_GRAPH")
    if value is None:
        return None
    if value.strip().lower() not in TRUE + FALSE:
        raise ValueError(f"ENABLE_DYNAMIC_GRAPH={value!r}: use True or False")
    return value.strip().lower() in TRUE


def export_command(app: ServeApp, overrides: list[str] | None = None) -> str:
    """The export that would write the engines this serve looks for: same model, backend and engines_dir
    (and the preset or paths group that set them)."""
    wanted = ("model", "export", "engines_dir", "preset", "paths")
    given = HydraConfig.get().overrides.task if overrides is None else overrides
    overrides = [o for o in given if o.lstrip("+~").split("=")[0].split(".")[0] in wanted]
    if not any(o.startswith("model=") for o in overrides):
        overrides.insert(0, f"model={app.model.name}")
    return " ".join(["python -m pipeline export", *map(shlex.quote, overrides)])


def apply_environment(app: ServeApp) -> None:
    if dynamic_graph_env() is False:
        app.runtime.mode = "static"
    app.server.api_key = app.server.api_key or os.environ.get("DYNGRAPH_API_KEY") or None


SERVE = Command(
    "python -m runtime.serve", "serve",
    "Serve <engines_dir>/<model>/<backend>[-<quantize>]/ through the OpenAI chat completions API.",
    {**shared("model", "export", "paths", "placement"),
     "runtime": "placement, mode (dynamic|static), depth policy, batching, CUDA graphs, modules on demand",
     "cluster": "local: this process serves; ray: replicas of the engine chain behind Ray Serve",
     **shared("+preset", "engines_dir", "tokenizer"),
     "server.host": "0.0.0.0 to serve other machines (set server.api_key then)",
     "server.port": "1..65535",
     "server.api_key": "Bearer key for /v1 and /stats (or DYNGRAPH_API_KEY in the environment)",
     "server.*": "model_id, api_keys, rate_limit, request limits (max_*), timeouts, drain_timeout_s"},
    presets=("phone-9b-gpu", "reference-gpu"))


@hydra_command(SERVE)
def main(app: ServeApp) -> None:
    # torch only glues engine calls together here (cache copies, sampling); its intra-op threads
    # would contend with ONNX Runtime's for the same cores and make a 50 us copy take milliseconds
    torch.set_num_threads(1)
    try:
        apply_environment(app)
        check_server_config(app.server)
        command = export_command(app)
        if app.cluster.name == "ray":
            return serve_on_ray(app, command)
        if app.cluster.name != "local":
            raise ValueError(f"cluster.name={app.cluster.name!r}: use cluster=local or cluster=ray")
        open_export(app, command)  # a missing export is named before the port is taken
        try:  # the port before the engines load: nothing says "serving" on a port that is not ours
            sock = bind_socket(app.server)
        except OSError as e:
            raise ServeError(f"cannot listen on {app.server.host}:{app.server.port}: {e.strerror or e}") from None
        service = build_service(app, command)
    except (ServeError, EngineMismatch, PlacementError, PolicyError, EngineConfigError, BackendUnavailable, ValueError, MemoryError) as e:
        log.error("cannot serve: %s", e)
        sys.exit(2)
    backend = f"{service.engine.backend} engines"
    log.info("serving %s (%s, %s mode, placement %s) as %r on http://%s:%d", app.model.name, backend, service.engine.mode,
             app.runtime.placement.name, app.server.model_id, app.server.host, app.server.port)
    run_server(service, sock)


def serve_on_ray(app: ServeApp, command: str) -> None:
    """cluster=ray: the same app behind Ray Serve; the export is checked here first when the
    replicas run on this machine, so that a missing one gets the same one-line answer."""
    try:
        from runtime.cluster import serve_on_ray as deploy
    except ImportError as e:
        raise ServeError(f"cluster=ray needs Ray Serve ({e}): pip install 'ray[serve]'") from None
    if app.cluster.address is None:
        open_export(app, command)
    deploy(app, command)


def ray_app(args: dict):
    """Serve's application builder, for a cluster that deploys from a Serve config (KubeRay's
    RayService, `serve deploy`, `serve run runtime.serve:ray_app`): `args["overrides"]` are this
    command line's overrides (a list, or one space-separated string), composed as
    `python -m runtime.serve cluster=ray OVERRIDES` would compose them."""
    from hydra import compose, initialize_config_dir

    from runtime.cluster import application

    overrides = args.get("overrides") or []
    overrides = shlex.split(overrides) if isinstance(overrides, str) else [str(o) for o in overrides]
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name="serve", overrides=["cluster=ray", *overrides])
    if problem := unknown_setting(cfg):
        raise ServeError(problem)
    app: ServeApp = OmegaConf.to_object(cfg)
    apply_environment(app)
    return application(app, export_command(app, overrides))


if __name__ == "__main__":
    main()
