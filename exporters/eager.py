"""The eager backend: an export's engines run as the torch modules they were exported from.

What `runtime.backend=eager` serves: the reference that engine output is compared against,
through the same runtime. It builds nothing (it has no builder in BACKENDS) and reads no engine
file: the model is made again from the export's manifest (its config, the weights' seed and
generator device or checkpoint, the export dtype), and each engine is that model's module of the
cut (contract.engines.engine_specs), the one the export traced. With no file read, there is
nothing to verify and no library version to match.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from contract.engines import EXPORT_DTYPES, Limits, TensorSpec, engine_specs
from contract.manifest import Manifest
from model.autoglm import ModelConfig, build_model
from model.glm import ModelArgs
from model.multimodal.audio import AudioArgs
from model.multimodal.vision import VisionArgs


class EagerRuntime:
    name = "eager"
    cuda_graphs = False  # a captured run is an ordinary one
    reads_files = False

    def __init__(self):
        self.modules: dict[Path, dict[str, nn.Module]] = {}  # export directory -> engine file name -> its module

    def check_runtime(self, backend: dict, directory: Path) -> None:
        pass  # torch runs the modules, whichever library built the files

    def check_devices(self, dtype: str, devices: list[str]) -> None:
        pass  # eager torch runs every dtype on every device

    def load(self, path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], device: str,
             built_with: dict | None = None, capture_lock=None) -> "EagerSession":
        return EagerSession(self.module(path), inputs, outputs, device)

    def module(self, path: Path) -> nn.Module:
        """The module of the engine at `path`, from the model that the manifest beside it describes
        (made at the export's first load)."""
        directory = path.parent
        if directory not in self.modules:
            manifest = Manifest.load(directory)
            model = build_model(model_config(manifest.model["config"]), manifest.model["weights"]["init_device"],
                                EXPORT_DTYPES[manifest.dtype])
            dims = manifest.dims
            modules = {spec.name: spec.module for spec in engine_specs(model, Limits(dims["batch"]["max"], dims["seq"]["max"],
                                                                                     dims["capacity"]["max"]))}
            self.modules[directory] = {record.path: modules[name] for name, record in manifest.engines.items()}
        return self.modules[directory][path.name]


def model_config(d: dict) -> ModelConfig:
    """The model config that a manifest records (as dataclasses.asdict wrote it)."""
    return ModelConfig(**{**d, "text": ModelArgs(**d["text"]), "vision": VisionArgs(**d["vision"]), "audio": AudioArgs(**d["audio"])})


class EagerSession:
    """An engine's eager torch module behind the session interface."""

    uncaptured = 0  # it captures nothing: a captured run is a run like any other

    def __init__(self, module: nn.Module, inputs: list[TensorSpec], outputs: list[TensorSpec], device: str):
        self.device = torch.device(device)
        here = next(module.parameters()).device
        # the modules live where the model was made: one wanted on another device gets its own copy
        self.module = module if here == self.device else copy.deepcopy(module).to(self.device)
        self.inputs, self.outputs = inputs, outputs

    def needs_capture(self, batch: int) -> bool:
        return False

    def run(self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor] | None = None,
            captured: bool = False) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            out = self.module(*(feeds[t.name] for t in self.inputs))
        results = dict(zip((t.name for t in self.outputs), out if isinstance(out, tuple) else (out,)))
        # the engine contract: in-place outputs land in their input's memory, caller-owned ones in the caller's
        for spec in self.outputs:
            target = feeds[spec.inplace_of] if spec.inplace_of else (outputs or {}).get(spec.name)
            if target is not None:
                results[spec.name] = target.copy_(results[spec.name])
        return results
