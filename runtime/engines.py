"""The engines of one export, checked against its manifest and loaded on their devices on demand.

Sessions are keyed by engine name, or "name@device" for a replica on another device than the
placement's (the shared LM head beside a deep exit). With a memory budget, loading an engine
first evicts the least recently used ones of its device until its weights fit, sparing those in
use by requests in flight (`protected`) while others can go; `unload_idle` drops the on-demand
engines nobody used for a while. Each load is timed and reported (`on_load`), each unload too
(`on_unload`, with its reason: idle | budget), since on a GPU host they are what a slow request's
latency is made of. With `host_copy`, an engine's files are read once into host memory (pinned
for a CUDA device, so that the copy to the device is a DMA) and every later load of that engine
builds its session from there: an evicted engine comes back without touching the disk. Without
it, a load builds its session from the files (the page cache), hashing them only when they changed
since they were last hashed. `prefetch` does that first read and hash of every engine at start-up,
on a background thread, so that even a module's first load costs only its session's creation.

Loads are serialised by `load_lock`, which a session that replays CUDA graphs also holds while it
captures one (a capture must see no allocation on the device from another thread: it is the
session's `capture_lock`); a load may run on a background thread while the engine thread decodes
with what is resident, and a session only tries the lock: a decode step never waits out a load.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np
import torch

from exporters import EngineIncompatible, EngineSession, get_runtime
from contract.manifest import EngineRecord, FileRecord, Manifest, sha256_file

log = logging.getLogger(__name__)

UNLOAD_REASONS = ("idle", "budget")


class EngineMismatch(RuntimeError):
    """An engine file or library differs from what the manifest recorded."""


def describe(record: EngineRecord) -> str:
    """What an engine is for, as the load log says it (from its graph and layers, not its name)."""
    kind = "segment" if record.graph.startswith("segment") else record.graph
    layers = f"layers {record.layers[0]}-{record.layers[1] - 1}" if record.layers else ""
    before = f"before layer {record.layers[0]}" if record.layers else ""  # a cross-attention block's record is (first, first)
    return {"vision": "ViT encoder for image processing", "audio": "audio encoder for audio processing",
            "cross_kv": f"cross-attention keys/values ({before}) for media", "cross_attn": f"cross-attention block ({before}) for media",
            "segment": f"decoder segment ({layers})", "embed": "token embedding", "lm_head": "LM head"}.get(kind, record.name)


class EngineSet:
    """Sessions by engine name. `placement` maps an engine record to a device string.

    `budget_bytes` bounds the engine bytes resident per device (LRU eviction); `on_load(name,
    device, bytes, seconds)` hears of every load, `on_unload(name, device, reason)` of every
    unload; `announce` logs each load at INFO as `[DYNAMIC GRAPH] Loading ...` (modules on demand);
    `host_copy(device) -> bool` says whether loads for that device keep the files in host memory;
    `cuda_graphs` names the engines whose sessions capture CUDA graphs of their captured runs,
    holding `load_lock` while they do (the decode step's: runtime.step.captured_engines; an encoder
    graph may hold nodes the CUDA provider does not run, which capture refuses). `backend` names the
    registered backend that runs them: by default the one that built them (the manifest's), else
    one that runs any export (eager: the torch modules they were exported from).
    """

    def __init__(self, directory: str | Path, placement: Callable[[EngineRecord], str] = lambda e: "cpu", verify: bool = True,
                 budget_bytes: dict[str, int] | None = None, on_load: Callable[[str, str, int, float], None] | None = None,
                 on_unload: Callable[[str, str, str], None] | None = None, announce: bool = False,
                 host_copy: Callable[[str], bool] = lambda device: False,
                 cuda_graphs: Collection[str] = (), backend: str | None = None):
        self.directory = Path(directory)
        self.manifest = Manifest.load(self.directory)
        self.placement = placement
        self.backend = get_runtime(backend or self.manifest.backend["name"])  # its run side
        self.verify = verify and self.backend.reads_files
        self.budget_bytes = budget_bytes or {}
        self.on_load, self.on_unload, self.announce = on_load, on_unload, announce
        self.host_copy = host_copy if getattr(self.backend, "loads_from_memory", False) else lambda d: False
        self.cuda_graphs = set(cuda_graphs)
        self.sessions: OrderedDict[str, EngineSession] = OrderedDict()  # least recently used first
        self.last_used: dict[str, float] = {}  # key -> monotonic time of its last session() call
        self.protected: set[str] = set()  # engine names in use by requests in flight: evicted only when nothing else can go
        self.host: dict[str, dict[str, object]] = {}  # engine -> file name -> contents, verified when read
        self.file_locks = {name: threading.Lock() for name in self.manifest.engines}  # one reader of an engine's files at a time
        self.verified: dict[str, tuple] = {}  # engine -> its files' stat when hashed: an unchanged one reloads without rehashing
        self.broken: dict[str, str] = {}  # engine -> why its last load failed verification (its paths are degraded)
        self.loads: dict[str, list] = {}  # engine -> [loads, seconds]
        self.unloads: Counter[tuple[str, str]] = Counter()  # (engine, reason) -> unloads
        self.lock = threading.Lock()  # the engine thread loads and evicts while HTTP handlers read `loaded`
        self.load_lock = threading.RLock()  # one load at a time (budget arithmetic), and none during a CUDA graph capture
        if self.verify:
            self.check_versions()

    def check_versions(self) -> None:
        try:  # each backend knows what it can run: exact versions, or later ones for portable engines
            self.backend.check_runtime(self.manifest.backend, self.directory)
        except EngineIncompatible as e:
            raise EngineMismatch(str(e)) from None

    def device(self, name: str) -> torch.device:
        return torch.device(self.placement(self.manifest.engines[name]))

    def key(self, name: str, device: str | torch.device | None = None) -> tuple[str, str]:
        home = self.placement(self.manifest.engines[name])
        device = home if device is None else str(torch.device(device))
        return (name if device == home else f"{name}@{device}"), device

    def resident(self, name: str, device: str | torch.device | None = None) -> bool:
        key, _ = self.key(name, device)
        with self.lock:
            return key in self.sessions

    def session(self, name: str, device: str | torch.device | None = None) -> EngineSession:
        key, device = self.key(name, device)
        with self.lock:
            if key in self.sessions:
                self.sessions.move_to_end(key)
                self.last_used[key] = time.monotonic()
                return self.sessions[key]
        with self.load_lock:
            with self.lock:  # loaded by another thread while this one waited
                if key in self.sessions:
                    self.last_used[key] = time.monotonic()
                    return self.sessions[key]
            return self.load_session(name, key, device)

    def load_session(self, name: str, key: str, device: str) -> EngineSession:
        record = self.manifest.engines[name]
        if self.announce:
            log.info("[DYNAMIC GRAPH] Loading %s on %s", describe(record), device)
        start = time.perf_counter()
        host = None
        if self.host_copy(device):
            host = self.host_files(record)
        elif self.verify:
            self.verify_files(record)
        self.make_room(device, record.bytes, key)
        session = self.load(record, device, host)
        seconds = time.perf_counter() - start
        with self.lock:
            self.sessions[key] = session
            self.last_used[key] = time.monotonic()
            entry = self.loads.setdefault(name, [0, 0.0])
            entry[0] += 1
            entry[1] += seconds
        if self.on_load:
            self.on_load(name, device, record.bytes, seconds)
        log.log(logging.INFO if self.budget_bytes or self.announce else logging.DEBUG, "loaded %s on %s (%s) in %.3f s%s",
                name, device, mib(record.bytes), seconds, " from host memory" if host is not None else "")
        return session

    def verified_or_broken(self, record: EngineRecord, check: Callable[[], object]):
        try:
            out = check()
        except EngineMismatch as e:
            self.broken[record.name] = str(e)
            raise
        self.broken.pop(record.name, None)
        return out

    def host_files(self, record: EngineRecord) -> dict[str, object]:
        """The engine's files in host memory, read (and hashed as they are read) the first time: the
        .onnx as bytes (ONNX Runtime parses the protobuf from bytes only), every other file (external
        weights) into a host buffer, page-locked where CUDA is available."""
        def read() -> dict[str, object]:
            files = {}
            for f in record.files:
                path = self.existing(record, f)
                if f.name == record.path:
                    data = view = path.read_bytes()
                else:
                    data = host_buffer(path.stat().st_size)
                    with open(path, "rb") as fh:
                        fh.readinto(memoryview(data))
                    view = memoryview(data)
                if self.verify:
                    self.compare(record, f, path, hashlib.sha256(view).hexdigest())
                files[f.name] = data
            return files

        with self.file_locks[record.name]:  # the prefetch thread and a load may want the same engine
            if record.name not in self.host:
                self.host[record.name] = self.verified_or_broken(record, read)
            return self.host[record.name]

    def verify_files(self, record: EngineRecord) -> None:
        """Hash the engine's files against the manifest unless they are unchanged since last hashed."""
        with self.file_locks[record.name]:
            stamp = file_stamp(self.directory, record)  # None also when a file is missing
            if stamp is None or self.verified.get(record.name) != stamp:
                self.verified_or_broken(record, lambda: self.check_files(record))
                self.verified[record.name] = stamp

    def prefetch(self) -> threading.Thread | None:
        """Read every engine not loaded yet as its load would, on a background thread: into host
        memory where loads come from there, else hashed (`verify`) and so into the page cache; the
        disk and the hash off the request path. Returns the thread, or None with nothing to read.
        An engine whose files fail verification is left to its load, which reports it (and `broken`)."""
        loaded = {key.partition("@")[0] for key in self.loaded()}
        to_host = {n: self.host_copy(str(self.device(n))) for n in self.manifest.engines if n not in loaded and n not in self.host}
        names = [n for n, host in to_host.items() if host or self.verify]
        if not names:
            return None

        def prefetch() -> None:
            start = time.perf_counter()
            for name in names:
                record = self.manifest.engines[name]
                try:
                    self.host_files(record) if to_host[name] else self.verify_files(record)
                except (EngineMismatch, OSError) as e:
                    log.warning("[DYNAMIC GRAPH] not prefetched: %s", e)
            log.info("[DYNAMIC GRAPH] %d engines (%s) read and verified ahead of their loads in %.1f s", len(names),
                     mib(sum(self.manifest.engines[n].bytes for n in names)), time.perf_counter() - start)

        thread = threading.Thread(target=prefetch, name="dyngraph-prefetch", daemon=True)
        thread.start()
        return thread

    def load(self, record: EngineRecord, device: str, host: dict | None = None) -> EngineSession:
        inputs, outputs = record.input_specs(), record.output_specs()
        extra = {"host_files": host} if host is not None else {}
        return self.backend.load(self.directory / record.path, inputs, outputs, device, built_with=self.manifest.backend,
                                 capture_lock=self.load_lock if record.name in self.cuda_graphs else None, **extra)

    def make_room(self, device: str, needed: int, key: str) -> None:
        budget = self.budget_bytes.get(device)
        if not budget:
            return
        if needed > budget:
            raise MemoryError(f"engine {key} needs {mib(needed)}, more than the whole budget of {mib(budget)} on {device}")
        while self.resident_bytes(device) + needed > budget:
            with self.lock:
                mine = [k for k in self.sessions if self.key_device(k) == device]
                spare = [k for k in mine if k.partition("@")[0] not in self.protected]
                victim = (spare or mine)[0]  # the least recently used, sparing what requests in flight use while others can go
            self.unload(victim, "budget")
            log.info("evicted %s from %s to make room for %s (budget %s)", victim, device, key, mib(budget))

    def unload(self, key: str, reason: str) -> None:
        """Drop a session (its CUDA graphs with it); a run in progress keeps its own reference until it returns."""
        with self.lock:
            if self.sessions.pop(key, None) is None:
                return
            self.last_used.pop(key, None)
            name = key.partition("@")[0]
            self.unloads[name, reason] += 1
        if self.on_unload:
            self.on_unload(name, self.key_device(key), reason)

    def unload_idle(self, idle_s: float, keep: Collection[str]) -> list[str]:
        """Unload every engine unused for idle_s seconds, except those named in `keep` and the protected ones."""
        cutoff = time.monotonic() - idle_s
        with self.lock:
            idle = [k for k, t in self.last_used.items() if t < cutoff and k.partition("@")[0] not in keep
                    and k.partition("@")[0] not in self.protected]
        # never wait for a load in progress (the caller is the engine thread, between decode steps): the next check will do
        if not idle or not self.load_lock.acquire(blocking=False):
            return []
        try:
            for key in idle:
                self.unload(key, "idle")
                log.info("[DYNAMIC GRAPH] Unloaded %s: unused for %g s", key, idle_s)
        finally:
            self.load_lock.release()
        return idle

    def key_device(self, key: str) -> str:
        name, _, device = key.partition("@")
        return device or self.placement(self.manifest.engines[name])

    def resident_bytes(self, device: str) -> int:
        return self.resident_by_device().get(device, 0)

    def resident_by_device(self) -> dict[str, int]:
        with self.lock:
            keys = list(self.sessions)
        out: Counter[str] = Counter()
        for k in keys:
            out[self.key_device(k)] += self.manifest.engines[k.partition("@")[0]].bytes
        return dict(out)

    def load_stats(self) -> dict[str, dict]:
        with self.lock:
            return {name: {"loads": n, "load_seconds": round(sec, 6),
                           **{f"unloads_{r}": self.unloads[name, r] for r in UNLOAD_REASONS}} for name, (n, sec) in self.loads.items()}

    def loaded(self) -> list[str]:
        with self.lock:
            return list(self.sessions)

    def uncaptured_runs(self) -> int:
        """Captured runs that the resident sessions made uncaptured, for want of a capture during a load."""
        with self.lock:
            return sum(s.uncaptured for s in self.sessions.values())

    def check_files(self, record: EngineRecord) -> None:
        for f in record.files:
            path = self.existing(record, f)
            self.compare(record, f, path, sha256_file(path))

    def existing(self, record: EngineRecord, f: FileRecord) -> Path:
        path = self.directory / f.name
        if not path.is_file():
            raise EngineMismatch(f"engine {record.name}: {path} is missing (manifest expects sha256 {f.sha256})")
        return path

    @staticmethod
    def compare(record: EngineRecord, f: FileRecord, path: Path, found: str) -> None:
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


def host_buffer(size: int) -> np.ndarray:
    """`size` bytes of host memory, page-locked in place where CUDA is available (cudaHostRegister,
    undone when the buffer goes): for 2.3 GiB on the H200 host, 0.58 s against 2.20 s from torch's
    pinned allocator, and copied to the device at 55 GB/s against pageable memory's 6.9
    (scripts/host_copy_bench.py)."""
    data = np.empty(size, dtype=np.uint8)
    if torch.cuda.is_available() and size:
        cudart = torch.cuda.cudart()
        if int(cudart.cudaHostRegister(data.ctypes.data, size, 0)) == 0:  # cudaSuccess; otherwise it stays pageable
            weakref.finalize(data, cudart.cudaHostUnregister, data.ctypes.data)
    return data


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"

