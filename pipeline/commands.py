"""The Hydra entry points behind `python -m pipeline`. Hydra stays here: everything below takes
typed dataclasses."""
from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline.config import ExportApp, register_configs

log = logging.getLogger("dyngraph")
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
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


COMMANDS = {"export": export}
