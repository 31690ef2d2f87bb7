"""Which device runs each engine, derived from the decoder layers the manifest says it holds.

Decoder engines (segments, and the cross-attention in front of each) go to the device that holds
their first layer; everything else (embedding, encoders, the shared LM head) to the first device.
A shallow request never leaves the first device; a deep one sends its exit hidden state back
(dim values per row: 8 KiB in phone-9b, where the logits would be 300 KiB), so one head call
serves every exit of a decode step.
"""
from __future__ import annotations

import bisect

import torch

from contract.manifest import EngineRecord, Manifest
from runtime.config import PlacementConfig


class PlacementError(ValueError):
    pass


class Placement:
    def __init__(self, cfg: PlacementConfig, manifest: Manifest):
        self.name = cfg.name
        self.devices = [str(torch.device(d)) for d in cfg.devices]
        self.first_layers = list(cfg.first_layers)
        text = manifest.model["config"]["text"]
        n_layers, exits = text["n_layers"], text["exit_layers"]
        if not self.devices or len(self.devices) != len(self.first_layers):
            raise PlacementError(f"placement {cfg.name}: devices {cfg.devices} and first_layers {cfg.first_layers} must pair up")
        if self.first_layers[0] != 0 or self.first_layers != sorted(set(self.first_layers)) or self.first_layers[-1] >= n_layers:
            raise PlacementError(f"placement {cfg.name}: first_layers {cfg.first_layers} must start at 0 and increase below {n_layers}")
        cuts = [c for c in self.first_layers[1:] if c not in exits]
        if cuts:
            raise PlacementError(f"placement {cfg.name}: a device boundary at layer {cuts[0]} would split a segment; "
                                 f"boundaries must be exit layers {exits}")
        for device in map(torch.device, set(self.devices)):
            if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
                found = torch.cuda.device_count() if torch.cuda.is_available() else 0
                raise PlacementError(f"placement {cfg.name} needs {device} but torch sees {found} CUDA GPU(s); "
                                     f"use {'runtime=one_gpu' if found else 'runtime=cpu'}")
            if device.type not in ("cpu", "cuda"):
                raise PlacementError(f"placement {cfg.name}: unsupported device {device}")

    def layer_device(self, layer: int) -> str:
        return self.devices[bisect.bisect_right(self.first_layers, layer) - 1]

    def __call__(self, record: EngineRecord) -> str:
        if record.layers is None:
            return self.devices[0]
        return self.layer_device(record.layers[0])
