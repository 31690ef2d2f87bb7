"""Modules on demand (dynamic mode, runtime.offload): what every text request needs stays resident;
the encoders, cross-attention blocks and deeper segments load on a background thread when a request
needs them, and unload when unused for `idle_unload_s` or, under `gpu_memory_budget_gb`, least
recently used first (runtime/engines.py evicts). The scheduler (runtime/generation.py) asks this
what a request is missing, starts its load and keeps decoding the others meanwhile, and between
steps lets it unload what went idle.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

from contract.exits import Exits
from contract.manifest import Manifest
from runtime.config import OffloadConfig
from runtime.engines import EngineSet, mib

log = logging.getLogger("dyngraph.runtime")


class BudgetTooSmall(ValueError):
    """A memory budget that cannot hold an engine some path needs; the message gives both numbers."""


class OnDemand:
    def __init__(self, engines: EngineSet, manifest: Manifest, exits: Exits, cfg: OffloadConfig, wake: Callable[[], None]):
        self.engines, self.manifest, self.cfg, self.wake = engines, manifest, cfg, wake
        self.base = tuple(manifest.path(exits.first, ["text"]).step)  # what every text request needs: always resident
        self.loader = ThreadPoolExecutor(1, thread_name_prefix="dyngraph-loader")

    def check_budget(self, mode_engines: list[str]) -> None:
        """A budget that cannot hold the largest engine some path needs is refused; one that cannot
        hold a whole path's engines at once is allowed, its requests reloading engines every step."""
        engines = self.manifest.engines
        for device, budget in self.engines.budget_bytes.items():
            here = [n for n in mode_engines if str(self.engines.device(n)) == device]
            if not here or not budget:
                continue
            largest = max(here, key=lambda n: engines[n].bytes)
            if engines[largest].bytes > budget:
                raise BudgetTooSmall(
                    f"runtime.offload.gpu_memory_budget_gb={budget / 2**30:.4g} ({mib(budget)} on {device}) is smaller than "
                    f"engine {largest} ({mib(engines[largest].bytes)}), which its paths need there: raise the budget or set it to 0")
            biggest = max((p for p in self.manifest.paths if not p.static),
                          key=lambda p: sum(engines[n].bytes for n in p.encode + p.step if n in here))
            need = sum(engines[n].bytes for n in biggest.encode + biggest.step if n in here)
            if need > budget:
                log.warning("[DYNAMIC GRAPH] path %s needs %s of engines on %s, over the %s budget: "
                            "its requests will reload engines at every step", biggest.name, mib(need), device, mib(budget))

    def announce(self) -> None:
        log.info("[DYNAMIC GRAPH] Modules on demand: %s resident; encoders, cross-attention and deeper segments load when "
                 "a request needs them and unload after %s s idle%s", ", ".join(self.base), self.cfg.idle_unload_s or "never",
                 "".join(f", budget {mib(b)} on {d}" for d, b in self.engines.budget_bytes.items() if b))

    def missing(self, names: Iterable[str]) -> list[str]:
        return [n for n in names if not self.engines.resident(n)]

    def load(self, names: list[str]) -> Future:
        """Make these engines resident on the loader thread (the engine set serialises loads); the
        scheduler is woken when they are."""
        future = self.loader.submit(self.load_now, names)
        future.add_done_callback(lambda _: self.wake())
        return future

    def load_now(self, names: list[str]) -> None:
        for name in names:
            self.engines.session(name)

    def protect(self, in_use: Iterable[str]) -> None:
        """Tell the engine set which engines the requests in flight use: budget eviction spares them while others can go."""
        self.engines.protected = set(self.base).union(in_use)

    def idle_wait(self) -> float | None:
        """How long the idle scheduler may sleep before an on-demand engine's idle time runs out."""
        if not self.cfg.idle_unload_s:
            return None
        with self.engines.lock:
            used = [t for k, t in self.engines.last_used.items() if k.partition("@")[0] not in self.base]
        return None if not used else max(0.05, min(used) + self.cfg.idle_unload_s - time.monotonic() + 0.01)

    def unload_idle(self) -> None:
        if self.cfg.idle_unload_s:
            self.engines.unload_idle(self.cfg.idle_unload_s, keep=self.base)

    def shutdown(self) -> None:
        self.loader.shutdown(wait=False, cancel_futures=True)
