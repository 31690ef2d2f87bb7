"""ONNX backend, the run side: ONNX Runtime sessions over caller-owned torch tensors.

What the serving runtime loads (exporters.get_runtime("onnx")); it imports onnxruntime and torch
only, not the exporter stack (torch.onnx, onnxscript) that exporters/onnx.py builds with.
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from contract.engines import TensorSpec, bind_sizes, concrete_shape
from exporters import EngineIncompatible, device_stream

# errors only: at warning level ONNX Runtime 1.31 reports a missing plugin EP for every CUDA session
ort.set_default_logger_severity(3)

# How a CUDA session holds memory. ONNX Runtime's defaults put the weights in the session's BFC arena,
# which grows in powers of two (a segment's weights round up to the next power of two), and so does
# MatMulNBits's dequantization scratch. Weights get exact allocations of their own, the arena only
# what a run asks for. With exact weight allocations MatMulNBits's fpA_intB kernels keep no second
# copy of the weights, which makes them both smaller and faster than the default kernel, so quantized
# engines run them (the measurements: bench_results/2026-12-03-nvidia-h200-phone-9b-ort-memory/).
# Module level so that a measurement can put ONNX Runtime's defaults back (scripts/decode_profile.py --ort-defaults).
CUDA_SESSION_CONFIG = {"session.use_device_allocator_for_initializers": "1", "ep.cuda.fpa_intb_gemm": "1"}
CUDA_PROVIDER_OPTIONS = {"arena_extend_strategy": "kSameAsRequested"}
# Where ONNX Runtime's profiler writes the trace of every session made from now on (DIR/<engine file>_<time>.json,
# once end_profiling() is called on its InferenceSession), or None: no profiling. A measurement's switch
# (scripts/decode_profile.py --ort-profile), module level like the settings above.
PROFILE_DIR: str | None = None
# the runs of one graph id on one thread within which the CUDA provider captures it: two regular runs (its arena
# grows to what the graph needs), the capture on the third. Its graph state is per thread, so the count is too.
CAPTURE_RUNS = 3


class OrtRuntime:
    name = "onnx"
    cuda_graphs = True  # the CUDA provider captures a graph per batch size of a decode step (enable_cuda_graph)
    reads_files = True
    loads_from_memory = True  # load(host_files=...): a reload from host copies of the files, not the disk

    def check_runtime(self, backend: dict, directory: Path) -> None:
        recorded = backend["versions"].get("onnxruntime")
        if recorded != ort.__version__:
            raise EngineIncompatible(f"engines in {directory} were validated with onnxruntime {recorded}, "
                                     f"found {ort.__version__} here: export again on this machine")

    def check_devices(self, dtype: str, devices: list[str]) -> None:
        if dtype == "fp32" and any(torch.device(d).type == "cuda" for d in devices):
            raise EngineIncompatible("these engines are fp32, and GroupQueryAttention has no fp32 CUDA kernel: export for the GPU "
                                     "with export.dtype=fp16 (or bf16) export.device=cuda, or serve them with runtime=cpu")

    def load(self, path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], device: str,
             built_with: dict | None = None, capture_lock: threading.RLock | None = None,
             host_files: dict | None = None) -> "OrtSession":
        return OrtSession(path, inputs, outputs, device, capture_lock=capture_lock, host_files=host_files)


NUMPY_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32, torch.bool: np.bool_}
ONNX_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(bfloat16)": torch.bfloat16,
               "tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(bool)": torch.bool}


def device_context(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class OrtSession:
    """An ONNX Runtime session over caller-owned torch tensors, bound by name through I/O binding.

    `run(feeds, outputs)` binds every input in place; an output declared `inplace_of` an input is
    bound to that input's memory (a segment's cache is written where it lies), one the caller
    passes in `outputs` to that tensor, and any other is allocated by torch on the engine's device
    at the shape the manifest declares. On CUDA the session runs on the device's engine stream
    (`device_stream`), ordered after whatever torch queued before the call and before whatever it
    queues after, with no host synchronisation.

    With a `capture_lock`, `run(..., captured=True)` replays one ONNX Runtime CUDA graph per batch
    size: the caller keeps that batch size's tensors (a decode step's buffers) and rewrites their
    contents between steps. The session counts a graph's runs per thread (ONNX Runtime keeps graph
    state per thread): the first CAPTURE_RUNS warm up and capture it, each holding `capture_lock`
    (a capture records all work on the device, so no other thread may allocate there meanwhile:
    the engine set holds that lock for every load). The lock is only tried: a run that finds it
    taken runs uncaptured (`uncaptured` counts them) and the capture happens at a later run, so a
    decode step never waits out a load. Other runs (a prompt's prefill) go through the same session
    uncaptured. The graphs live and die with the session: a session made again (an engine
    reloaded) captures anew. On the CPU the provider captures nothing, but the counting and the
    lock are the same, so they are tested there.

    `host_files` (file name -> its contents) builds the session from memory instead of `path`: the
    .onnx's bytes, and its external .onnx.data as any buffer (a pinned torch tensor's numpy view),
    which ONNX Runtime copies from during session creation.
    """

    def __init__(self, path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], device: str = "cpu",
                 capture_lock: threading.RLock | None = None, host_files: dict | None = None):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.inputs, self.outputs = inputs, outputs
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if PROFILE_DIR is not None:
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(PROFILE_DIR) / path.stem)
        self.stream = None
        self.capture_lock = capture_lock
        self.cuda_graphs = capture_lock is not None and self.device.type == "cuda"  # graphs the provider really captures
        self.graphs: dict[int, tuple] = {}  # batch size -> (bound addresses and shapes, binding, run options)
        self.graph_runs: Counter[tuple[int, int]] = Counter()  # (thread id, batch size) -> its graph's runs there
        self.uncaptured = 0  # captured runs made uncaptured because the capture lock was taken
        if self.device.type == "cuda":
            self.stream = device_stream(self.device)
            cuda = {**CUDA_PROVIDER_OPTIONS, "device_id": self.device.index, "user_compute_stream": str(self.stream.cuda_stream)}
            for key, value in CUDA_SESSION_CONFIG.items():
                options.add_session_config_entry(key, value)
            if self.cuda_graphs:
                cuda["enable_cuda_graph"] = "1"
            providers = [("CUDAExecutionProvider", cuda)]
        else:
            options.intra_op_num_threads = int(os.environ.get("DYNGRAPH_CPU_THREADS", "0"))
            providers = ["CPUExecutionProvider"]
        self.run_options = self.options("-1" if self.cuda_graphs else None)  # -1: a run that is none of the graphs
        model = str(path)
        if host_files is not None:
            data = {name: buf for name, buf in host_files.items() if name != path.name}
            if data:
                options.add_external_initializers_from_files_in_memory(list(data), list(data.values()),
                                                                       [memoryview(b).nbytes for b in data.values()])
            model = host_files[path.name]
        with device_context(self.device):  # ONNX Runtime makes its CUDA events on the current device
            self.session = ort.InferenceSession(model, options, providers=providers)
        self.output_dtypes = {o.name: ONNX_DTYPES[o.type] for o in self.session.get_outputs()}

    def options(self, graph_id: str | None) -> ort.RunOptions:
        options = ort.RunOptions()
        if graph_id is not None:
            options.add_run_config_entry("gpu_graph_id", graph_id)
        if self.device.type == "cuda":  # ordering comes from the shared stream: no host sync at the end of every run
            options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        return options

    def run(self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor] | None = None,
            captured: bool = False) -> dict[str, torch.Tensor]:
        results = self.bind_outputs(feeds, outputs or {})
        if not captured or self.capture_lock is None:
            self.launch(self.binding(feeds, results), self.run_options)
            return results
        batch, binding, options = self.graph(feeds, results)
        runs_here = (threading.get_ident(), batch)
        if self.graph_runs[runs_here] >= CAPTURE_RUNS:
            self.launch(binding, options)
        elif self.capture_lock.acquire(blocking=False):
            try:
                self.graph_runs[runs_here] += 1
                self.launch(binding, options)
            finally:
                self.capture_lock.release()
        else:
            self.uncaptured += 1
            self.launch(self.binding(feeds, results), self.run_options)
        return results

    def needs_capture(self, batch: int) -> bool:
        return self.capture_lock is not None and self.graph_runs[threading.get_ident(), batch] < CAPTURE_RUNS

    def graph(self, feeds: dict[str, torch.Tensor], results: dict[str, torch.Tensor]) -> tuple[int, object, ort.RunOptions]:
        """The batch size of these buffers, and the binding and run options of its graph, made at its first run."""
        bound = tuple((n, t.data_ptr(), tuple(t.shape)) for n, t in (*feeds.items(), *results.items()))
        batch = bind_sizes(self.inputs, {n: tuple(t.shape) for n, t in feeds.items()})["batch"]
        if batch not in self.graphs:  # ids from 1: 0 is ONNX Runtime's default
            graph_id = str(len(self.graphs) + 1) if self.cuda_graphs else None
            self.graphs[batch] = (bound, self.binding(feeds, results), self.options(graph_id))
        captured_with, binding, options = self.graphs[batch]
        if bound != captured_with:  # a replay reads and writes the addresses it was captured with
            raise ValueError(f"captured runs at batch size {batch} must bind the tensors its graph was made with")
        return batch, binding, options

    def bind_outputs(self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sizes = bind_sizes(self.inputs, {n: tuple(t.shape) for n, t in feeds.items()})
        results = {}
        for spec in self.outputs:
            if spec.inplace_of:
                results[spec.name] = feeds[spec.inplace_of]
            elif spec.name in outputs:
                results[spec.name] = outputs[spec.name]
            else:
                results[spec.name] = torch.empty(concrete_shape(spec, sizes), dtype=self.output_dtypes[spec.name], device=self.device)
        return results

    def binding(self, feeds: dict[str, torch.Tensor], results: dict[str, torch.Tensor]):
        binding = self.session.io_binding()
        for bind, tensors in ((binding.bind_input, feeds), (binding.bind_output, results)):
            for name, t in tensors.items():
                if not t.is_contiguous():  # bound by address
                    raise ValueError(f"{name}: tensors bound to an engine must be contiguous")
                device = t.device if t.device.type == "cuda" else torch.device("cpu")
                bind(name, device.type, device.index or 0, NUMPY_TYPES[t.dtype], tuple(t.shape), t.data_ptr())
        return binding

    def launch(self, binding, run_options) -> None:
        if self.stream is None:
            self.session.run_with_iobinding(binding, run_options)
            return
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)  # inputs written by the caller's stream are ready
        with torch.cuda.device(self.device):  # its events must belong to the engine's device, not device 0
            self.session.run_with_iobinding(binding, run_options)
        caller.wait_stream(self.stream)  # outputs are ready for whatever the caller queues next
