"""Calibrated exit heads: the file `python -m pipeline calibrate` writes and the export loads.

One safetensors file holds, for every exit before full depth, its head's parameters under their
AutoGLM names, in float32:

  text.segments.{k}.exit_norm.weight            [D]
  text.segments.{k}.exit_adapter.down.weight    [r, D]   (with model.text.exit_adapter_rank = r > 0)
  text.segments.{k}.exit_adapter.up.weight      [D, r]

Its metadata says what they were calibrated against (the base weights' identity) and carries the
calibrated confidence thresholds, so that one sha256 covers both. The full-depth exit is not in
the file: its norm is the checkpoint's final norm, the teacher the other exits were distilled from.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open

from model.files import sha256_file

if TYPE_CHECKING:
    from .autoglm import AutoGLM, ModelConfig

EXITS_FORMAT = "dyngraph-exits"
EXITS_VERSION = 1
EXITS_NAME = "exits.safetensors"
EXITS_DIR = "exits"  # <checkpoint>/exits/exits.safetensors is found without model.exits
AUTO = "auto"


class ExitsError(ValueError):
    """An exits file that cannot be used with this model; the message names the file and what differs."""


@dataclass
class ExitsInfo:
    path: Path
    sha256: str
    bytes: int
    exit_layers: list[int]  # the exits the file holds (every exit but the last)
    adapter_rank: int
    thresholds: dict[int, float | None]  # exit layer -> lowest top-1 probability that meets the target; None: never exit there
    target_agreement: float
    base_weights: dict  # the export's weights identity (seed, init_device, checkpoint fingerprint) they were calibrated on
    metadata: dict = field(default_factory=dict)  # everything else calibrate recorded (corpus, steps, figures)

    def record(self) -> dict:
        """The manifest's `exits` entry: what the runtime's confidence policy reads."""
        return {"file": str(self.path), "sha256": self.sha256, "bytes": self.bytes, "exit_layers": self.exit_layers,
                "adapter_rank": self.adapter_rank, "target_agreement": self.target_agreement,
                "thresholds": {str(k): v for k, v in self.thresholds.items()}, "base_weights": self.base_weights}


def resolve_exits(cfg: ModelConfig) -> Path | None:
    """model.exits: a file; "auto" (default): <model.checkpoint>/exits/exits.safetensors if there is one; null: none."""
    if cfg.exits is None or cfg.exits == "":
        return None
    if cfg.exits != AUTO:
        return Path(cfg.exits).expanduser()
    if cfg.checkpoint:
        found = Path(cfg.checkpoint).expanduser() / EXITS_DIR / EXITS_NAME
        if found.is_file():
            return found
    return None


def exit_parameters(model: AutoGLM) -> dict[str, torch.nn.Parameter]:
    """The parameters an exits file holds: every exit head but the full-depth one."""
    segments = model.text.segments
    return {f"text.segments.{k}.{name}": p for k in range(len(segments) - 1) for name, p in segments[k].named_parameters()
            if name.startswith(("exit_norm.", "exit_adapter."))}


def read_exits(path: str | Path) -> tuple[ExitsInfo, dict[str, list[int]]]:
    """The file's record and its tensor shapes, without loading the tensors."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ExitsError(f"exits file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ExitsError(f"exits file {path} is not a readable safetensors file: {e}") from None
    if meta.get("format") != EXITS_FORMAT:
        raise ExitsError(f"{path} is not a dyngraph exits file (metadata format={meta.get('format')!r}); write one with python -m pipeline calibrate")
    if meta.get("version") != str(EXITS_VERSION):
        raise ExitsError(f"exits file {path} has version {meta.get('version')}, this dyngraph reads {EXITS_VERSION}: calibrate again")
    try:
        info = ExitsInfo(path=path.resolve(), sha256=sha256_file(path), bytes=path.stat().st_size,
                         exit_layers=json.loads(meta["exit_layers"]), adapter_rank=int(meta["adapter_rank"]),
                         thresholds={int(k): v for k, v in json.loads(meta["thresholds"]).items()},
                         target_agreement=float(meta["target_agreement"]), base_weights=json.loads(meta["base_weights"]),
                         metadata=json.loads(meta.get("calibration", "{}")))
    except (KeyError, ValueError, TypeError) as e:
        raise ExitsError(f"exits file {path} has malformed metadata: {e}") from None
    return info, shapes


def check_exits(model: AutoGLM, info: ExitsInfo, shapes: dict[str, list[int]]) -> None:
    """Raise ExitsError naming the first tensor (with both shapes) or exit that does not fit `model`."""
    args = model.cfg.text
    if info.exit_layers != list(args.exit_layers[:-1]):
        raise ExitsError(f"exits file {info.path} holds exits {info.exit_layers}, the model's are {list(args.exit_layers[:-1])} "
                         f"(model.text.exit_layers={list(args.exit_layers)})")
    expected = {name: list(p.shape) for name, p in exit_parameters(model).items()}
    for name, shape in shapes.items():
        if name not in expected:
            hint = " (set model.text.exit_adapter_rank to the file's adapter_rank " + str(info.adapter_rank) + ")" if "exit_adapter" in name else ""
            raise ExitsError(f"exits file {info.path} tensor {name} {shape} has no counterpart in the model{hint}")
        if shape != expected[name]:
            raise ExitsError(f"exits file {info.path} tensor {name} has shape {shape} but the model expects {expected[name]}"
                             f" (model.text.dim={args.dim}, model.text.exit_adapter_rank={args.exit_adapter_rank})")
    missing = [n for n in expected if n not in shapes]
    if missing:
        raise ExitsError(f"exits file {info.path} lacks {missing[0]} {expected[missing[0]]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                         + f" (its adapter_rank is {info.adapter_rank}, model.text.exit_adapter_rank={args.exit_adapter_rank})")


@torch.no_grad()
def load_exits(model: AutoGLM, path: str | Path) -> ExitsInfo:
    """Copy the file's exit heads into `model` (cast to its dtype and device)."""
    info, shapes = read_exits(path)
    check_exits(model, info, shapes)
    params = exit_parameters(model)
    with safe_open(str(info.path), framework="pt") as f:
        for name in shapes:
            params[name].copy_(f.get_tensor(name))
    return info


def save_exits(tensors: dict[str, torch.Tensor], path: Path, *, exit_layers: list[int], adapter_rank: int,
               thresholds: dict[int, float | None], target_agreement: float, base_weights: dict, calibration: dict) -> ExitsInfo:
    """Write the file atomically (temporary file, fsync, rename) and return its record."""
    from safetensors.torch import save_file

    metadata = {
        "format": EXITS_FORMAT, "version": str(EXITS_VERSION), "exit_layers": json.dumps(exit_layers),
        "adapter_rank": str(adapter_rank), "thresholds": json.dumps({str(k): v for k, v in thresholds.items()}),
        "target_agreement": repr(float(target_agreement)), "base_weights": json.dumps(base_weights, sort_keys=True),
        "calibration": json.dumps(calibration, sort_keys=True),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return read_exits(path)[0]
