"""What the bench measures from outside the server: GPU memory and energy through NVML, and the
server process's resident memory on the host.

NVML is opened only when the server runs on GPUs (`Nvml.open` is never called for a CPU
placement), so a CPU run never touches the driver and reports energy as unavailable rather than
inventing it. The bench process itself holds no CUDA context while the server runs: NVML needs
none, and a context of its own would show up in the device's memory.

Device numbering: the server's `cuda:N` is the N-th device it sees. The bench starts it with
CUDA_DEVICE_ORDER=PCI_BUS_ID, the order NVML enumerates in, and maps N through
CUDA_VISIBLE_DEVICES (indices or GPU-UUIDs) to the NVML device.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

NOT_AVAILABLE = 2**64 - 1  # NVML's NVML_VALUE_NOT_AVAILABLE for a process's memory


class NvmlUnavailable(RuntimeError):
    """NVML cannot be used here; the message says why (it goes into the report)."""


@dataclass
class GpuInfo:
    label: str  # the server's name for it: "cuda:0"
    nvml_index: int
    name: str
    uuid: str
    memory_total: int


def visible_devices(env: dict[str, str]) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES as a list of entries, or None when unset (every device, in order)."""
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    # CUDA stops at the first entry it cannot parse; an empty value hides every device
    return [e.strip() for e in value.split(",") if e.strip()]


class Nvml:
    """The GPUs a server sees, through nvidia-ml-py. Every call that can fail on a given GPU model
    (energy needs Volta or later, process lists need permissions) degrades to None for that value."""

    def __init__(self, pynvml, gpus: list[GpuInfo], handles: dict[str, object]):
        self.nvml, self.gpus, self.handles = pynvml, gpus, handles

    @classmethod
    def open(cls, env: dict[str, str] | None = None, pynvml=None) -> Nvml:
        """Every device the server can see, labelled as it labels them. Raises NvmlUnavailable."""
        env = dict(os.environ if env is None else env)
        if pynvml is None:
            try:
                import pynvml  # nvidia-ml-py
            except ImportError as e:
                raise NvmlUnavailable(f"nvidia-ml-py is not installed ({e})") from None
        try:
            pynvml.nvmlInit()
        except Exception as e:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
            raise NvmlUnavailable(f"NVML did not initialise: {e}") from None
        try:
            entries = visible_devices(env)
            if entries is None:
                entries = [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
            gpus, handles = [], {}
            for n, entry in enumerate(entries):
                if entry.startswith("MIG-"):
                    raise NvmlUnavailable(f"CUDA_VISIBLE_DEVICES names a MIG instance ({entry}): NVML has no energy counter per MIG instance")
                handle = pynvml.nvmlDeviceGetHandleByUUID(entry) if entry.startswith("GPU-") else pynvml.nvmlDeviceGetHandleByIndex(int(entry))
                label = f"cuda:{n}"
                gpus.append(GpuInfo(label, int(pynvml.nvmlDeviceGetIndex(handle)), text(pynvml.nvmlDeviceGetName(handle)),
                                    text(pynvml.nvmlDeviceGetUUID(handle)), int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)))
                handles[label] = handle
        except NvmlUnavailable:
            pynvml.nvmlShutdown()
            raise
        except Exception as e:
            pynvml.nvmlShutdown()
            raise NvmlUnavailable(f"NVML could not map CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES')!r}: {e}") from None
        if not gpus:
            pynvml.nvmlShutdown()
            raise NvmlUnavailable("NVML sees no GPU")
        return cls(pynvml, gpus, handles)

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except Exception:
            pass

    def info(self, label: str) -> GpuInfo:
        return next(g for g in self.gpus if g.label == label)

    def driver_version(self) -> str | None:
        try:
            return text(self.nvml.nvmlSystemGetDriverVersion())
        except Exception:
            return None

    def energy_mj(self, labels: list[str]) -> dict[str, int | None]:
        """Each GPU's total-energy counter in millijoules (since the driver loaded), None where unsupported."""
        out: dict[str, int | None] = {}
        for label in labels:
            try:
                out[label] = int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handles[label]))
            except Exception:
                out[label] = None
        return out

    def memory_used(self, labels: list[str]) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for label in labels:
            try:
                out[label] = int(self.nvml.nvmlDeviceGetMemoryInfo(self.handles[label]).used)
            except Exception:
                out[label] = None
        return out

    def process_memory(self, labels: list[str], pid: int) -> dict[str, int | None]:
        """Memory NVML attributes to `pid` per GPU; None where the driver does not list it (a PID
        namespace hides host pids from containers) or cannot say."""
        out: dict[str, int | None] = {}
        for label in labels:
            try:
                procs = self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handles[label])
            except Exception:
                out[label] = None
                continue
            used = [p.usedGpuMemory for p in procs if p.pid == pid]
            out[label] = int(used[0]) if used and used[0] is not None and used[0] != NOT_AVAILABLE else None
        return out


def text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def rss_bytes(pid: int) -> int | None:
    """Resident memory of a process from /proc (Linux); None elsewhere or once it has gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass
class MemoryPeaks:
    host_rss: int | None = None
    device_used: dict[str, int | None] = field(default_factory=dict)  # NVML: the whole device
    process_used: dict[str, int | None] = field(default_factory=dict)  # NVML: the server's process
    samples: int = 0


def peak(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


class Sampler:
    """A thread that polls memory every `interval_s` between start() and stop(): the peaks."""

    def __init__(self, pid: int, interval_s: float, nvml: Nvml | None = None, labels: list[str] | None = None):
        self.pid, self.interval_s, self.nvml, self.labels = pid, interval_s, nvml, labels or []
        self.peaks = MemoryPeaks()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.loop, name="bench-memory-sampler", daemon=True)

    def start(self) -> Sampler:
        self.sample()  # at least one sample, however short the run
        self.thread.start()
        return self

    def stop(self) -> MemoryPeaks:
        self.stopping.set()
        self.thread.join()
        self.sample()
        return self.peaks

    def loop(self) -> None:
        while not self.stopping.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        p = self.peaks
        p.host_rss = peak(p.host_rss, rss_bytes(self.pid))
        if self.nvml is not None and self.labels:
            for label, used in self.nvml.memory_used(self.labels).items():
                p.device_used[label] = peak(p.device_used.get(label), used)
            for label, used in self.nvml.process_memory(self.labels, self.pid).items():
                p.process_used[label] = peak(p.process_used.get(label), used)
        p.samples += 1


@dataclass
class EnergyReading:
    """Energy over a run from each GPU's counter; `joules` is None (with `reason`) when any GPU lacks one."""

    per_device_j: dict[str, float | None]
    joules: float | None
    reason: str | None = None


def energy_between(start: dict[str, int | None], end: dict[str, int | None]) -> EnergyReading:
    per_device = {k: (end[k] - start[k]) / 1e3 if start.get(k) is not None and end.get(k) is not None else None for k in end}
    if not per_device:
        return EnergyReading({}, None, "no GPU")
    missing = [k for k, v in per_device.items() if v is None]
    if missing:
        return EnergyReading(per_device, None, f"NVML has no total-energy counter on {', '.join(missing)}")
    return EnergyReading(per_device, sum(per_device.values()))
