"""The runtime as the chat service sees it: one small interface over the engines and the scheduler.

serving/chat.py translates OpenAI requests into GenerationRequests and events into responses; it
reaches the runtime only through `LocalEngine` (the `EngineClient` protocol it declares), so that
another runtime (a remote engine, a replica set) can stand behind the same service.
"""
from __future__ import annotations

import asyncio

from runtime.engines import EngineSet
from runtime.generation import GenerationEngine
from runtime.requests import GenerationRequest, RequestHandle
from runtime.metrics import device_memory, reset_peaks


class LocalEngine:
    """The engine thread of this process and the engine files it runs."""

    def __init__(self, engines: EngineSet, engine: GenerationEngine):
        self.engines, self.engine = engines, engine
        self.backend = engines.backend.name
        self.mode = engine.mode
        self.exit_layers = list(engine.exits.layers)
        self.context_len = engine.context_len
        self.max_media_tokens = engine.max_media_tokens
        self.think_end = engine.think_end  # None: the tokenizer has no thinking block
        self.request_override = engine.cfg.policy.request_override  # may a request choose its exit
        self.max_batch_size = engine.cfg.max_batch_size
        self.model_config = engines.manifest.model["config"]

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()

    def alive(self) -> bool:
        return self.engine.thread.is_alive()

    # --- requests ------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> RequestHandle:
        return self.engine.submit(request, loop)

    def cancel(self, handle: RequestHandle) -> None:
        self.engine.cancel(handle)

    @property
    def queue_depth(self) -> int:
        return self.engine.queue_depth

    # --- state ---------------------------------------------------------------------------------

    def memory(self) -> dict:
        out = device_memory(self.engine.placement.devices, self.engine.kv_bytes, self.engine.kv_peak)
        prefix = self.engine.stepper.prefix
        for device, used in (prefix.bytes_used() if prefix else {}).items():
            out[device]["prefix_cache_bytes"] = used
        return out

    def stats(self) -> dict:
        e = self.engine
        return {"engines_loaded": self.engines.loaded(), "devices": self.memory(),
                "requests_per_path": dict(e.path_counts), "mode": self.mode,
                "speculation": {path: dict(c) for path, c in e.speculation_counts.items()},
                "on_demand": e.on_demand is not None, "engine_loads": self.engines.load_stats(),
                "resident_engine_bytes": {d: 0 for d in e.placement.devices} | self.engines.resident_by_device(),
                "kv_cache": {"allocated_bytes": dict(e.kv_bytes), "allocated_peak_bytes": dict(e.kv_peak),
                             "in_use_bytes": dict(e.kv_in_use), "in_use_peak_bytes": dict(e.kv_in_use_peak),
                             "per_request_bytes": e.kv_per_request()},
                "prefix_cache": e.prefix_stats()}

    def reset_peaks(self) -> None:
        reset_peaks(self.engine.placement.devices)
        self.engine.reset_peaks()

    def degraded(self) -> dict[str, str]:
        """The paths of this mode that cannot run now, each with the reason: an engine whose file
        failed verification when it was (re)loaded after start-up (the others keep serving)."""
        broken = self.engines.broken
        if not broken:
            return {}
        out = {}
        for path in self.engine.mode_paths():
            bad = next((broken[n] for n in path.encode + path.step if n in broken), None)
            if bad:
                out[path.name] = bad
        return out
