"""The Hydra entry points behind `python -m pipeline`. Hydra stays here: everything below takes
typed dataclasses."""
from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from hydra.core.config_store import ConfigStore

from contract.config import BenchApp, BenchConfig, CalibrateApp, CalibrateConfig, ExportApp, ExportConfig, PathsConfig
from model.autoglm import ModelConfig
from runtime.config import ClusterConfig, RuntimeConfig, ServeApp

log = logging.getLogger("dyngraph")
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def register_configs() -> None:
    """Every entry point's typed schemas in Hydra's ConfigStore (runtime/serve.py calls it too):
    the one place Hydra learns them, so library modules never import Hydra."""
    cs = ConfigStore.instance()
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="export", name="export_schema", node=ExportConfig)
    cs.store(group="paths", name="paths_schema", node=PathsConfig)
    cs.store(name="export_app_schema", node=ExportApp)
    cs.store(group="bench", name="bench_schema", node=BenchConfig)
    cs.store(name="bench_app_schema", node=BenchApp)
    cs.store(group="calibrate", name="calibrate_schema", node=CalibrateConfig)
    cs.store(name="calibrate_app_schema", node=CalibrateApp)
    cs.store(group="runtime", name="runtime_schema", node=RuntimeConfig)
    cs.store(group="cluster", name="cluster_schema", node=ClusterConfig)
    cs.store(name="serve_app_schema", node=ServeApp)


register_configs()


def quiet_exporter_logs() -> None:
    # torch.onnx narrates each export step and warns about optional torchvision ops
    warnings.filterwarnings("ignore", module=r"torch\.onnx")
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("torch.onnx", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)


@hydra.main(config_path=CONF_DIR, config_name="export", version_base=None)
def export(cfg: DictConfig) -> None:
    from pipeline.export import ExportError, run_export

    quiet_exporter_logs()
    app: ExportApp = OmegaConf.to_object(cfg)
    try:
        run_export(app.model, app.export, app.engines_dir)
    except ExportError as e:
        log.error("export failed: %s", e)
        sys.exit(2)


def server_overrides(app: BenchApp) -> list[str]:
    """The overrides that make runtime.serve pick the engines this bench composed: the same model
    and export choices, any of their fields set on the command line, and the dtype and device a
    preset may have set."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    picked = [f"model={hc.runtime.choices['model']}", f"export={hc.runtime.choices['export']}"]
    given = [o for o in hc.overrides.task if o.lstrip("+~").startswith(("model.", "export."))]
    return picked + [f"export.dtype={app.export.dtype}", f"export.device={app.export.device}"] + given


@hydra.main(config_path=CONF_DIR, config_name="bench", version_base=None)
def bench(cfg: DictConfig) -> None:
    from bench.run import BenchError, run_bench

    # one line per request from httpx, and matplotlib's font cache notice, would bury the progress bar
    for name in ("httpx", "matplotlib"):
        logging.getLogger(name).setLevel(logging.WARNING)
    app: BenchApp = OmegaConf.to_object(cfg)
    try:
        run_bench(app, server_overrides(app))
    except BenchError as e:
        log.error("bench failed: %s", e)
        sys.exit(2)


# what compare's own flags said, parsed before Hydra sees the command line: --tolerance takes
# metric names, whose dots Hydra would read as nesting
COMPARE_CLI: dict = {"tolerances": {}, "error": None}


@hydra.main(config_path=CONF_DIR, config_name="bench", version_base=None)
def compare_app(cfg: DictConfig) -> None:
    from bench.compare import CompareError, run_compare

    app: BenchApp = OmegaConf.to_object(cfg)
    try:
        if COMPARE_CLI["error"]:
            raise CompareError(COMPARE_CLI["error"])
        code = run_compare(app.compare, COMPARE_CLI["tolerances"])
    except CompareError as e:
        log.error("compare failed: %s", e)
        sys.exit(2)
    sys.exit(code)


def compare() -> None:
    """python -m pipeline compare BASE.json NEW.json [--tolerance METRIC=X ...] [overrides]"""
    files, rest, args = [], [], sys.argv[1:]
    while args:
        arg = args.pop(0)
        if arg == "--tolerance" or arg.startswith("--tolerance="):
            value = arg.partition("=")[2] if arg.startswith("--tolerance=") else (args.pop(0) if args else "")
            name, _, tolerance = value.partition("=")
            try:
                COMPARE_CLI["tolerances"][name] = float(tolerance)
            except ValueError:
                COMPARE_CLI["error"] = f"--tolerance takes METRIC=FRACTION (a metric name or glob), got {value!r}"
        elif "=" not in arg and not arg.startswith("-"):
            files.append(arg)
        else:
            rest.append(arg)
    if files and len(files) != 2:
        COMPARE_CLI["error"] = f"give two reports: python -m pipeline compare BASE.json NEW.json (got {len(files)} paths)"
    # the paths become overrides, quoted so that Hydra takes any character in them literally
    escaped = (f.replace("\\", "\\\\").replace("'", "\\'") for f in files)
    sys.argv[1:] = [f"compare.{key}='{path}'" for key, path in zip(("base", "new"), escaped)] + rest
    sys.argv.append("hydra.help.app_name='python -m pipeline compare'")  # it shares conf/bench.yaml with bench
    compare_app()


@hydra.main(config_path=CONF_DIR, config_name="calibrate", version_base=None)
def calibrate(cfg: DictConfig) -> None:
    from calibrate.run import CalibrateError, run_calibrate
    from calibrate.train import run_train

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    app: CalibrateApp = OmegaConf.to_object(cfg)
    try:
        (run_train if app.calibrate.mode == "model" else run_calibrate)(app)
    except CalibrateError as e:
        log.error("calibrate failed: %s", e)
        sys.exit(2)


COMMANDS = {"export": export, "calibrate": calibrate, "bench": bench, "compare": compare}
