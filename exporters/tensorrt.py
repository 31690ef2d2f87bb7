"""TensorRT backend: the ONNX export parsed into TensorRT engines, run on torch's tensors and streams.

Build: each engine's ONNX file comes from the ONNX backend (same trace, same weights), TensorRT
parses it and builds one serialized engine with an optimisation profile per phase: prefill
(seq in [2, max_seq]) and decode (seq = 1), both derived from the Dims that contract/engines.py
declares; engines without a `seq` axis get one profile. A timing cache beside the engines makes
rebuilds fast. Run: `TrtSession` binds torch tensors by name and enqueues on torch's current
stream of the engine's device, so a path's engines hand tensors to each other on the device.

TensorRT is imported only when this backend is asked for: without it, constructing the exporter
raises BackendUnavailable with one line saying how to install it. Written against the TensorRT
10 Python API (docs/tensorrt.md lists the calls and where each was checked); the build path has
not been run in this repository's CI nor on our GPU host, neither of which has TensorRT.
"""
from __future__ import annotations

from dataclasses import replace

import logging
import os
import re
import tempfile
from collections import deque
from pathlib import Path

import onnx
import onnxscript
import torch

from exporters import BackendUnavailable, EngineIncompatible, device_stream
from contract.config import ExportConfig
from contract.engines import Dim, EngineSpec, TensorSpec, bind_sizes, concrete_shape
from contract.manifest import write_atomic

log = logging.getLogger(__name__)

SEQ = "seq"  # the axis that separates the prefill and decode profiles
INSTALL_HINT = ("install it on a CUDA machine from NVIDIA's index: "
                "pip install 'tensorrt-cu12>=10,<11' --extra-index-url https://pypi.nvidia.com "
                "(or unpack the TensorRT tarball and pip install python/tensorrt-*.whl); see docs/tensorrt.md")

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


class EngineLoadError(EngineIncompatible):
    """An engine file that cannot run here; the message names the file and both environments."""


def import_tensorrt():
    try:
        import tensorrt
    except (ImportError, OSError) as e:  # OSError: bindings present, libnvinfer missing
        raise BackendUnavailable(f"the tensorrt backend needs TensorRT, which is not importable here ({e}); {INSTALL_HINT}") from None
    return tensorrt


def compute_capability(device: str | torch.device) -> str:
    device = torch.device(device)
    major, minor = torch.cuda.get_device_capability(device.index or 0)
    return f"sm_{major}{minor}"


# --- optimisation profiles from the declared Dims --------------------------------------------


def axis_names(entry: int | str) -> set[str]:
    """The Dim names a shape entry uses: "past+seq" -> {"past", "seq"}."""
    return set(re.findall(r"[A-Za-z_]\w*", entry)) if isinstance(entry, str) else set()


def dim_range(d: Dim) -> tuple[int, int, int]:
    """(min, opt, max) of a Dim, kept on its multiples (audio frames come in whole blocks)."""
    m = d.multiple
    lo, hi = -(-d.min // m) * m, d.max // m * m
    opt = min(hi, max(lo, round(d.opt / m) * m))
    return lo, opt, hi


def phase_sizes(dims: dict[str, Dim], uses_seq: bool) -> list[tuple[str, dict[str, int], dict[str, int], dict[str, int]]]:
    """(phase, min sizes, opt sizes, max sizes) for each profile an engine needs."""
    ranges = {name: dim_range(d) for name, d in dims.items()}
    lo, opt, hi = ({n: r[i] for n, r in ranges.items()} for i in range(3))
    if not uses_seq or SEQ not in dims:
        return [("all", lo, opt, hi)]
    s_lo, s_opt, s_hi = ranges[SEQ]
    phases = []
    if s_hi >= 2:  # prefill: every chunk of two tokens or more
        p_lo = max(2, s_lo)
        phases.append(("prefill", {**lo, SEQ: p_lo}, {**opt, SEQ: max(p_lo, s_opt)}, {**hi, SEQ: s_hi}))
    if s_lo <= 1 <= s_hi:  # decode: one token per sequence
        phases.append(("decode", {**lo, SEQ: 1}, {**opt, SEQ: 1}, {**hi, SEQ: 1}))
    return phases


def profiles(spec: EngineSpec, dims: dict[str, Dim]) -> list[Profile]:
    """One TensorRT optimisation profile per phase: [prefill, decode] for engines with a `seq`
    axis, a single one otherwise. Shapes follow the spec's inputs, with fixed axes as declared."""
    uses_seq = any(SEQ in axis_names(e) for t in spec.inputs for e in t.shape)
    return [{t.name: (concrete_shape(t, lo), concrete_shape(t, opt), concrete_shape(t, hi)) for t in spec.inputs}
            for _, lo, opt, hi in phase_sizes(dims, uses_seq)]


def select_profile(engine_profiles: list[Profile], shapes: dict[str, Shape]) -> int | None:
    """The first profile whose ranges hold every input shape (decode is the only one that holds seq = 1)."""
    for index, profile in enumerate(engine_profiles):
        if all(name in shapes and len(shapes[name]) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shapes[name], hi))
               for name, (lo, _, hi) in profile.items()):
            return index
    return None


# --- compatibility of an engine file with this machine -----------------------------------------


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:4])


def built_for(backend: dict | None) -> dict | None:
    """What an engine was built with, from the manifest's backend record ({"settings", "versions"})."""
    if not backend:
        return None
    settings, versions = backend.get("settings", {}), backend.get("versions", {})
    return {"tensorrt": versions.get("tensorrt"), "compute_capability": settings.get("compute_capability"),
            "version_compatible": bool(settings.get("tensorrt", {}).get("version_compatible", False))}


def describe(env: dict | None) -> str:
    if not env:
        return "an unrecorded TensorRT version and compute capability"
    return f"TensorRT {env.get('tensorrt') or '?'} on {env.get('compute_capability') or '?'}"


def check_compatible(path: Path, built: dict | None, found: dict) -> None:
    """Refuse an engine built for another GPU architecture or TensorRT version before TensorRT
    tries it. Version-compatible engines load on the same or a later TensorRT."""
    if not built:
        return
    reasons = []
    if built.get("compute_capability") and built["compute_capability"] != found["compute_capability"]:
        reasons.append("the GPU architecture differs")
    if built.get("tensorrt"):
        b, f = version_tuple(built["tensorrt"]), version_tuple(found["tensorrt"])
        if built.get("version_compatible") and f < b:
            reasons.append("version-compatible engines need the same or a later TensorRT")
        elif not built.get("version_compatible") and b != f:
            reasons.append("engines load only on the TensorRT version that built them (export.tensorrt.version_compatible=true lifts this)")
    if reasons:
        raise EngineLoadError(f"cannot load TensorRT engine {path}: built with {describe(built)}, found {describe(found)} "
                              f"here; {'; '.join(reasons)}: export again on this machine")


# --- logging ------------------------------------------------------------------------------------

_LOGGER = None


def trt_logger(trt):
    """One logger for the process, alive as long as anything made through it (TensorRT's rule for
    the logger given to a Builder or Runtime); it forwards to Python logging and remembers recent
    errors for our own messages."""
    global _LOGGER
    if _LOGGER is None:
        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.errors: deque[str] = deque(maxlen=8)

            def log(self, severity, msg):
                if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                    self.errors.append(msg)
                    log.error("TensorRT: %s", msg)
                elif severity == trt.ILogger.WARNING:
                    log.warning("TensorRT: %s", msg)
                else:
                    log.debug("TensorRT: %s", msg)

        _LOGGER = Logger()
    return _LOGGER


def last_error(logger) -> str:
    errors = list(getattr(logger, "errors", ()))
    return errors[-1] if errors else "TensorRT logged no error"


# --- the exporter -------------------------------------------------------------------------------


class TensorRTExporter:
    name = "tensorrt"
    artifacts = ("*.engine",)
    sources = ("exporters/tensorrt.py", "exporters/onnx.py")  # it builds from the ONNX backend's traces
    quantizations = ()  # MatMulNBits is an ONNX Runtime contrib op; export.tensorrt.int8 needs Q/DQ scales this export does not write

    def __init__(self, cfg: ExportConfig):
        self.cfg = cfg
        self.trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise BackendUnavailable("the tensorrt backend needs a CUDA GPU and torch sees none")
        t = cfg.tensorrt
        if t.int8 and t.strongly_typed:
            raise BackendUnavailable("export.tensorrt.int8=true needs export.tensorrt.strongly_typed=false: a strongly typed "
                                     "network takes INT8 only from Q/DQ nodes in the ONNX, which this export does not write")
        if not t.strongly_typed and not hasattr(self.trt.BuilderFlag, "FP16"):
            raise BackendUnavailable(f"TensorRT {self.trt.__version__} builds strongly typed networks only: "
                                     "set export.tensorrt.strongly_typed=true")
        device = torch.device(cfg.device)
        self.build_device = device if device.type == "cuda" else torch.device("cuda", 0)
        self.compute_capability = compute_capability(self.build_device)

    def versions(self) -> dict[str, str]:
        return {"tensorrt": self.trt.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
                "onnxscript": onnxscript.__version__}

    def settings(self) -> dict:
        t = self.cfg.tensorrt
        return {"dtype": self.cfg.dtype, "opset": self.cfg.opset, "device": "cuda",
                "compute_capability": self.compute_capability,
                # the timing cache's path changes build time, not what the engines compute
                "tensorrt": {"workspace_gb": t.workspace_gb, "optimization_level": t.optimization_level,
                             "version_compatible": t.version_compatible, "strongly_typed": t.strongly_typed, "int8": t.int8}}

    def engine_files(self, stem: str) -> list[str]:
        return [f"{stem}.engine"]

    def check_export(self) -> None:
        """Engines are validated where they run: refuse a CPU export before anything is traced."""
        if torch.device(self.cfg.device).type != "cuda":
            raise BackendUnavailable(f"the tensorrt backend builds and validates on a CUDA GPU: "
                                     f"use export.device=cuda, not {self.cfg.device}")

    def timing_cache_path(self, engines_dir: Path) -> Path:
        """Beside the engines, unless configured as an absolute path."""
        return engines_dir / Path(self.cfg.tensorrt.timing_cache).expanduser()

    def build(self, specs: list[EngineSpec], dims: dict[str, Dim], stems: list[Path], engines_dir: Path | None = None) -> None:
        from exporters.onnx import OnnxExporter

        self.check_export()
        cache_path = self.timing_cache_path(engines_dir or stems[0].parent)
        with tempfile.TemporaryDirectory(dir=stems[0].parent, prefix="onnx-") as tmp:
            onnx_stems = [Path(tmp) / stem.name for stem in stems]
            # one trace for the group, weights swapped per engine; a segment is traced from its eager module
            # (the same inputs and outputs): the parser has no GroupQueryAttention
            OnnxExporter(self.cfg).build([replace(s, fused=False) for s in specs], dims, onnx_stems)
            with torch.cuda.device(self.build_device):
                timing_cache = None
                for spec, stem, onnx_stem in zip(specs, stems, onnx_stems):
                    timing_cache = self.build_engine(spec, dims, Path(f"{onnx_stem}.onnx"), Path(f"{stem}.engine"),
                                                     cache_path, timing_cache)
                    for f in (Path(f"{onnx_stem}.onnx"), Path(f"{onnx_stem}.onnx.data")):
                        f.unlink(missing_ok=True)

    def build_engine(self, spec: EngineSpec, dims: dict[str, Dim], onnx_path: Path, engine_path: Path,
                     cache_path: Path, timing_cache):
        trt, t = self.trt, self.cfg.tensorrt
        logger = trt_logger(trt)
        builder = trt.Builder(logger)
        strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        flags = 1 << int(strongly_typed) if t.strongly_typed and strongly_typed is not None else 0
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):  # from the file: resolves external weights beside it
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse the ONNX of engine {spec.name}: {errors}")

        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(t.workspace_gb * (1 << 30)))
        config.builder_optimization_level = t.optimization_level
        if t.version_compatible:
            config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        if not t.strongly_typed:  # weakly typed: allow lower precisions by flag (deprecated in TensorRT 10.12)
            precision = {"fp16": "FP16", "bf16": "BF16"}.get(self.cfg.dtype)
            if precision:
                config.set_flag(getattr(trt.BuilderFlag, precision))
            if t.int8:
                config.set_flag(trt.BuilderFlag.INT8)

        network_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
        for index, profile_shapes in enumerate(profiles(spec, dims)):
            profile = builder.create_optimization_profile()
            for name, (lo, opt, hi) in profile_shapes.items():
                if name in network_inputs:  # the exporter may drop an input the graph does not read
                    profile.set_shape(name, lo, opt, hi)
            if config.add_optimization_profile(profile) < 0:
                raise RuntimeError(f"TensorRT refused optimisation profile {index} of engine {spec.name}: {profile_shapes}")

        timing_cache = self.attach_timing_cache(config, cache_path, timing_cache)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise RuntimeError(f"TensorRT could not build engine {spec.name}: {last_error(logger)}")
        with open(engine_path, "wb") as f:
            f.write(plan)
            f.flush()
            os.fsync(f.fileno())
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cache_path, bytes(config.get_timing_cache().serialize()))  # saved after each engine
        return timing_cache

    def attach_timing_cache(self, config, cache_path: Path, cache):
        """Reuse the cache across the engines of a build and across builds; one from another GPU or
        TensorRT version is replaced by an empty one rather than trusted."""
        if cache is None:
            blob = cache_path.read_bytes() if cache_path.is_file() else b""
            try:
                cache = config.create_timing_cache(blob)
            except Exception as e:  # a truncated or foreign file
                log.warning("ignoring TensorRT timing cache %s: %s", cache_path, e)
                cache = None
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            log.warning("TensorRT timing cache %s does not match this GPU or TensorRT version; starting a new one", cache_path)
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, ignore_mismatch=False)
        return cache

    def load(self, path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], device: str) -> "TrtSession":
        """This exporter's own build, for the export stage's validation."""
        return TrtSession(path, inputs, outputs, device, {"settings": self.settings(), "versions": self.versions()})


# --- the runtime --------------------------------------------------------------------------------


class TensorRTRuntime:
    """The run side (exporters.get_runtime("tensorrt")): TensorRT is imported when it is made."""

    name = "tensorrt"
    cuda_graphs = False  # decode steps enqueue the engines uncaptured (no CUDA graph capture here yet)
    reads_files = True

    def __init__(self):
        self.trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise BackendUnavailable("TensorRT engines run on a CUDA GPU and torch sees none")

    def check_devices(self, dtype: str, devices: list[str]) -> None:
        pass  # every dtype it builds runs on the GPUs it was built for (check_runtime checks the compute capability)

    def check_runtime(self, backend: dict, directory: Path) -> None:
        found = {"tensorrt": self.trt.__version__, "compute_capability": compute_capability("cuda:0")}
        check_compatible(directory, built_for(backend), found)

    def load(self, path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], device: str,
             built_with: dict | None = None, capture_lock=None) -> "TrtSession":
        return TrtSession(path, inputs, outputs, device, built_with)


def torch_dtypes(trt) -> dict:
    return {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
            trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool,
            trt.DataType.INT8: torch.int8, trt.DataType.UINT8: torch.uint8}


class TrtSession:
    """A deserialized engine that reads and writes torch tensors in place.

    Inputs are bound by name where they lie; outputs are allocated by torch on the engine's
    device at the shapes the manifest declares (checked against TensorRT's own shape inference);
    an output declared in place of an input (a segment's cache) is written to a scratch buffer and
    copied into the input after the engine, on its stream: a traced engine reads the past while it
    writes the present, and only a KV-cache plugin may share one buffer (not built here);
    the engine is enqueued on torch's current stream of that device, ordered with whatever torch
    does around the call. `built_with` is the manifest's backend record: with it, an engine built
    for another GPU or TensorRT version is refused with both environments named.
    """

    uncaptured = 0  # it captures nothing: a captured run is a run like any other

    def __init__(self, path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], device: str = "cuda",
                 built_with: dict | None = None):
        trt = import_tensorrt()
        self.path, self.inputs, self.outputs = Path(path), inputs, outputs
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise EngineLoadError(f"cannot load TensorRT engine {path} on {device}: TensorRT engines run on a CUDA device")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        built = built_for(built_with)
        found = {"tensorrt": trt.__version__, "compute_capability": compute_capability(self.device)}
        check_compatible(self.path, built, found)

        logger = trt_logger(trt)
        with torch.cuda.device(self.device):
            self.runtime = trt.Runtime(logger)
            if built and built.get("version_compatible"):
                self.runtime.engine_host_code_allowed = True  # version-compatible plans carry a lean runtime
            logger.errors.clear()
            self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is None:
                raise EngineLoadError(f"TensorRT could not deserialize {path}: built with {describe(built)}, found "
                                      f"{describe(found)} here ({last_error(logger)})")
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise EngineLoadError(f"TensorRT could not create an execution context for {path}: {last_error(logger)}")

        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        output_names = {n for n in names if n not in self.input_names}
        declared_in, declared_out = {t.name for t in inputs}, {t.name for t in outputs}
        if not set(self.input_names) <= declared_in or output_names != declared_out:
            raise EngineLoadError(f"{path} has inputs {sorted(self.input_names)} and outputs {sorted(output_names)}; "
                                  f"the manifest declares {sorted(declared_in)} and {sorted(declared_out)}")
        dtypes = torch_dtypes(trt)
        self.dtypes = {n: dtypes[self.engine.get_tensor_dtype(n)] for n in names}
        self.profiles: list[Profile] = [
            {n: tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(n, i)) for n in self.input_names}
            for i in range(self.engine.num_optimization_profiles)]
        self.active_profile = 0  # a new context starts on profile 0
        # TensorRT wants a valid address even for an empty tensor (an empty KV cache at the first step)
        self.scratch = torch.empty(256, dtype=torch.uint8, device=self.device)

    def address(self, t: torch.Tensor) -> int:
        return t.data_ptr() if t.numel() else self.scratch.data_ptr()

    def needs_capture(self, batch: int) -> bool:
        return False

    def run(self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor] | None = None,
            captured: bool = False) -> dict[str, torch.Tensor]:
        """Outputs named in `outputs` are written into the caller's tensors (a decode step's
        buffers), the others into fresh ones; `captured` changes nothing (no CUDA graph capture)."""
        shapes = {name: tuple(t.shape) for name, t in feeds.items()}
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise KeyError(f"{self.path.name}: missing inputs {missing}")
        profile = select_profile(self.profiles, shapes)
        if profile is None:
            raise ValueError(f"{self.path.name}: input shapes {shapes} fit none of the engine's optimisation profiles {self.profiles}")
        engine_stream = device_stream(self.device)
        caller = torch.cuda.current_stream(self.device)
        engine_stream.wait_stream(caller)  # inputs written by the caller's stream are ready
        with torch.cuda.device(self.device):
            stream = engine_stream.cuda_stream
            if profile != self.active_profile:
                if not self.context.set_optimization_profile_async(profile, stream):
                    raise RuntimeError(f"{self.path.name}: TensorRT could not switch to optimisation profile {profile}")
                self.active_profile = profile
            bound = []  # contiguous copies live until enqueued; torch reuses their memory only for later work on this stream
            for name in self.input_names:
                t = feeds[name]
                if t.device != self.device or t.dtype != self.dtypes[name]:
                    raise TypeError(f"{self.path.name}: input {name} is {t.dtype} on {t.device}, "
                                    f"the engine takes {self.dtypes[name]} on {self.device}")
                t = t.contiguous()
                bound.append(t)
                if not self.context.set_input_shape(name, tuple(t.shape)):
                    raise ValueError(f"{self.path.name}: TensorRT refused shape {tuple(t.shape)} for input {name}")
                self.context.set_tensor_address(name, self.address(t))
            sizes = bind_sizes(self.inputs, shapes)
            results = {}
            for spec in self.outputs:
                shape = concrete_shape(spec, sizes)
                inferred = tuple(self.context.get_tensor_shape(spec.name))
                if inferred != shape:
                    raise RuntimeError(f"{self.path.name}: output {spec.name} has shape {inferred} in TensorRT, "
                                       f"the manifest gives {shape}")
                out = (outputs or {}).get(spec.name) if not spec.inplace_of else None
                if out is not None and (tuple(out.shape) != shape or out.dtype != self.dtypes[spec.name] or not out.is_contiguous()):
                    raise ValueError(f"{self.path.name}: output buffer {spec.name} is {tuple(out.shape)} {out.dtype}, "
                                     f"the engine writes a contiguous {shape} {self.dtypes[spec.name]}")
                if out is None:
                    out = torch.empty(shape, dtype=self.dtypes[spec.name], device=self.device)
                self.context.set_tensor_address(spec.name, self.address(out))
                results[spec.name] = out
            if not self.context.execute_async_v3(stream):
                raise RuntimeError(f"{self.path.name}: TensorRT could not enqueue the engine")
            with torch.cuda.stream(engine_stream):
                for spec in self.outputs:
                    if spec.inplace_of:
                        results[spec.name] = feeds[spec.inplace_of].copy_(results[spec.name])
        caller.wait_stream(engine_stream)  # outputs are ready for whatever the caller queues next
        return results
