"""The engines of one export, checked against its manifest and loaded on their devices on demand.

Sessions are keyed by engine name, or "name@device" for a replica on another device than the
placement's (the shared LM head beside a deep exit). With a memory budget, loading an engine
first evicts the least recently used ones of its device until its weights fit, sparing those in
use by requests in flight (`protected`) while others can go; `unload_idle` drops the on-demand
engines nobody used for a while. Each load is timed and reported (`on_load`), each unload too
(`on_unload`, with its reason: idle | budget), since on a GPU host they are what a slow request's
latency is made of. What a load reads (the files, verified, or their host copies, and `prefetch`,
their first read ahead of the loads) is runtime/files.py's `EngineFiles`.

Loads are serialised by `load_lock`, which a session that replays CUDA graphs also holds while it
captures one (a capture must see no allocation on the device from another thread: it is the
session's `capture_lock`); a load may run on a background thread while the engine thread decodes
with what is resident, and a session only tries the lock: a decode step never waits out a load.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection
from pathlib import Path

import torch

from contract.manifest import EngineRecord, Manifest
from exporters import EngineIncompatible, EngineSession, get_runtime
from runtime.files import EngineFiles, EngineMismatch, mib

log = logging.getLogger(__name__)

UNLOAD_REASONS = ("idle", "budget")
# what an allocation failure says, by library: torch's OutOfMemoryError, ONNX Runtime's BFCArena and CUDA's own
OUT_OF_MEMORY = ("out of memory", "failed to allocate", "cudaerrormemoryallocation")


class BudgetExceeded(MemoryError):
    """An engine that cannot be made resident under runtime.offload.gpu_memory_budget_gb: the request
    that needs it is answered 503 (the server cannot serve it now), never an out-of-memory crash."""


def out_of_memory(error: BaseException) -> bool:
    return isinstance(error, MemoryError) or any(s in str(error).lower() for s in OUT_OF_MEMORY)


def describe(record: EngineRecord) -> str:
    """What an engine is for, as the load log says it (from its graph and layers, not its name)."""
    kind = "segment" if record.graph.startswith("segment") else record.graph
    layers = f"layers {record.layers[0]}-{record.layers[1] - 1}" if record.layers else ""
    before = f"before layer {record.layers[0]}" if record.layers else ""  # a cross-attention block's record is (first, first)
    return {"vision": "ViT encoder for image processing", "audio": "audio encoder for audio processing",
            "cross_kv": f"cross-attention keys/values ({before}) for media", "cross_attn": f"cross-attention block ({before}) for media",
            "segment": f"decoder segment ({layers})", "embed": "token embedding", "lm_head": "LM head"}.get(kind, record.name)


def budget_setting(budget: int, device: str) -> str:
    return f"runtime.offload.gpu_memory_budget_gb={budget / 2**30:.4g} ({mib(budget)} on {device})"


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
        self.budget_bytes = budget_bytes or {}
        self.on_load, self.on_unload, self.announce = on_load, on_unload, announce
        self.cuda_graphs = set(cuda_graphs)
        self.sessions: OrderedDict[str, EngineSession] = OrderedDict()  # least recently used first
        self.last_used: dict[str, float] = {}  # key -> monotonic time of its last session() call
        self.protected: set[str] = set()  # engine names in use by requests in flight: evicted only when nothing else can go
        self.files = EngineFiles(self.directory, self.manifest, verify and self.backend.reads_files,
                                 host_copy if getattr(self.backend, "loads_from_memory", False) else lambda d: False)
        self.loads: dict[str, list] = {}  # engine -> [loads, seconds]
        self.unloads: Counter[tuple[str, str]] = Counter()  # (engine, reason) -> unloads
        self.lock = threading.Lock()  # the engine thread loads and evicts while HTTP handlers read `loaded`
        self.load_lock = threading.RLock()  # one load at a time (budget arithmetic), and none during a CUDA graph capture
        if self.files.verify:
            self.check_versions()

    @property
    def broken(self) -> dict[str, str]:
        """Engine -> why its last load failed verification (EngineFiles.broken)."""
        return self.files.broken

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
        host = self.files.read(record, device)
        self.make_room(device, record.bytes, key)
        try:
            session = self.load(record, device, host)
        except Exception as e:
            budget = self.budget_bytes.get(device)
            if not budget or not out_of_memory(e) or isinstance(e, BudgetExceeded):
                raise
            # what is resident stays within the budget, yet the device had no room left (a run in progress
            # holding an evicted engine, the KV caches, another process): this request cannot be served now
            raise BudgetExceeded(f"engine {key} ({mib(record.bytes)}) could not be made resident on {device} under "
                                 f"{budget_setting(budget, device)}, {mib(self.resident_bytes(device))} of engines resident: "
                                 f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}; "
                                 "retry later, or lower the budget to leave the device room for the rest") from e
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

    def prefetch(self) -> threading.Thread | None:
        """The first read (and hash) of every engine not loaded yet, on a background thread
        (EngineFiles.prefetch); returns the thread, or None with nothing to read."""
        loaded = {key.partition("@")[0] for key in self.loaded()}
        return self.files.prefetch([n for n in self.manifest.engines if n not in loaded], lambda n: str(self.device(n)))

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
            raise BudgetExceeded(f"engine {key} needs {mib(needed)}, more than the whole {budget_setting(budget, device)}: "
                                 "raise the budget or set it to 0")
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

    def run(self, name: str, feeds: dict[str, torch.Tensor], device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
        """One uncaptured run with session-allocated outputs (prefill, encoders)."""
        session = self.session(name, device)
        # tensors cross devices here, device to device (two-GPU placement), never through the host;
        # a CPU scalar (total_sequence_length) stays where the engine reads it
        return session.run({k: v if v.dim() == 0 else v.to(session.device, non_blocking=True).contiguous() for k, v in feeds.items()})


