"""ONNX backend: torch's dynamo exporter in, ONNX Runtime sessions out.

Where export time goes (measured on a 2-layer phone-9b segment in fp16, see README): tracing
and translation take seconds; the onnxscript optimizer's default constant folding transposes
every weight matrix in numpy, renames it, and makes the save several times slower, and its
pattern rewriter took as long as the trace itself for fusions that ONNX Runtime applies anyway
when it loads the model. So we trace each graph once, leave folding to the runtime, and write
engines that share a graph (the four segments, the four cross-attention blocks) from one trace
by swapping in their weights.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import onnxscript
import torch
from torch.onnx._internal.exporter._core import TorchTensor

from exporters import EngineIncompatible, device_stream, fused
from contract.config import ExportConfig
from contract.engines import EXPORT_DTYPES, Dim, EngineSpec, TensorSpec, bind_sizes, concrete_shape, random_inputs, trace_sizes
from contract.manifest import fsync

log = logging.getLogger(__name__)
# errors only: at warning level ONNX Runtime 1.31 reports a missing plugin EP for every CUDA session
ort.set_default_logger_severity(3)

# ONNX protobufs cannot exceed 2 GB: larger engines keep their weights in a .data file beside
EXTERNAL_DATA_BYTES = 2 << 30


class OnnxExporter:
    name = "onnx"
    artifacts = ("*.onnx", "*.onnx.data")
    sources = ("exporters/onnx.py", "exporters/fused.py")  # what it builds with: part of every cache key

    def __init__(self, cfg: ExportConfig):
        self.cfg = cfg
        self.dtype = EXPORT_DTYPES[cfg.dtype]

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__, "onnxruntime": ort.__version__}

    def check_runtime(self, backend: dict, directory: Path) -> None:
        recorded = backend["versions"].get("onnxruntime")
        if recorded != ort.__version__:
            raise EngineIncompatible(f"engines in {directory} were validated with onnxruntime {recorded}, "
                                     f"found {ort.__version__} here: export again on this machine")

    def settings(self) -> dict:
        return {"dtype": self.cfg.dtype, "opset": self.cfg.opset, "device": torch.device(self.cfg.device).type}

    def engine_files(self, stem: str) -> list[str]:
        return [f"{stem}.onnx", f"{stem}.onnx.data"]

    def build(self, specs: list[EngineSpec], dims: dict[str, Dim], stems: list[Path], engines_dir: Path | None = None) -> None:
        first = specs[0]
        if first.fused:  # built from fused operators, no trace
            for spec, stem in zip(specs, stems):
                start = time.perf_counter()
                weight_bytes = sum(p.numel() * p.element_size() for p in spec.module.parameters())
                path = Path(f"{stem}.onnx")
                fused.write_segment(spec, self.dtype, dims["capacity"].max, self.cfg.opset, path,
                                    external=weight_bytes > EXTERNAL_DATA_BYTES)
                fsync_engine(path)
                log.info("%s: wrote %.2f GB of fused graph in %.1f s", spec.name, weight_bytes / 1e9, time.perf_counter() - start)
            return
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(0)
        sample = random_inputs(first, trace_sizes(dims), self.dtype, self.cfg.device, generator)
        with torch.inference_mode(False), torch.no_grad():
            program = torch.onnx.export(
                first.module, tuple(sample), dynamo=True, optimize=False, verbose=False,
                input_names=[t.name for t in first.inputs], output_names=[t.name for t in first.outputs],
                dynamic_shapes=tuple(torch_dynamic_shapes(t, dims) for t in first.inputs),
                opset_version=self.cfg.opset,
            )
        # no general constant folding (it bakes weights into unnamed numpy constants); only the
        # weight transposes, done by torch on the export device
        transposed = pretranspose_weights(program, first.module.state_dict())
        onnxscript.optimizer.remove_unused_nodes(program.model)
        traced = time.perf_counter()
        log.info("%s: traced in %.1f s", first.graph, traced - start)
        for spec, stem in zip(specs, stems):
            if spec is not first:
                apply_weights(program, spec.module.state_dict(), transposed)
            weight_bytes = sum(p.numel() * p.element_size() for p in spec.module.parameters())
            path = Path(f"{stem}.onnx")
            program.save(path, external_data=weight_bytes > EXTERNAL_DATA_BYTES)
            fsync_engine(path)
        log.info("%s: wrote %d engine(s), %.2f GB, in %.1f s", first.graph, len(specs),
                 sum(f.stat().st_size for st in stems for f in st.parent.glob(f"{st.name}.onnx*")) / 1e9, time.perf_counter() - traced)

    def load(self, path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], device: str,
             built_with: dict | None = None, cuda_graphs: bool = False) -> "OrtSession":
        return OrtSession(path, inputs, outputs, device, cuda_graphs=cuda_graphs and torch.device(device).type == "cuda")


def fsync_engine(path: Path) -> None:
    """An engine's .onnx and, past 2 GB, its .data, on disk before the stage commits them."""
    for f in (path, Path(f"{path}.data")):
        if f.exists():
            fsync(f)


def pretranspose_weights(program, state_dict: dict[str, torch.Tensor]) -> set[str]:
    """Replace every Transpose(weight) feeding a MatMul by a stored transposed weight.

    The exporter writes nn.Linear as MatMul(x, Transpose(W)); left alone, ONNX Runtime would
    fold those transposes on the CPU at every session load, copying all the weights once more.
    Returns the names of the weights now stored transposed (as "<name>.T").
    """
    graph = program.model.graph
    transposed = set()
    for node in list(graph):
        source = node.inputs[0] if node.op_type == "Transpose" and node.inputs else None
        if source is None or source.name not in state_dict or not source.is_initializer():
            continue
        perm = node.attributes.get("perm")
        if perm is None or list(perm.as_ints()) != [1, 0]:
            continue
        weight_t = ir.Value(name=f"{source.name}.T", type=source.type,
                            const_value=TorchTensor(state_dict[source.name].t().contiguous(), f"{source.name}.T"))
        graph.register_initializer(weight_t)
        node.outputs[0].replace_all_uses_with(weight_t)
        graph.remove(node, safe=True)
        if not source.uses():
            graph.initializers.pop(source.name)
        transposed.add(source.name)
    return transposed


def apply_weights(program, state_dict: dict[str, torch.Tensor], transposed: set[str]) -> None:
    """Swap in another engine's weights; a graph initializer left unmatched would silently keep
    the traced engine's values, so it is an error."""
    initializers = program.model.graph.initializers
    weights = {n: t for n, t in state_dict.items() if n in initializers}
    weights |= {f"{n}.T": state_dict[n].t().contiguous() for n in transposed}
    missing = [n for n in initializers if n not in weights and initializers[n].name in state_dict]
    for name, tensor in weights.items():
        initializers[name].const_value = TorchTensor(tensor, name)
    if missing:
        raise RuntimeError(f"graph initializers without a weight to apply: {missing[:5]}")


def torch_dynamic_shapes(spec: TensorSpec, dims: dict[str, Dim]) -> dict[int, object] | None:
    axes = {}
    for axis, entry in enumerate(spec.shape):
        if isinstance(entry, str):
            d = dims[entry]
            if d.multiple > 1:
                axes[axis] = d.multiple * torch.export.Dim(f"{d.name}_blocks", min=d.min // d.multiple, max=d.max // d.multiple)
            else:
                axes[axis] = torch.export.Dim(d.name, min=d.min, max=d.max)
    return axes or None


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

    With `cuda_graphs`, `run(..., graph=True)` replays one ONNX Runtime CUDA graph per set of bound
    addresses and shapes, captured at its first run: the caller keeps those tensors (a decode step's
    buffers for one batch size) and rewrites their contents between steps. Other runs (a prompt's
    prefill) go through the same session uncaptured.
    """

    def __init__(self, path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], device: str = "cpu",
                 cuda_graphs: bool = False):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.inputs, self.outputs = inputs, outputs
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.stream = None
        self.cuda_graphs = cuda_graphs
        self.graphs: dict[tuple, tuple] = {}  # bound addresses and shapes -> (binding, run options)
        if self.device.type == "cuda":
            self.stream = device_stream(self.device)
            cuda = {"device_id": self.device.index, "user_compute_stream": str(self.stream.cuda_stream)}
            if cuda_graphs:
                cuda["enable_cuda_graph"] = "1"
            providers = [("CUDAExecutionProvider", cuda)]
        else:
            options.intra_op_num_threads = int(os.environ.get("DYNGRAPH_CPU_THREADS", "0"))
            providers = ["CPUExecutionProvider"]
        self.run_options = self.options("-1" if cuda_graphs else None)
        with device_context(self.device):  # ONNX Runtime makes its CUDA events on the current device
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.output_dtypes = {o.name: ONNX_DTYPES[o.type] for o in self.session.get_outputs()}

    def options(self, graph_id: str | None) -> ort.RunOptions:
        options = ort.RunOptions()
        if graph_id is not None:
            options.add_run_config_entry("gpu_graph_id", graph_id)
        if self.device.type == "cuda":  # ordering comes from the shared stream: no host sync at the end of every run
            options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        return options

    def run(self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor] | None = None,
            graph: bool = False) -> dict[str, torch.Tensor]:
        results = self.bind_outputs(feeds, outputs or {})
        if graph and self.cuda_graphs:
            key = tuple((n, t.data_ptr(), tuple(t.shape)) for n, t in (*feeds.items(), *results.items()))
            if key not in self.graphs:  # ids from 1: 0 is ONNX Runtime's default
                self.graphs[key] = (self.binding(feeds, results), self.options(str(len(self.graphs) + 1)))
            self.launch(*self.graphs[key])
        else:
            self.launch(self.binding(feeds, results), self.run_options)
        return results

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
