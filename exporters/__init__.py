"""Exporter registry: one backend per file, all speaking one protocol.

A backend turns engine specs that share one graph into engine files, and loads an engine file
back as a session that binds tensors by name. The export stage (pipeline/export.py) does the
rest the same way for every backend: cache keys, validation against the eager module, atomic
writes and the manifest.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol

import torch

from pipeline.config import ExportConfig
from pipeline.engines import Dim, EngineSpec, TensorSpec

# name -> "module:class"; imported on demand so that a missing optional library (TensorRT)
# only matters to those who ask for that backend
BACKENDS = {
    "onnx": "exporters.onnx:OnnxExporter",
    "tensorrt": "exporters.tensorrt:TensorRTExporter",
}


class BackendUnavailable(RuntimeError):
    """The backend's library is not installed or cannot run here; the message says what to do."""


class EngineSession(Protocol):
    device: torch.device

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inputs by name (on `device`) -> outputs by name (on `device`)."""


class Exporter(Protocol):
    name: str
    artifacts: tuple[str, ...]  # glob patterns of the files it writes, for clean-up

    def versions(self) -> dict[str, str]:
        """Library versions: recorded in the manifest and part of every cache key."""

    def runtime_versions(self) -> dict[str, str]:
        """The libraries that run the engines: a runtime with other versions refuses them."""

    def settings(self) -> dict:
        """Settings that change the engines built: part of every cache key."""

    def engine_files(self, stem: str) -> list[str]:
        """The file names one engine is written as (the first is the one to load)."""

    def build(self, specs: list[EngineSpec], dims: dict[str, Dim], stems: list[Path]) -> None:
        """Write each spec's engine at stems[i] (+ suffixes); the specs share one graph."""

    def load(self, path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], device: str) -> EngineSession:
        """An engine file, ready to run on `device` ("cpu", "cuda:0", ...)."""


def get_exporter(cfg: ExportConfig) -> Exporter:
    if cfg.backend not in BACKENDS:
        raise KeyError(f"unknown export backend {cfg.backend!r}; known: {', '.join(BACKENDS)}")
    module_name, cls_name = BACKENDS[cfg.backend].split(":")
    return getattr(importlib.import_module(module_name), cls_name)(cfg)


def load_session(backend: str, path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], device: str,
                 cfg: ExportConfig | None = None) -> EngineSession:
    return get_exporter(cfg or ExportConfig(backend=backend)).load(path, inputs, outputs, device)
