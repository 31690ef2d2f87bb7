"""The backend registry: per backend a builder and a runtime, each behind one protocol.

The builder (`Exporter`) turns engine specs that share one graph into engine files: what it
builds with (versions, settings, sources) is part of every cache key, and it loads what it just
built for validation. The export stage (pipeline/export.py) does the rest the same way for every
backend: cache keys, validation against the eager module, atomic writes and the manifest.

The runtime (`Runtime`) is the run side, all the serving runtime sees: it checks that engines
built as the manifest says can run here, says whether its sessions replay CUDA graphs, and loads
an engine as a session (`EngineSession`) that binds caller-owned tensors by name and runs on the
device's engine stream. A session that replays CUDA graphs owns them: it counts its own warm-up
runs and keeps a graph per batch size; the runtime only asks for a captured run. A runtime module
imports only its execution library (onnxruntime, tensorrt; torch for the eager backend), never
the exporter stack.

A new backend: a builder and a runtime class (one file each, or one for both), and a line in
BACKENDS. A backend without a builder (eager) runs exports that another backend built.
"""
from __future__ import annotations

import importlib
import threading
from pathlib import Path
from typing import Protocol

import torch

from contract.config import ExportConfig
from contract.engines import Dim, EngineSpec, TensorSpec

# name -> ("module:builder class", "module:runtime class"); imported on demand so that a missing
# optional library (TensorRT) only matters to those who ask for that backend. No builder: the
# backend exports nothing and runs what another one exported.
BACKENDS = {
    "onnx": ("exporters.onnx:OnnxExporter", "exporters.ort:OrtRuntime"),
    "tensorrt": ("exporters.tensorrt:TensorRTExporter", "exporters.tensorrt:TensorRTRuntime"),
    "eager": (None, "exporters.eager:EagerRuntime"),
}


# an execution library a backend module imports at the top -> how to install it (an optional extra)
EXECUTION_LIBRARIES = {"onnxruntime": "pip install -e '.[cpu]', or '.[gpu]' on a CUDA machine (never both)"}


class BackendUnavailable(RuntimeError):
    """The backend's library is not installed or cannot run here; the message says what to do."""


class EngineIncompatible(RuntimeError):
    """Engines built with a library or GPU that this machine cannot run them with."""


class EngineSession(Protocol):
    device: torch.device
    uncaptured: int  # captured runs it made uncaptured because the capture lock was taken (a load held it)

    def run(self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor] | None = None,
            captured: bool = False) -> dict[str, torch.Tensor]:
        """Inputs by name (on `device`) -> outputs by name (on `device`). An output declared
        `inplace_of` an input is written into that input's memory, one named in `outputs` into the
        caller's tensor, any other into a fresh one. Runs on the device's engine stream
        (`device_stream`), ordered after the caller's stream and before what it queues next.
        `captured`: a decode step's run over tensors the caller keeps per batch size; a session
        loaded with a capture lock replays the CUDA graph it captured for them (after the warm-up
        runs its library needs), any other runs it as usual."""

    def needs_capture(self, batch: int) -> bool:
        """Whether captured runs at this batch size still have a graph to capture on the calling
        thread (false for a session that captures nothing)."""


class Runtime(Protocol):
    name: str
    cuda_graphs: bool  # whether its sessions can capture and replay CUDA graphs (run(..., captured=True))
    reads_files: bool  # whether its sessions are made from the engine files (so they are verified before a load)

    def check_runtime(self, backend: dict, directory: Path) -> None:
        """Raise EngineIncompatible, with what was recorded and what is found here, when engines
        built as the manifest's `backend` record says cannot run on this machine."""

    def check_devices(self, dtype: str, devices: list[str]) -> None:
        """Raise EngineIncompatible, saying what to do, when engines of `dtype` cannot run on these devices."""

    def load(self, path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], device: str,
             built_with: dict | None = None, capture_lock: threading.RLock | None = None) -> EngineSession:
        """The engine at `path` (in the export's directory, beside manifest.json), ready to run on
        `device` ("cpu", "cuda:0", ...); `built_with` is the manifest's backend record.
        `capture_lock`: a session whose captured runs replay CUDA graphs (decode steps), holding this
        lock while it captures one: a capture records all work on the device, so the engine set
        holds it for every load. A runtime with `loads_from_memory` also takes `host_files` (file
        name -> contents)."""


class Exporter(Protocol):
    name: str
    artifacts: tuple[str, ...]  # glob patterns of the files it writes, for clean-up
    sources: tuple[str, ...]  # its code files, relative to the repository: a change rebuilds its engines
    quantizations: tuple[str, ...]  # the export.quantize values it builds (weight-only); () for none

    def versions(self) -> dict[str, str]:
        """Library versions: recorded in the manifest and part of every cache key."""

    def check_export(self) -> None:
        """Optional: raise BackendUnavailable when this export cannot be built here."""

    def settings(self) -> dict:
        """Settings that change the engines built: part of every cache key (the manifest records them)."""

    def engine_settings(self, graph: str) -> dict:
        """Optional: the settings that change one engine of `graph`, where they differ per engine
        (the ONNX backend's quantization applies to some graphs only); the cache key uses these."""

    def engine_files(self, stem: str) -> list[str]:
        """The file names one engine is written as (the first is the one to load)."""

    def build(self, specs: list[EngineSpec], dims: dict[str, Dim], stems: list[Path], engines_dir: Path) -> None:
        """Write each spec's engine at stems[i] (+ suffixes, in a staging directory); the specs
        share one graph. `engines_dir` is where they will live (for caches kept beside them)."""

    def load(self, path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], device: str) -> EngineSession:
        """An engine this builder just built, as a session for validation (its runtime's load)."""


_streams: dict[torch.device, "torch.cuda.Stream"] = {}


def device_stream(device: torch.device) -> "torch.cuda.Stream":
    """The one stream engines run on for a CUDA device, shared by every backend's sessions.

    Not torch's default stream: its handle is 0, which ONNX Runtime reads as "no user stream"
    and replaces by a stream of its own (onnxruntime PR #19229).
    """
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]


def host_values(values: list[int], device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A few host values as a tensor on `device`, without waiting for the device: a copy from pageable
    host memory waits for the whole stream first (CUDA's rule), which would stall the host behind the
    engines it has queued; from pinned memory it is queued like a kernel (torch keeps the pinned block
    until the copy has run)."""
    t = torch.tensor(values, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else t


def backend_class(name: str, side: int):
    """The backend's builder (side 0) or runtime (side 1) class, not yet built: what it can build
    (e.g. the builder's `quantizations`) is known before its library is imported, so that a request
    it can never serve is refused first."""
    if name not in BACKENDS:
        raise KeyError(f"unknown export backend {name!r}; known: {', '.join(n for n, sides in BACKENDS.items() if sides[side])}")
    if BACKENDS[name][side] is None:
        raise KeyError(f"the {name} backend builds no engines: it runs an export made with another backend (runtime.backend={name})")
    module_name, cls_name = BACKENDS[name][side].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in EXECUTION_LIBRARIES:
            raise
        raise BackendUnavailable(f"the {name} backend needs {e.name}, which is not installed here: "
                                 f"{EXECUTION_LIBRARIES[e.name.split('.')[0]]}") from None
    return getattr(module, cls_name)


def get_exporter(cfg: ExportConfig) -> Exporter:
    """The builder of `cfg.backend`, set up for this export."""
    return backend_class(cfg.backend, 0)(cfg)


def get_runtime(name: str) -> Runtime:
    """The run side of backend `name` (a manifest's backend["name"])."""
    return backend_class(name, 1)()
