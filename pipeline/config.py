"""Typed schemas of the Hydra configs, registered in Hydra's ConfigStore.

The YAML files under conf/ fill these in; an override of a field that does not exist, or of
the wrong type, is refused by Hydra before any work starts. Entry points turn the composed
DictConfig into these dataclasses with OmegaConf.to_object, and library code only sees them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from model.autoglm import ModelConfig


@dataclass
class TensorRTSettings:
    workspace_gb: float = 8.0  # builder scratch memory limit
    optimization_level: int = 3  # 0..5: higher builds longer for faster kernels
    version_compatible: bool = False  # engines that load on later TensorRT versions
    strongly_typed: bool = True  # take the precisions the ONNX carries
    int8: bool = False
    timing_cache: str = "timing.cache"  # kept beside the engines, reused across builds


@dataclass
class ExportConfig:
    backend: str = "onnx"
    dtype: str = "fp32"  # fp32 | fp16 | bf16
    device: str = "cpu"  # where the model is built, traced and validated: cpu | cuda
    opset: int = 18
    max_batch: int = 8
    max_seq: int = 512  # new tokens per forward (prompt chunk)
    max_context: int = 2048  # cached tokens
    static: bool = True  # also export the static (full-model) baseline
    # validation fails past max|engine - eager| / max|eager| for the export dtype; fp16 measured on
    # phone-9b (H100): ~3e-3 through a 6-layer segment, 1.7e-2 through the 24-layer static graph
    tolerance: dict[str, float] = field(default_factory=lambda: {"fp32": 1e-4, "fp16": 3e-2, "bf16": 8e-2})
    progress: bool = True
    tensorrt: TensorRTSettings = field(default_factory=TensorRTSettings)


@dataclass
class ExportApp:
    model: ModelConfig = field(default_factory=ModelConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    engines_dir: str = "engines"


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="export", name="export_schema", node=ExportConfig)
    cs.store(name="export_app_schema", node=ExportApp)
    cs.store(group="bench", name="bench_schema", node=BenchConfig)
    cs.store(name="bench_app_schema", node=BenchApp)


# --- python -m pipeline bench / compare ---------------------------------------------------------


@dataclass
class RequestGroup:
    """One kind of request in a workload: `count` requests cycling through `prompts`."""

    count: int = 1
    max_tokens: int = 32
    modalities: list[str] = field(default_factory=lambda: ["text"])  # "text", plus "image" and/or "audio"
    prompts: list[str] = field(default_factory=lambda: ["你是谁?"])
    image_size: int = 448  # side of the synthetic chart in pixels; the server resizes to the encoder's input
    audio_seconds: list[float] = field(default_factory=lambda: [3.0])  # synthetic WAV lengths, cycled


@dataclass
class TransformersBaseline:
    """The text requests through transformers' eager GlmForCausalLM.generate on the same decoder weights."""

    enabled: bool = True
    max_requests: int = 8  # the first N text requests of the workload, one at a time
    attn_implementation: str = "sdpa"  # transformers' default for GLM; "eager" for its pure-python attention
    workdir: str | None = None  # where the temporary GLM checkpoint goes (phone-9b: 17 GB); default the system temp dir


@dataclass
class RooflineSettings:
    enabled: bool = True
    copy_mib: int = 1024  # buffer copied device to device to measure the bandwidth (read + write)
    iters: int = 20


@dataclass
class BenchConfig:
    name: str = "default"
    seed: int = 0  # the synthetic media and the arrival times derive from it
    groups: dict[str, RequestGroup] = field(default_factory=dict)
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16])
    request_rate: float | None = None  # mean arrivals per second (Poisson); null: each slot sends as soon as it is free
    modes: list[str] = field(default_factory=lambda: ["static", "dynamic"])
    warmup: bool = True  # one unmeasured request per group before each mode's runs
    temperature: float = 0.0  # greedy, so that both modes generate comparable lengths
    request_timeout_s: float = 600.0
    sample_interval_s: float = 0.05  # memory sampling period (NVML, server RSS)
    transformers: TransformersBaseline = field(default_factory=TransformersBaseline)
    roofline: RooflineSettings = field(default_factory=RooflineSettings)


@dataclass
class ServerLaunch:
    """How the bench starts `python -m runtime.serve` for each mode."""

    runtime: str = "cpu"  # placement group of conf/runtime: cpu | one_gpu | two_gpu
    cluster: str = "local"  # conf/cluster: local (one process) | ray (Ray Serve replicas)
    replicas: int = 1  # with cluster=ray: replicas of the engine chain (cluster.num_replicas)
    port: int = 0  # 0: a free port
    args: list[str] = field(default_factory=list)  # further overrides for runtime.serve, e.g. ["runtime.max_batch_size=16"]
    startup_timeout_s: float = 900.0  # phone-9b's engines take minutes to load


@dataclass
class CompareConfig:
    """`python -m pipeline compare BASE.json NEW.json`: what to compare and how much change is allowed."""

    base: str = ""
    new: str = ""
    kinds: list[str] = field(default_factory=lambda: ["exits", "work", "memory", "time", "energy", "errors"])
    # metric name or glob -> allowed change: a fraction of the base value, or share points for
    # metrics whose report entry says "absolute"; the longest matching pattern wins
    tolerances: dict[str, float] = field(default_factory=dict)


@dataclass
class BenchApp:
    model: ModelConfig = field(default_factory=ModelConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    server: ServerLaunch = field(default_factory=ServerLaunch)
    compare: CompareConfig = field(default_factory=CompareConfig)
    engines_dir: str = "engines"
    output_dir: str = "bench_results"
    run_name: str | None = None  # report folder name; default <date>-<device>-<model>-<backend>
    progress: bool = True
