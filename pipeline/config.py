"""Typed schemas of the Hydra configs, registered in Hydra's ConfigStore.

The YAML files under conf/ fill these in; an override of a field that does not exist, or of
the wrong type, is refused by Hydra before any work starts. Entry points turn the composed
DictConfig into these dataclasses with OmegaConf.to_object, and library code only sees them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from model.autoglm import ModelConfig


@dataclass
class TensorRTSettings:
    workspace_gb: float = 8.0  # builder scratch memory limit
    optimization_level: int = 3  # 0..5: higher builds longer for faster kernels
    version_compatible: bool = False  # engines that load on later TensorRT versions
    strongly_typed: bool = True  # take the precisions the ONNX carries
    int8: bool = False
    timing_cache: str = "timing.cache"  # kept beside the engines, reused across builds


@dataclass
class ExportConfig:
    backend: str = "onnx"
    dtype: str = "fp32"  # fp32 | fp16 | bf16
    device: str = "cpu"  # where the model is built, traced and validated: cpu | cuda
    opset: int = 18
    max_batch: int = 8
    max_seq: int = 512  # new tokens per forward (prompt chunk)
    max_context: int = 2048  # cached tokens
    static: bool = True  # also export the static (full-model) baseline
    # validation fails past max|engine - eager| / max|eager| for the export dtype
    tolerance: dict[str, float] = field(default_factory=lambda: {"fp32": 1e-4, "fp16": 2e-2, "bf16": 8e-2})
    progress: bool = True
    tensorrt: TensorRTSettings = field(default_factory=TensorRTSettings)


@dataclass
class ExportApp:
    model: ModelConfig = field(default_factory=ModelConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    engines_dir: str = "engines"


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="export", name="export_schema", node=ExportConfig)
    cs.store(name="export_app_schema", node=ExportApp)
