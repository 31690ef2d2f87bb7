"""What the server reports about itself: Prometheus metrics (/metrics) and device memory (/stats).

Device memory is what torch allocated (the caches, hidden states and every engine output, which
torch allocates for ONNX Runtime) and what NVML sees in use on the whole GPU (engine weights
and ONNX Runtime's arena included). On the CPU torch keeps no allocation counters, so the
torch_* figures there are the bytes of the KV slots the runtime holds, the one allocation that
grows with load.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from functools import lru_cache

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)

LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, max_batch: int):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dyngraph_requests", "Chat completion requests, by HTTP status", ["status"], registry=r)
        self.latency = Histogram("dyngraph_request_latency_seconds", "Chat completion latency, arrival to last byte", buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("dyngraph_time_to_first_token_seconds", "Arrival to first generated token", buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("dyngraph_tokens", "Tokens processed", ["kind"], registry=r)  # prompt | completion
        self.path_requests = Counter("dyngraph_path_requests", "Requests per engine path", ["path"], registry=r)
        self.queue_depth = Gauge("dyngraph_queue_depth", "Requests waiting for a slot", registry=r)
        self.running = Gauge("dyngraph_running_requests", "Requests holding a slot (prefilling or decoding)", registry=r)
        self.decode_batch = Histogram("dyngraph_decode_batch_size", "Sequences per decode step",
                                      buckets=tuple(range(1, max_batch + 1)), registry=r)
        self.engine_loads = Counter("dyngraph_engine_loads", "Engine loads (offloading reloads count again)", ["engine", "device"], registry=r)
        self.engine_load_seconds = Histogram("dyngraph_engine_load_seconds", "Time to load one engine (verify or read, then build its session)",
                                             ["engine"], buckets=LOAD_BUCKETS, registry=r)
        self.engine_unloads = Counter("dyngraph_engine_unloads", "Engines unloaded by modules on demand", ["engine", "reason"], registry=r)  # idle | budget
        self.rate_limited = Counter("dyngraph_rate_limited", "Chat completions refused by the per-client rate limit (429), "
                                    "by how the client was told apart", ["client"], registry=r)  # key | address
        self.speculation = Counter("dyngraph_speculation", "Self-speculation per path: tokens drafted, drafts accepted, "
                                   "verifications, tokens they yielded", ["path", "kind"], registry=r)  # drafted | accepted | verifications | tokens
        self.prefix_tokens = Counter("dyngraph_prefix_cache_tokens", "Prompt tokens by where their keys/values came from: "
                                     "the prefix cache or a prefill", ["kind"], registry=r)  # cached | prefilled
        self.ttft_parts = Histogram("dyngraph_time_to_first_token_part_seconds", "Where the time to first token went, by part "
                                    "(the request timeline's: parse, grammar, tokenize, media, queue, load, encode, embed, "
                                    "segment.K, head, sample, deliver, write)", ["part"], buckets=LOAD_BUCKETS, registry=r)
        self.client_timeouts = Counter("dyngraph_client_timeouts", "Connections cut off for sending their request too slowly (408)",
                                       ["phase"], registry=r)  # headers | body

    def watch_memory(self, source: Callable[[], Mapping[str, Mapping[str, int | None]]]) -> None:
        """Expose `source()` (device -> {figure: bytes}) as dyngraph_device_memory_bytes{device, kind} at each scrape."""
        self.registry.register(MemoryCollector(source))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MemoryCollector:
    def __init__(self, source: Callable[[], Mapping[str, Mapping[str, int | None]]]):
        self.source = source

    def collect(self):
        family = GaugeMetricFamily("dyngraph_device_memory_bytes", "Device memory by device and kind", labels=["device", "kind"])
        for device, figures in self.source().items():
            for kind, value in figures.items():
                if value is not None:
                    family.add_metric([device, kind.removesuffix("_bytes")], value)
        yield family


def device_memory(devices: list[str], kv_bytes: Mapping[str, int], kv_peak: Mapping[str, int]) -> dict[str, dict[str, int | None]]:
    out = {}
    for name in dict.fromkeys(devices):
        device = torch.device(name)
        if device.type == "cuda":
            out[name] = {"torch_allocated_bytes": torch.cuda.memory_allocated(device),
                         "torch_peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
                         "nvml_used_bytes": nvml_used_bytes(device.index or 0)}
        else:
            out[name] = {"torch_allocated_bytes": kv_bytes.get(name, 0), "torch_peak_allocated_bytes": kv_peak.get(name, 0),
                         "nvml_used_bytes": None}
    return out


def reset_peaks(devices: list[str]) -> None:
    for name in dict.fromkeys(devices):
        if torch.device(name).type == "cuda":
            torch.cuda.reset_peak_memory_stats(torch.device(name))


@lru_cache(maxsize=None)
def nvml_handle(index: int):
    """NVML's handle of torch's cuda:index, matched by UUID: the two number GPUs differently under CUDA_VISIBLE_DEVICES."""
    import pynvml

    pynvml.nvmlInit()
    uuid = str(torch.cuda.get_device_properties(index).uuid)
    return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")


def nvml_used_bytes(index: int) -> int | None:
    try:
        import pynvml

        return int(pynvml.nvmlDeviceGetMemoryInfo(nvml_handle(index)).used)
    except Exception as e:  # noqa: BLE001 - no driver, no NVML, a MIG slice: the figure is just unknown
        log.debug("NVML memory of cuda:%d unavailable: %s", index, e)
        return None
