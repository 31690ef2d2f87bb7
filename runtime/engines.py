"""The engines of one export, checked against its manifest and loaded on their devices on demand."""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from exporters import EngineSession, get_exporter
from pipeline.config import ExportConfig
from pipeline.manifest import EngineRecord, Manifest, sha256_file

log = logging.getLogger(__name__)


class EngineMismatch(RuntimeError):
    """An engine file or library differs from what the manifest recorded."""


class EngineSet:
    """Sessions by engine name. `placement` maps an engine record to a device string."""

    def __init__(self, directory: str | Path, placement: Callable[[EngineRecord], str] = lambda e: "cpu", verify: bool = True):
        self.directory = Path(directory)
        self.manifest = Manifest.load(self.directory)
        self.placement = placement
        self.verify = verify
        self.exporter = get_exporter(ExportConfig(backend=self.manifest.backend["name"], dtype=self.manifest.dtype))
        self.sessions: dict[str, EngineSession] = {}
        if verify:
            self.check_versions()

    def check_versions(self) -> None:
        recorded = self.manifest.backend["versions"]
        for lib, found in self.exporter.runtime_versions().items():
            if recorded.get(lib) != found:
                raise EngineMismatch(f"engines in {self.directory} were built with {lib} {recorded.get(lib)}, found {found} here: export again")

    def device(self, name: str) -> torch.device:
        return torch.device(self.placement(self.manifest.engines[name]))

    def session(self, name: str) -> EngineSession:
        if name not in self.sessions:
            record = self.manifest.engines[name]
            if self.verify:
                self.check_files(record)
            device = self.placement(record)
            self.sessions[name] = self.exporter.load(self.directory / record.path, record.input_specs(), record.output_specs(), device)
            log.debug("loaded %s on %s", name, device)
        return self.sessions[name]

    def unload(self, name: str) -> None:
        self.sessions.pop(name, None)

    def check_files(self, record: EngineRecord) -> None:
        for f in record.files:
            path = self.directory / f.name
            if not path.is_file():
                raise EngineMismatch(f"engine {record.name}: {path} is missing")
            found = sha256_file(path)
            if found != f.sha256:
                raise EngineMismatch(f"engine {record.name}: {path} has sha256 {found[:16]}…, manifest expects {f.sha256[:16]}…")

    def run(self, name: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        session = self.session(name)
        # tensors cross devices here, device to device (two-GPU placement), never through the host
        return session.run({k: v.to(session.device, non_blocking=True) for k, v in feeds.items()})
