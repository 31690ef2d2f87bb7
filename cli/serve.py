"""python -m runtime.serve [overrides]: serve an export through the OpenAI chat completions API.

    python -m runtime.serve model=tiny runtime=cpu server.port=8000

An entry point: it composes conf/serve.yaml, applies the environment (ENABLE_DYNAMIC_GRAPH=False
forces static mode, DYNGRAPH_API_KEY sets the key) and assembles the layers: the runtime
(engines, placement, scheduler) behind an engine client, the chat service over it, the app over
that (cli/assemble.py build_service; cli/cluster.py builds each Ray replica with it too). A problem it can name (no export, engines that fail verification, a
placement the machine cannot hold, a port out of range or in use, checked before the engines load)
ends it with one line and exit status 2.
"""
from __future__ import annotations

import logging
import os
import shlex
import sys

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from cli.assemble import ServeError, build_service, open_export
from cli.command import CONF_DIR, Command, hydra_command, shared, unknown_setting
from exporters import BackendUnavailable
from runtime.engines import EngineMismatch
from runtime.generation import EngineConfigError
from runtime.placement import PlacementError
from runtime.policy import PolicyError
from serving.app import bind_socket, run_server
from serving.config import ServeApp

log = logging.getLogger("dyngraph")
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


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
        app.server.check()
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
        from cli.cluster import serve_on_ray as deploy
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

    from cli.cluster import application

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
