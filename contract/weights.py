"""What made a model's weights, as the export records it in the manifest (`model.weights`) and the
bench and calibration compare against it."""
from __future__ import annotations

import torch

from contract.config import ExportConfig
from model.autoglm import ModelConfig
from model.exits import ExitsError, read_exits, resolve_exits


class WeightsError(ValueError):
    """The checkpoint or exits file the config names cannot be read; the message says which."""


def weights_identity(model_cfg: ModelConfig, cfg: ExportConfig) -> dict:
    """What determines the weights: the seed and the generator's device for random ones (CPU and
    CUDA generators draw different numbers), the checkpoint's content hash for loaded ones."""
    identity = {"seed": model_cfg.seed, "init_device": torch.device(cfg.device).type, "checkpoint": None, "exits": None}
    if model_cfg.checkpoint:
        from model.checkpoint import CheckpointError, checkpoint_fingerprint

        try:
            identity["checkpoint"] = checkpoint_fingerprint(model_cfg.checkpoint)
        except (CheckpointError, OSError) as e:
            raise WeightsError(f"model.checkpoint={model_cfg.checkpoint}: {e}") from None
    if path := resolve_exits(model_cfg):
        try:
            identity["exits"] = read_exits(path)[0].sha256  # calibrated exit heads (python -m pipeline calibrate)
        except ExitsError as e:
            raise WeightsError(str(e)) from None
    return identity
