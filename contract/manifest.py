"""manifest.json: what an export wrote, and the contract the runtime and the benchmarks read.

It is written last and atomically, and it names engine files by their cache key, so whatever
moment an export dies at, the manifest on disk points only at complete files of its own build.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from contract.engines import TensorSpec

SCHEMA_VERSION = 2  # 2: in-place segment caches (past_*/present_* per layer), the static path as a chain
MANIFEST_NAME = "manifest.json"


class ManifestError(ValueError):
    pass


@dataclass
class FileRecord:
    name: str
    sha256: str
    bytes: int


@dataclass
class EngineRecord:
    name: str
    graph: str
    key: str
    files: list[FileRecord]
    inputs: list[dict]  # {"name", "shape", "dtype"} with concrete dtypes
    outputs: list[dict]
    parameters: int
    layers: list[int] | None = None
    validation: list[dict] = field(default_factory=list)  # per probe shape: sizes and per-output errors
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    build_seconds: float = 0.0

    @property
    def path(self) -> str:
        return self.files[0].name

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    def input_specs(self) -> list[TensorSpec]:
        return [TensorSpec(t["name"], tuple(t["shape"]), t["dtype"]) for t in self.inputs]

    def output_specs(self) -> list[TensorSpec]:
        return [TensorSpec(t["name"], tuple(t["shape"]), t["dtype"], inplace_of=t.get("inplace_of")) for t in self.outputs]


@dataclass
class PathRecord:
    name: str
    exit_layer: int
    modalities: list[str]
    encode: list[str]
    step: list[str]
    static: bool = False


@dataclass
class Manifest:
    model: dict  # name, config, parameters, weights (how they were made), weights_hash
    backend: dict  # name, settings, versions
    dtype: str
    dims: dict  # name -> {min, max}
    engines: dict[str, EngineRecord]
    paths: list[PathRecord]
    created: str = ""
    schema_version: int = SCHEMA_VERSION
    exits: dict | None = None  # the calibrated exit heads the segments hold (model/exits.py ExitsInfo.record), with their thresholds
    # weight-only quantization: scheme, bits, block, head, the engines quantized, and per path the
    # agreement with the eager model in `dtype` on fixed random prompts (pipeline/quantization.py)
    quantization: dict | None = None

    @property
    def static_path(self) -> PathRecord | None:
        return next((p for p in self.paths if p.static), None)

    def path(self, exit_layer: int, modalities: tuple[str, ...] | list[str]) -> PathRecord:
        for p in self.paths:
            if not p.static and p.exit_layer == exit_layer and set(p.modalities) == set(modalities):
                return p
        raise KeyError(f"no path exits at {exit_layer} with {'+'.join(modalities)}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, ensure_ascii=False) + "\n"

    def save(self, directory: Path) -> None:
        write_atomic(directory / MANIFEST_NAME, self.to_json().encode())

    @classmethod
    def load(cls, directory: Path) -> "Manifest":
        path = Path(directory) / MANIFEST_NAME
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ManifestError(f"no manifest at {path}") from None
        except (OSError, json.JSONDecodeError) as e:
            raise ManifestError(f"unreadable manifest {path}: {e}") from None
        if raw.get("schema_version") != SCHEMA_VERSION:
            raise ManifestError(f"{path} has schema version {raw.get('schema_version')}, this dyngraph reads {SCHEMA_VERSION}: export again")
        try:
            raw["engines"] = {n: EngineRecord(**{**e, "files": [FileRecord(**f) for f in e["files"]]}) for n, e in raw["engines"].items()}
            raw["paths"] = [PathRecord(**p) for p in raw["paths"]]
            return cls(**raw)
        except (TypeError, KeyError) as e:
            raise ManifestError(f"malformed manifest {path}: {e}") from None


def engines_path(engines_dir: str | Path, model: str, backend: str, quantize: str | None = None) -> Path:
    """Where one export's engine files and manifest live: <engines_dir>/<model>/<backend>[-<quantize>]/,
    so that an int8 export sits beside the fp16 one instead of replacing it. The export writes there
    and the server, the bench and the probe read there; this is the only place that spells the rule."""
    return Path(engines_dir).expanduser() / model / (f"{backend}-{quantize}" if quantize else backend)


def write_atomic(path: Path, data: bytes) -> None:
    """Temporary file in the same directory, fsync, rename, fsync the directory."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync(path.parent)


def fsync(path: Path) -> None:
    """Flush a file, or a directory's entries (so that a rename survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
