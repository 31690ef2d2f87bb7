"""The tensorrt backend without TensorRT: optimisation profiles from the declared Dims, cache keys,
the version and compute-capability checks, the calls the builder makes (against a recording stand-in
that has only the TensorRT 10 API names checked in docs/tensorrt.md), and the one-line refusal when
TensorRT is missing. Tests marked `tensorrt` need the real library and a GPU and skip elsewhere."""
from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest

from exporters import EngineIncompatible
import torch

import exporters.tensorrt as trt_backend  # importable without TensorRT: that is the point
from exporters import BackendUnavailable, get_exporter, get_runtime
from exporters.tensorrt import (EngineLoadError, TensorRTExporter, TensorRTRuntime, TrtSession, axis_names, built_for, check_compatible,
                                phase_sizes, profiles, select_profile)
from model.autoglm import meta_model
from contract.config import ExportConfig, TensorRTSettings
from contract.engines import Dim, Limits, TensorSpec, concrete_shape, engine_specs, model_dims
from pipeline.export import engine_key

from .conftest import compose_export, run_cli

HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None
NO_TENSORRT = "TensorRT is not installed: its builder is not on PyPI (see README)"
requires_tensorrt = pytest.mark.skipif(not HAVE_TENSORRT or not torch.cuda.is_available(),
                                       reason=NO_TENSORRT if not HAVE_TENSORRT else "TensorRT is installed but torch sees no CUDA GPU")


def profile_phases(spec, dims) -> list[str]:
    """The phases (prefill, decode, or all) an engine gets optimisation profiles for."""
    uses_seq = any(trt_backend.SEQ in axis_names(e) for t in spec.inputs for e in t.shape)
    return [name for name, *_ in phase_sizes(dims, uses_seq)]


@pytest.fixture(scope="module")
def cut(tiny_config):
    """The tiny model's engine specs and Dims at the export defaults, from its structure alone."""
    model = meta_model(tiny_config)
    limits = Limits()
    return {s.name: s for s in engine_specs(model, limits)}, model_dims(model, limits), limits


# --- optimisation profiles --------------------------------------------------------------------


def test_segment_gets_a_prefill_and_a_decode_profile(cut, tiny_config):
    specs, dims, limits = cut
    spec = specs["segment.0"]
    assert profile_phases(spec, dims) == ["prefill", "decode"]
    prefill, decode = profiles(spec, dims)
    t = tiny_config.text
    L = t.segment_bounds[0][1] - t.segment_bounds[0][0]
    B, S, C = dims["batch"], dims["seq"], dims["capacity"]
    assert prefill["hidden"] == ((1, 2, t.dim), (B.opt, S.opt, t.dim), (limits.max_batch, limits.max_seq, t.dim))
    assert decode["hidden"] == ((1, 1, t.dim), (B.opt, 1, t.dim), (limits.max_batch, 1, t.dim))
    assert prefill["seqlens_k"] == decode["seqlens_k"] == ((1,), (B.opt,), (limits.max_batch,))
    for profile in (prefill, decode):  # the in-place cache: one capacity per runtime, any up to the context
        assert profile["total_sequence_length"] == ((), (), ())
        assert profile["past_key.0"] == ((1, t.n_kv_heads, C.min, t.head_dim), (B.opt, t.n_kv_heads, C.opt, t.head_dim),
                                         (limits.max_batch, t.n_kv_heads, limits.max_context, t.head_dim))
    cache = {f"past_{kv}.{i}" for i in range(L) for kv in ("key", "value")}
    assert set(prefill) == set(decode) == {"hidden", "seqlens_k", "total_sequence_length", *cache}


def test_every_profile_is_ordered_and_holds_the_validation_sizes(cut):
    specs, dims, _ = cut
    for spec in specs.values():
        engine_profiles = profiles(spec, dims)
        for profile in engine_profiles:
            assert set(profile) == {t.name for t in spec.inputs}
            for lo, opt, hi in profile.values():
                assert all(0 <= a <= b <= c for a, b, c in zip(lo, opt, hi)), (spec.name, lo, opt, hi)
        for i in range(2):  # the export stage validates at both probe sizes: some profile must take each
            sizes = {n: d.probes[i] for n, d in dims.items()}
            shapes = {t.name: concrete_shape(t, sizes) for t in spec.inputs}
            index = select_profile(engine_profiles, shapes)
            assert index is not None, (spec.name, shapes)
            if len(engine_profiles) == 2:
                assert index == (1 if sizes["seq"] == 1 else 0)


def test_audio_frames_stay_on_their_multiple(cut, tiny_config):
    specs, dims, _ = cut
    frames = dims["audio_frames"]
    assert frames.multiple > 1
    (profile,) = profiles(specs["audio"], dims)  # no seq axis: one profile
    lo, opt, hi = profile["mel"]
    assert lo[1] == opt[1] == hi[1] == tiny_config.audio.n_mels
    assert (lo[0], opt[0], hi[0]) == (1, dims["batch"].opt, Limits().max_batch)
    assert (lo[2], opt[2], hi[2]) == (frames.multiple, frames.probes[1], tiny_config.audio.max_frames // frames.multiple * frames.multiple)
    assert all(f % frames.multiple == 0 for f in (lo[2], opt[2], hi[2]))


def test_odd_dims_are_rounded_onto_multiples():
    dims = {"batch": Dim("batch", 1, 4, (1, 2)), "audio_frames": Dim("audio_frames", 5, 99, (8, 21), 8)}
    spec = types.SimpleNamespace(inputs=[TensorSpec("mel", ("batch", 80, "audio_frames"), "float")])
    (profile,) = profiles(spec, dims)
    assert profile["mel"] == ((1, 80, 8), (2, 80, 24), (4, 80, 96))


def test_engines_without_seq(cut):
    specs, dims, limits = cut
    for name in ("vision", "audio", "cross_kv.0", "lm_head"):
        assert profile_phases(specs[name], dims) == ["all"], name
        assert len(profiles(specs[name], dims)) == 1
    (vision,) = profiles(specs["vision"], dims)
    lo, opt, hi = vision["pixel_values"]
    assert lo[1:] == opt[1:] == hi[1:]  # fixed-size images: only the batch moves
    assert (lo[0], hi[0]) == (1, limits.max_batch)
    prefill, decode = profiles(specs["embed"], dims)
    assert prefill["input_ids"] == ((1, 2), (dims["batch"].opt, dims["seq"].opt), (limits.max_batch, limits.max_seq))
    assert decode["input_ids"] == ((1, 1), (dims["batch"].opt, 1), (limits.max_batch, 1))


def test_max_seq_one_leaves_only_the_decode_profile(tiny_config):
    model = meta_model(tiny_config)
    dims = model_dims(model, Limits(max_seq=1))
    spec = next(s for s in engine_specs(model, Limits(max_seq=1)) if s.name == "embed")
    assert profile_phases(spec, dims) == ["decode"]
    assert profiles(spec, dims) == [{"input_ids": ((1, 1), (2, 1), (8, 1))}]


def test_select_profile():
    engine_profiles = [{"x": ((1, 2), (2, 5), (8, 512))}, {"x": ((1, 1), (2, 1), (8, 1))}]
    assert select_profile(engine_profiles, {"x": (3, 1)}) == 1
    assert select_profile(engine_profiles, {"x": (3, 7)}) == 0
    assert select_profile(engine_profiles, {"x": (9, 7)}) is None
    assert select_profile(engine_profiles, {"x": (3, 7, 1)}) is None


# --- a TensorRT stand-in: only the API names docs/tensorrt.md checked ---------------------------


class Enum:
    def __init__(self, *names):
        for i, n in enumerate(names):
            setattr(self, n, i)


def fake_tensorrt(version="10.8.0", calls=None, deserialize=None, with_fp16=True):
    """A module with the TensorRT 10 calls this backend makes, recording them."""
    calls = calls if calls is not None else []
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version

    class ILogger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self):
            pass

    trt.ILogger = ILogger
    trt.NetworkDefinitionCreationFlag = Enum("EXPLICIT_BATCH", "STRONGLY_TYPED")
    trt.BuilderFlag = Enum(*(["FP16", "INT8"] if with_fp16 else ["_0", "_1"]), "DEBUG", "VERSION_COMPATIBLE", "BF16")
    trt.MemoryPoolType = Enum("WORKSPACE")
    trt.TensorIOMode = Enum("NONE", "INPUT", "OUTPUT")
    trt.DataType = Enum("FLOAT", "HALF", "INT8", "INT32", "BOOL", "UINT8", "FP8", "BF16", "INT64")

    class Tensor:
        def __init__(self, name):
            self.name = name

    class Network:
        def __init__(self, flags):
            calls.append(("create_network", flags))
            self.inputs = []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            import onnx
            calls.append(("parse_from_file", Path(path).name))
            self.network.inputs = [Tensor(i.name) for i in onnx.load(path, load_external_data=False).graph.input]
            return True

        def get_error(self, i):
            return "no error"

    class TimingCache:
        def __init__(self, blob):
            self.blob = blob

        def serialize(self):
            return memoryview(b"timing:" + bytes(self.blob))

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.cache = [], [], None

        def set_memory_pool_limit(self, pool, size):
            calls.append(("set_memory_pool_limit", pool, size))

        @property
        def builder_optimization_level(self):
            return self._level

        @builder_optimization_level.setter
        def builder_optimization_level(self, level):
            calls.append(("builder_optimization_level", level))
            self._level = level

        def set_flag(self, flag):
            calls.append(("set_flag", flag))

        def add_optimization_profile(self, profile):
            self.profiles.append(profile.shapes)
            return len(self.profiles) - 1

        def create_timing_cache(self, blob):
            calls.append(("create_timing_cache", bytes(blob)))
            return TimingCache(blob)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls.append(("build_serialized_network", config.profiles))
            return memoryview(b"plan")

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            if deserialize is None:
                self.logger.log(ILogger.ERROR, "Serialization assertion plan version mismatch")
                return None
            return deserialize(data)

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    return trt


@pytest.fixture
def gpu_here(monkeypatch):
    """Pretend torch sees an sm_90 GPU; returns a setter for the capability."""
    capability = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["value"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(trt_backend, "_LOGGER", None)
    return lambda cap: capability.update(value=cap)


def exporter_with(monkeypatch, version="10.8.0", tensorrt=None, **cfg):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version))
    cfg = {"backend": "tensorrt", "dtype": "fp16", "device": "cuda", **cfg}
    return TensorRTExporter(ExportConfig(**cfg, tensorrt=TensorRTSettings(**(tensorrt or {}))))


# --- cache keys and settings --------------------------------------------------------------------


def test_cache_key_includes_tensorrt_version_and_compute_capability(cut, monkeypatch, gpu_here):
    specs, dims, _ = cut
    spec = specs["segment.0"]
    weights = {"seed": 0, "init_device": "cuda", "checkpoint": None}

    def key(version="10.8.0", capability=(9, 0), **cfg):
        gpu_here(capability)
        return engine_key(spec, dims, weights, exporter_with(monkeypatch, version, **cfg), "code")

    base = key()
    assert key() == base
    assert key(version="10.9.0") != base
    assert key(capability=(8, 9)) != base
    assert key(tensorrt={"optimization_level": 5}) != base
    assert key(tensorrt={"version_compatible": True}) != base
    assert key(tensorrt={"timing_cache": "/elsewhere/timing.cache"}) == base  # where the cache lives changes no engine
    exporter = exporter_with(monkeypatch)
    assert exporter.settings()["compute_capability"] == "sm_90"
    assert exporter.versions()["tensorrt"] == "10.8.0" and {"torch", "onnx", "onnxscript"} <= exporter.versions().keys()
    runtime = TensorRTRuntime()  # the run side checks what the manifest recorded against this machine
    runtime.check_runtime({"versions": {"tensorrt": "10.8.0"}, "settings": {"compute_capability": "sm_90"}}, Path("engines"))
    with pytest.raises(EngineIncompatible, match="built with TensorRT 10.7.0 on sm_90, found TensorRT 10.8.0 on sm_90"):
        runtime.check_runtime({"versions": {"tensorrt": "10.7.0"}, "settings": {"compute_capability": "sm_90"}}, Path("engines"))
    assert exporter.engine_files("segment.0-abc") == ["segment.0-abc.engine"]


def test_timing_cache_lives_beside_the_engines(monkeypatch, gpu_here, tmp_path):
    exporter = exporter_with(monkeypatch)
    assert exporter.timing_cache_path(tmp_path) == tmp_path / "timing.cache"
    absolute = exporter_with(monkeypatch, tensorrt={"timing_cache": str(tmp_path / "shared.cache")})
    assert absolute.timing_cache_path(tmp_path / "engines") == tmp_path / "shared.cache"


def test_settings_that_cannot_work_are_refused_in_one_line(monkeypatch, gpu_here):
    with pytest.raises(BackendUnavailable, match="strongly_typed=false") as e:
        exporter_with(monkeypatch, tensorrt={"int8": True})
    assert "\n" not in str(e.value)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("11.4.0", with_fp16=False))
    with pytest.raises(BackendUnavailable, match="strongly typed networks only"):
        TensorRTExporter(ExportConfig(backend="tensorrt", tensorrt=TensorRTSettings(strongly_typed=False)))
    cpu = exporter_with(monkeypatch, device="cpu")  # the runtime builds its exporter from defaults: allowed
    with pytest.raises(BackendUnavailable, match="export.device=cuda"):
        cpu.check_export()


def test_no_gpu_is_refused_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailable, match="needs a CUDA GPU"):
        TensorRTExporter(ExportConfig(backend="tensorrt"))


# --- the builder's calls, against the stand-in ---------------------------------------------------


@pytest.mark.parametrize("strongly_typed", [True, False])
def test_build_writes_engines_with_profiles_flags_and_timing_cache(cut, tiny_config, monkeypatch, gpu_here, tmp_path,
                                                                  strongly_typed):
    specs, dims, _ = cut
    calls = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(calls=calls))
    settings = TensorRTSettings(strongly_typed=strongly_typed, workspace_gb=0.5, optimization_level=4, version_compatible=True)
    # the ONNX trace runs for real on the CPU (fp32); only TensorRT is stood in for
    exporter = TensorRTExporter(ExportConfig(backend="tensorrt", dtype="fp32", device="cuda", tensorrt=settings))
    exporter.cfg.device = "cpu"
    monkeypatch.setattr(exporter, "check_export", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the trace itself must see this CPU-only torch
    from model.autoglm import materialize
    model = materialize(meta_model(tiny_config), "cpu", torch.float32)
    spec = next(s for s in engine_specs(model, Limits()) if s.name == "embed")
    staging = tmp_path / ".tmp-0000abcd"
    staging.mkdir()
    (tmp_path / "timing.cache").write_bytes(b"old")
    exporter.build([spec], dims, [staging / "embed-0123"], tmp_path)

    assert (staging / "embed-0123.engine").read_bytes() == b"plan"
    assert sorted(p.name for p in staging.iterdir()) == ["embed-0123.engine"]  # the intermediate ONNX is gone
    assert (tmp_path / "timing.cache").read_bytes() == b"timing:old"  # loaded, extended, saved atomically
    trt = sys.modules["tensorrt"]
    assert ("create_network", 1 << trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED if strongly_typed else 0) in calls
    assert ("set_memory_pool_limit", trt.MemoryPoolType.WORKSPACE, 1 << 29) in calls
    assert ("builder_optimization_level", 4) in calls
    assert ("set_flag", trt.BuilderFlag.VERSION_COMPATIBLE) in calls
    assert ("set_flag", trt.BuilderFlag.FP16) not in calls  # fp32 export: no lower precision either way
    (built,) = [c[1] for c in calls if c[0] == "build_serialized_network"]
    assert built == profiles(spec, dims)


def test_weakly_typed_fp16_sets_the_precision_flag(monkeypatch, gpu_here, tmp_path, cut):
    specs, dims, _ = cut
    calls = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(calls=calls))
    exporter = TensorRTExporter(ExportConfig(backend="tensorrt", dtype="fp16", device="cuda",
                                             tensorrt=TensorRTSettings(strongly_typed=False, int8=True)))
    onnx_path = tmp_path / "lm_head.onnx"
    import onnx
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Identity", ["exit_hidden"], ["logits"])], "g",
                              [helper.make_tensor_value_info("exit_hidden", TensorProto.FLOAT16, ["batch", 128])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT16, ["batch", 128])])
    onnx.save(helper.make_model(graph), onnx_path)
    exporter.build_engine(specs["lm_head"], dims, onnx_path, tmp_path / "lm_head.engine", tmp_path / "timing.cache", None)
    trt = sys.modules["tensorrt"]
    assert ("create_network", 0) in calls
    assert ("set_flag", trt.BuilderFlag.FP16) in calls and ("set_flag", trt.BuilderFlag.INT8) in calls
    assert ("create_timing_cache", b"") in calls  # no cache yet: a new one
    assert (tmp_path / "timing.cache").read_bytes() == b"timing:"


# --- version and compute-capability checks --------------------------------------------------------


def test_engine_for_another_gpu_or_version_is_refused_with_both_named():
    path = Path("/engines/tiny/tensorrt/segment.0-0123.engine")
    built = {"tensorrt": "10.3.0", "compute_capability": "sm_90", "version_compatible": False}
    with pytest.raises(EngineLoadError) as e:
        check_compatible(path, built, {"tensorrt": "10.8.0", "compute_capability": "sm_89"})
    message = str(e.value)
    assert str(path) in message
    assert "built with TensorRT 10.3.0 on sm_90" in message and "found TensorRT 10.8.0 on sm_89" in message
    assert "GPU architecture differs" in message and "\n" not in message
    with pytest.raises(EngineLoadError, match="only on the TensorRT version that built them"):
        check_compatible(path, built, {"tensorrt": "10.8.0", "compute_capability": "sm_90"})
    check_compatible(path, built, {"tensorrt": "10.3.0", "compute_capability": "sm_90"})
    compatible = {**built, "version_compatible": True}
    check_compatible(path, compatible, {"tensorrt": "10.8.0", "compute_capability": "sm_90"})  # later: fine
    with pytest.raises(EngineLoadError, match="same or a later TensorRT"):
        check_compatible(path, compatible, {"tensorrt": "10.1.0", "compute_capability": "sm_90"})
    check_compatible(path, None, {"tensorrt": "10.1.0", "compute_capability": "sm_80"})  # nothing recorded: TensorRT decides


def test_manifest_backend_record_says_what_an_engine_was_built_for(monkeypatch, gpu_here):
    exporter = exporter_with(monkeypatch, "10.3.0", tensorrt={"version_compatible": True})
    record = {"name": "tensorrt", "settings": exporter.settings(), "versions": exporter.versions()}  # as the manifest stores it
    assert built_for(record) == {"tensorrt": "10.3.0", "compute_capability": "sm_90", "version_compatible": True}
    assert built_for(None) is None


def test_failed_deserialization_names_the_file_and_both_environments(monkeypatch, gpu_here, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.8.0"))  # its runtime returns None
    path = tmp_path / "segment.0-0123.engine"
    path.write_bytes(b"not a plan")
    backend = {"settings": {"compute_capability": "sm_90", "tensorrt": {}}, "versions": {"tensorrt": "10.8.0"}}
    with pytest.raises(EngineLoadError) as e:
        TrtSession(path, [], [], "cuda:0", built_with=backend)
    message = str(e.value)
    assert f"could not deserialize {path}" in message
    assert "built with TensorRT 10.8.0 on sm_90" in message and "found TensorRT 10.8.0 on sm_90" in message
    assert "plan version mismatch" in message  # TensorRT's own reason, from its log
    gpu_here((8, 6))
    with pytest.raises(EngineLoadError, match="found TensorRT 10.8.0 on sm_86"):  # refused before TensorRT tries
        TrtSession(path, [], [], "cuda:0", built_with=backend)
    with pytest.raises(EngineLoadError, match="run on a CUDA device"):
        TrtSession(path, [], [], "cpu")


def test_export_validation_loads_with_the_exporters_own_record(monkeypatch, gpu_here, tmp_path):
    """The export stage loads what it just built without a manifest: version-compatible engines
    still get host code allowed, which their embedded lean runtime needs."""
    seen = {}

    class Runtime:
        def __init__(self, logger):
            self.engine_host_code_allowed = False

        def deserialize_cuda_engine(self, data):
            seen["host_code"] = self.engine_host_code_allowed
            return None

    exporter = exporter_with(monkeypatch, tensorrt={"version_compatible": True})
    sys.modules["tensorrt"].Runtime = Runtime
    path = tmp_path / "embed-0123.engine"
    path.write_bytes(b"plan")
    with pytest.raises(EngineLoadError, match="built with TensorRT 10.8.0 on sm_90"):
        exporter.load(path, [], [], "cuda:0")
    assert seen["host_code"] is True


# --- without TensorRT -------------------------------------------------------------------------------


def test_missing_tensorrt_is_one_line_saying_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    with pytest.raises(BackendUnavailable) as e:
        get_exporter(ExportConfig(backend="tensorrt"))
    message = str(e.value)
    assert "\n" not in message
    assert "pypi.nvidia.com" in message and "tarball" in message


@pytest.mark.skipif(HAVE_TENSORRT, reason="TensorRT is installed here")
@pytest.mark.parametrize("overrides, message", [
    (["export.device=cpu"], "the tensorrt backend needs TensorRT, which is not importable here"),
    ([], "export failed:"),  # device=cuda: on a machine without a GPU the CUDA check speaks first
])
def test_cli_without_tensorrt_fails_in_one_line_and_writes_nothing(tmp_path, overrides, message):
    target = tmp_path / "engines"
    result = run_cli("pipeline", "export", "export=tensorrt", f"engines_dir={target}", *overrides)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    failures = [line for line in result.stderr.splitlines() if "export failed:" in line]
    assert len(failures) == 1 and message in failures[0], result.stderr
    assert not target.exists(), "a failed export wrote files"


# --- with TensorRT and a GPU (skipped elsewhere) --------------------------------------------------


def tensorrt_export(engines_root: Path):
    from rich.console import Console

    from pipeline.export import run_export

    app = compose_export(["model=tiny", "export=tensorrt", "export.progress=false"])
    return run_export(app.model, app.export, engines_root, console=Console(stderr=True, quiet=True))


@pytest.fixture(scope="module")
def trt_export(tmp_path_factory):
    return tensorrt_export(tmp_path_factory.mktemp("trt-engines"))


@pytest.mark.tensorrt
@requires_tensorrt
def test_tensorrt_export_validates_every_engine_and_caches(trt_export):
    manifest = trt_export.manifest
    assert manifest.backend["name"] == "tensorrt"
    assert manifest.backend["settings"]["compute_capability"] == trt_backend.compute_capability("cuda:0")
    for engine in manifest.engines.values():
        assert engine.path.endswith(".engine") and len(engine.validation) >= 2, engine.name
    assert (trt_export.directory / "timing.cache").is_file()
    again = tensorrt_export(trt_export.directory.parent.parent)
    assert again.built == []


@pytest.mark.tensorrt
@requires_tensorrt
def test_session_switches_profiles_and_matches_eager(trt_export, tiny_config):
    from model.autoglm import build_model
    from contract.engines import probe_sizes, random_inputs

    manifest = trt_export.manifest
    record = manifest.engines["segment.0"]
    runtime = get_runtime("tensorrt")  # what the serving runtime loads engines with
    session = runtime.load(trt_export.directory / record.path, record.input_specs(), record.output_specs(), "cuda:0",
                            built_with=manifest.backend)
    model = build_model(tiny_config, "cuda", torch.float16)
    spec = next(s for s in engine_specs(model, Limits()) if s.name == "segment.0")
    generator = torch.Generator().manual_seed(0)
    decode, prefill = probe_sizes(model_dims(model, Limits()))  # seq 1, then seq > 1
    for sizes in (prefill, decode, prefill, decode):
        inputs = random_inputs(spec, sizes, torch.float16, "cuda:0", generator)
        with torch.inference_mode():
            expected = spec.module(*inputs)
        feeds = {t.name: x for t, x in zip(spec.inputs, inputs)}
        got = session.run(feeds)
        for t, ref in zip(spec.outputs, expected):
            err = (got[t.name].float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)
            assert err < 2e-2, (t.name, sizes, float(err))
        owned = torch.empty_like(got["hidden_out"])  # a caller-owned buffer is written where it lies (decode steps)
        assert session.run(feeds, {"hidden_out": owned})["hidden_out"] is owned
    other = {**manifest.backend, "settings": {**manifest.backend["settings"], "compute_capability": "sm_10"}}
    with pytest.raises(EngineLoadError, match="built with TensorRT .* on sm_10"):
        runtime.load(trt_export.directory / record.path, record.input_specs(), record.output_specs(), "cuda:0", built_with=other)
