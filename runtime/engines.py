"""The engines of one export, checked against its manifest and loaded on their devices on demand.

Sessions are keyed by engine name, or "name@device" for a replica on another device than the
placement's (the shared LM head beside a deep exit). With a memory budget, loading an engine
first evicts the least recently used ones of its device until its weights fit; each load and
eviction is logged, since on a GPU host they are what a slow request's latency is made of.
"""
from __future__ import annotations

import copy
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection
from pathlib import Path

import torch
from torch import nn

from exporters import EngineIncompatible, EngineSession, get_runtime
from contract.engines import TensorSpec
from contract.manifest import EngineRecord, Manifest, sha256_file

log = logging.getLogger(__name__)


class EngineMismatch(RuntimeError):
    """An engine file or library differs from what the manifest recorded."""


class EngineSet:
    """Sessions by engine name. `placement` maps an engine record to a device string.

    `budget_bytes` bounds the engine bytes resident per device (LRU eviction); `on_load(name,
    device, bytes)` hears of every load; `cuda_graphs` names the engines whose sessions the backend
    makes able to capture CUDA graphs (the decode step's: runtime.step.captured_engines; an encoder
    graph may hold nodes the CUDA provider does not run, which capture refuses). `reference` swaps the files for
    the eager torch modules they were exported from (engine name -> module, see
    contract.engines.engine_specs): the reference backend, with nothing to verify.
    """

    def __init__(self, directory: str | Path, placement: Callable[[EngineRecord], str] = lambda e: "cpu", verify: bool = True,
                 budget_bytes: dict[str, int] | None = None, on_load: Callable[[str, str, int], None] | None = None,
                 cuda_graphs: Collection[str] = (), reference: dict[str, nn.Module] | None = None):
        self.directory = Path(directory)
        self.manifest = Manifest.load(self.directory)
        self.placement = placement
        self.reference = reference
        self.verify = verify and reference is None
        self.budget_bytes = budget_bytes or {}
        self.on_load = on_load
        self.cuda_graphs = set(cuda_graphs)
        self.backend = get_runtime(self.manifest.backend["name"])  # the run side of the backend that built them
        self.sessions: OrderedDict[str, EngineSession] = OrderedDict()  # least recently used first
        self.verified: dict[str, tuple] = {}  # engine -> its files' stat when hashed: an unchanged one reloads without rehashing
        self.broken: dict[str, str] = {}  # engine -> why its last load failed verification (its paths are degraded)
        self.lock = threading.Lock()  # the engine thread loads and evicts while HTTP handlers read `loaded`
        if self.verify:
            self.check_versions()

    def check_versions(self) -> None:
        try:  # each backend knows what it can run: exact versions, or later ones for portable engines
            self.backend.check_runtime(self.manifest.backend, self.directory)
        except EngineIncompatible as e:
            raise EngineMismatch(str(e)) from None

    def device(self, name: str) -> torch.device:
        return torch.device(self.placement(self.manifest.engines[name]))

    def session(self, name: str, device: str | torch.device | None = None) -> EngineSession:
        record = self.manifest.engines[name]
        home = self.placement(record)
        device = home if device is None else str(torch.device(device))
        key = name if device == home else f"{name}@{device}"
        with self.lock:
            if key in self.sessions:
                self.sessions.move_to_end(key)
                return self.sessions[key]
        stamp = file_stamp(self.directory, record) if self.verify else None  # None also when a file is missing
        if self.verify and (stamp is None or self.verified.get(name) != stamp):
            try:
                self.check_files(record)
            except EngineMismatch as e:
                self.broken[name] = str(e)
                raise
            self.broken.pop(name, None)
            self.verified[name] = stamp
        self.make_room(device, record.bytes, key)
        session = self.load(record, device)
        with self.lock:
            self.sessions[key] = session
        if self.on_load:
            self.on_load(name, device, record.bytes)
        log.log(logging.INFO if self.budget_bytes else logging.DEBUG, "loaded %s on %s (%s)", name, device, mib(record.bytes))
        return session

    def load(self, record: EngineRecord, device: str) -> EngineSession:
        inputs, outputs = record.input_specs(), record.output_specs()
        if self.reference is not None:
            return EagerSession(self.reference[record.name], inputs, outputs, device)
        return self.backend.load(self.directory / record.path, inputs, outputs, device, built_with=self.manifest.backend,
                                  cuda_graphs=record.name in self.cuda_graphs)

    def make_room(self, device: str, needed: int, key: str) -> None:
        budget = self.budget_bytes.get(device)
        if not budget:
            return
        if needed > budget:
            raise MemoryError(f"engine {key} needs {mib(needed)}, more than the whole budget of {mib(budget)} on {device}")
        while self.resident_bytes(device) + needed > budget:
            with self.lock:
                victim = next(k for k in self.sessions if self.key_device(k) == device)
                del self.sessions[victim]
            log.info("evicted %s from %s to make room for %s (budget %s)", victim, device, key, mib(budget))

    def key_device(self, key: str) -> str:
        name, _, device = key.partition("@")
        return device or self.placement(self.manifest.engines[name])

    def resident_bytes(self, device: str) -> int:
        with self.lock:
            keys = list(self.sessions)
        return sum(self.manifest.engines[k.partition("@")[0]].bytes for k in keys if self.key_device(k) == device)

    def loaded(self) -> list[str]:
        with self.lock:
            return list(self.sessions)

    def check_files(self, record: EngineRecord) -> None:
        for f in record.files:
            path = self.directory / f.name
            if not path.is_file():
                raise EngineMismatch(f"engine {record.name}: {path} is missing (manifest expects sha256 {f.sha256})")
            found = sha256_file(path)
            if found != f.sha256:
                raise EngineMismatch(f"engine {record.name}: {path} has sha256 {found}, manifest expects {f.sha256}")

    def run(self, name: str, feeds: dict[str, torch.Tensor], device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
        """One uncaptured run with session-allocated outputs (prefill, encoders)."""
        session = self.session(name, device)
        # tensors cross devices here, device to device (two-GPU placement), never through the host;
        # a CPU scalar (total_sequence_length) stays where the engine reads it
        return session.run({k: v if v.dim() == 0 else v.to(session.device, non_blocking=True).contiguous() for k, v in feeds.items()})



def file_stamp(directory: Path, record: EngineRecord) -> tuple | None:
    """What changes when an engine's files are rewritten, replaced or deleted, short of hashing them."""
    try:
        return tuple((s.st_size, s.st_mtime_ns, s.st_ino) for s in ((directory / f.name).stat() for f in record.files))
    except OSError:
        return None


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class EagerSession:
    """An engine's eager torch module behind the session interface: the reference the engine files are checked against."""

    def __init__(self, module: nn.Module, inputs: list[TensorSpec], outputs: list[TensorSpec], device: str):
        self.device = torch.device(device)
        here = next(module.parameters()).device
        # the reference modules live where the model was built: one wanted on another device gets its own copy
        self.module = module if here == self.device else copy.deepcopy(module).to(self.device)
        self.inputs, self.outputs = inputs, outputs

    def run(self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor] | None = None,
            graph: bool = False) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            out = self.module(*(feeds[t.name] for t in self.inputs))
        results = dict(zip((t.name for t in self.outputs), out if isinstance(out, tuple) else (out,)))
        # the engine contract: in-place outputs land in their input's memory, caller-owned ones in the caller's
        for spec in self.outputs:
            target = feeds[spec.inplace_of] if spec.inplace_of else (outputs or {}).get(spec.name)
            if target is not None:
                results[spec.name] = target.copy_(results[spec.name])
        return results
