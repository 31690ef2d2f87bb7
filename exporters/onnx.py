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

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import onnxscript
import torch

from pipeline.config import ExportConfig
from pipeline.engines import EXPORT_DTYPES, Dim, EngineSpec, TensorSpec, bind_sizes, concrete_shape, random_inputs, trace_sizes

# ONNX protobufs cannot exceed 2 GB: larger engines keep their weights in a .data file beside
EXTERNAL_DATA_BYTES = 2 << 30


class OnnxExporter:
    name = "onnx"
    artifacts = ("*.onnx", "*.onnx.data")

    def __init__(self, cfg: ExportConfig):
        self.cfg = cfg
        self.dtype = EXPORT_DTYPES[cfg.dtype]

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__, "onnxruntime": ort.__version__}

    def runtime_versions(self) -> dict[str, str]:
        return {"onnxruntime": ort.__version__}

    def settings(self) -> dict:
        return {"dtype": self.cfg.dtype, "opset": self.cfg.opset, "device": torch.device(self.cfg.device).type}

    def engine_files(self, stem: str) -> list[str]:
        return [f"{stem}.onnx", f"{stem}.onnx.data"]

    def build(self, specs: list[EngineSpec], dims: dict[str, Dim], stems: list[Path]) -> None:
        first = specs[0]
        generator = torch.Generator().manual_seed(0)
        sample = random_inputs(first, trace_sizes(dims), self.dtype, self.cfg.device, generator)
        with torch.inference_mode(False), torch.no_grad():
            program = torch.onnx.export(
                first.module, tuple(sample), dynamo=True, optimize=False, verbose=False,
                input_names=[t.name for t in first.inputs], output_names=[t.name for t in first.outputs],
                dynamic_shapes=tuple(torch_dynamic_shapes(t, dims) for t in first.inputs),
                opset_version=self.cfg.opset,
            )
        # no constant folding here: it would bake transposed weights into unnamed constants that
        # apply_weights cannot replace; ONNX Runtime and TensorRT fold them when they load
        onnxscript.optimizer.remove_unused_nodes(program.model)
        for spec, stem in zip(specs, stems):
            if spec is not first:
                apply_weights(program, spec.module.state_dict())
            weight_bytes = sum(p.numel() * p.element_size() for p in spec.module.parameters())
            path = Path(f"{stem}.onnx")
            program.save(path, external_data=weight_bytes > EXTERNAL_DATA_BYTES)
            for f in (path, Path(f"{path}.data")):
                if f.exists():
                    fsync(f)

    def load(self, path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], device: str) -> "OrtSession":
        return OrtSession(path, inputs, outputs, device)


def apply_weights(program, state_dict: dict[str, torch.Tensor]) -> None:
    """Swap in another engine's weights; a graph initializer left unmatched would silently keep
    the traced engine's values, so it is an error."""
    initializers = program.model.graph.initializers
    missing = [n for n in initializers if n in state_dict.keys() ^ initializers.keys() and not n.startswith(("val_", "_"))]
    program.apply_weights({n: t for n, t in state_dict.items() if n in initializers})
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


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


NUMPY_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.bool: np.bool_}
ONNX_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(bfloat16)": torch.bfloat16,
               "tensor(int64)": torch.int64, "tensor(bool)": torch.bool}


class OrtSession:
    """An ONNX Runtime session that reads and writes torch tensors in place through I/O binding.

    Outputs are allocated by torch on the engine's device at the shapes the manifest declares, so
    a path's engines hand tensors to each other without a copy through host memory. On CUDA,
    ONNX Runtime runs on torch's current stream of that device: one stream per device, ordered
    with whatever torch does around the call.
    """

    def __init__(self, path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], device: str = "cpu"):
        self.device = torch.device(device)
        self.inputs, self.outputs = inputs, outputs
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.device.type == "cuda":
            index = self.device.index or 0
            stream = torch.cuda.current_stream(self.device).cuda_stream
            providers = [("CUDAExecutionProvider", {"device_id": index, "user_compute_stream": str(stream)})]
        else:
            options.intra_op_num_threads = int(os.environ.get("DYNGRAPH_CPU_THREADS", "0"))
            providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.output_dtypes = {o.name: ONNX_DTYPES[o.type] for o in self.session.get_outputs()}

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        binding = self.session.io_binding()
        kind, index = self.device.type, self.device.index or 0
        feeds = {name: t.contiguous() for name, t in feeds.items()}
        for name, t in feeds.items():
            binding.bind_input(name, kind, index, NUMPY_TYPES[t.dtype], tuple(t.shape), t.data_ptr())
        sizes = bind_sizes(self.inputs, {n: tuple(t.shape) for n, t in feeds.items()})
        results = {}
        for spec in self.outputs:
            out = torch.empty(concrete_shape(spec, sizes), dtype=self.output_dtypes[spec.name], device=self.device)
            binding.bind_output(spec.name, kind, index, NUMPY_TYPES[out.dtype], tuple(out.shape), out.data_ptr())
            results[spec.name] = out
        self.session.run_with_iobinding(binding)
        return results
