"""An export's engine files, checked against its manifest: what a load reads before the backend
builds a session from it.

Verification hashes an engine's files (sha256, against the manifest) and hashes them again only
when they change: an unchanged file (same size, mtime and inode) reloads without a second hash.
With host copies, an engine's files are read once into host memory (pinned for a CUDA device, so
that the copy to the device is a DMA), hashed as they are read, and every later load of that
engine builds its session from there: an evicted engine comes back without touching the disk.
`prefetch` does that first read and hash ahead of the loads, on a background thread, so that even
a module's first load costs only its session's creation. The session cache is runtime/engines.py.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np
import torch

from contract.manifest import EngineRecord, FileRecord, Manifest
from model.files import sha256_file

log = logging.getLogger(__name__)


class EngineMismatch(RuntimeError):
    """An engine file or library differs from what the manifest recorded."""


class EngineFiles:
    """The files of the engines in `directory` against `manifest`. `verify`: hash them before a
    load; `host_copy(device) -> bool`: whether loads for that device read from host copies."""

    def __init__(self, directory: Path, manifest: Manifest, verify: bool, host_copy: Callable[[str], bool]):
        self.directory, self.manifest, self.verify, self.host_copy = directory, manifest, verify, host_copy
        self.host: dict[str, dict[str, object]] = {}  # engine -> file name -> contents, verified when read
        self.file_locks = {name: threading.Lock() for name in manifest.engines}  # one reader of an engine's files at a time
        self.verified: dict[str, tuple] = {}  # engine -> its files' stat when hashed: an unchanged one reloads without rehashing
        self.broken: dict[str, str] = {}  # engine -> why its last load failed verification (its paths are degraded)

    def read(self, record: EngineRecord, device: str) -> dict[str, object] | None:
        """What a load on `device` builds its session from: the host copy of the files (None: the
        files themselves, verified)."""
        if self.host_copy(device):
            return self.host_files(record)
        if self.verify:
            self.verify_files(record)
        return None

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

    def prefetch(self, names: Collection[str], device: Callable[[str], str]) -> threading.Thread | None:
        """Read the named engines as their loads would, on a background thread: into host memory
        where loads come from there, else hashed (`verify`) and so into the page cache; the disk and
        the hash off the request path. Returns the thread, or None with nothing to read. An engine
        whose files fail verification is left to its load, which reports it (and `broken`)."""
        to_host = {n: self.host_copy(device(n)) for n in names if n not in self.host}
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


def file_stamp(directory: Path, record: EngineRecord) -> tuple | None:
    """What changes when an engine's files are rewritten, replaced or deleted, short of hashing them."""
    try:
        return tuple((s.st_size, s.st_mtime_ns, s.st_ino) for s in ((directory / f.name).stat() for f in record.files))
    except OSError:
        return None


def host_buffer(size: int) -> np.ndarray:
    """`size` bytes of host memory, page-locked in place where CUDA is available (cudaHostRegister,
    undone when the buffer goes): quicker to make than a buffer of torch's pinned allocator, and copied
    to the device by DMA, several times faster than pageable memory (scripts/host_copy_bench.py
    measures both)."""
    data = np.empty(size, dtype=np.uint8)
    if torch.cuda.is_available() and size:
        cudart = torch.cuda.cudart()
        if int(cudart.cudaHostRegister(data.ctypes.data, size, 0)) == 0:  # cudaSuccess; otherwise it stays pageable
            weakref.finalize(data, cudart.cudaHostUnregister, data.ctypes.data)
    return data


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"

