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

from contract.config import ExportConfig
from contract.engines import Dim, EngineSpec, TensorSpec

# name -> "module:class"; imported on demand so that a missing optional library (TensorRT)
# only matters to those who ask for that backend
BACKENDS = {
    "onnx": "exporters.onnx:OnnxExporter",
    "tensorrt": "exporters.tensorrt:TensorRTExporter",
}


class BackendUnavailable(RuntimeError):
    """The backend's library is not installed or cannot run here; the message says what to do."""


class EngineIncompatible(RuntimeError):
    """Engines built with a library or GPU that this machine cannot run them with."""


class EngineSession(Protocol):
    device: torch.device

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inputs by name (on `device`) -> outputs by name (on `device`)."""


class Exporter(Protocol):
    name: str
    artifacts: tuple[str, ...]  # glob patterns of the files it writes, for clean-up
    sources: tuple[str, ...]  # its code files, relative to the repository: a change rebuilds its engines

    def versions(self) -> dict[str, str]:
        """Library versions: recorded in the manifest and part of every cache key."""

    def check_runtime(self, backend: dict, directory: Path) -> None:
        """Raise EngineIncompatible, with what was recorded and what is found here, when engines
        built as the manifest's `backend` record says cannot run on this machine."""

    def check_export(self) -> None:
        """Optional: raise BackendUnavailable when this export cannot be built here."""

    def settings(self) -> dict:
        """Settings that change the engines built: part of every cache key."""

    def engine_files(self, stem: str) -> list[str]:
        """The file names one engine is written as (the first is the one to load)."""

    def build(self, specs: list[EngineSpec], dims: dict[str, Dim], stems: list[Path], engines_dir: Path) -> None:
        """Write each spec's engine at stems[i] (+ suffixes, in a staging directory); the specs
        share one graph. `engines_dir` is where they will live (for caches kept beside them)."""

    def load(self, path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], device: str,
             built_with: dict | None = None) -> EngineSession:
        """An engine file, ready to run on `device` ("cpu", "cuda:0", ...); `built_with` is the
        manifest's backend record."""


_streams: dict[torch.device, "torch.cuda.Stream"] = {}


def device_stream(device: torch.device) -> "torch.cuda.Stream":
    """The one stream engines run on for a CUDA device, shared by every backend's sessions.

    Not torch's default stream: its handle is 0, which ONNX Runtime reads as "no user stream"
    and replaces by a stream of its own (onnxruntime PR #19229).
    """
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]


def get_exporter(cfg: ExportConfig) -> Exporter:
    if cfg.backend not in BACKENDS:
        raise KeyError(f"unknown export backend {cfg.backend!r}; known: {', '.join(BACKENDS)}")
    module_name, cls_name = BACKENDS[cfg.backend].split(":")
    return getattr(importlib.import_module(module_name), cls_name)(cfg)
