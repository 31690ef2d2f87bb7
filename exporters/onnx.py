"""ONNX backend, the builder: torch's dynamo exporter in, ONNX files out (their sessions: exporters/ort.py).

Where export time goes (measured on a 2-layer phone-9b segment in fp16, see README): tracing
and translation take seconds; the onnxscript optimizer's default constant folding transposes
every weight matrix in numpy, renames it, and makes the save several times slower, and its
pattern rewriter took as long as the trace itself for fusions that ONNX Runtime applies anyway
when it loads the model. So we trace each graph once, leave folding to the runtime, and write
engines that share a graph (the four segments, the four cross-attention blocks) from one trace
by swapping in their weights.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxruntime as ort
import onnxscript
import torch
from torch.onnx._internal.exporter._core import TorchTensor

from contract.config import ExportConfig
from contract.engines import EXPORT_DTYPES, Dim, EngineSpec, TensorSpec, random_inputs, trace_sizes
from contract.manifest import fsync
from exporters import fused
from exporters.ort import OrtRuntime, OrtSession
from exporters.quantize import BITS, engine_quant, quantize_program

log = logging.getLogger(__name__)

# ONNX protobufs cannot exceed 2 GB: larger engines keep their weights in a .data file beside
EXTERNAL_DATA_BYTES = 2 << 30


class OnnxExporter:
    name = "onnx"
    artifacts = ("*.onnx", "*.onnx.data")
    sources = ("exporters/onnx.py", "exporters/fused.py", "exporters/quantize.py")  # what it builds with: part of every cache key
    quantizations = tuple(BITS)  # export.quantize values it builds (MatMulNBits)

    def __init__(self, cfg: ExportConfig):
        self.cfg = cfg
        self.dtype = EXPORT_DTYPES[cfg.dtype]

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__, "onnxruntime": ort.__version__}

    def settings(self) -> dict:
        settings = self.engine_settings("")  # no graph: what every engine shares
        if self.cfg.quantize:
            settings |= {"quantize": self.cfg.quantize, "quantize_block": self.cfg.quantize_block, "quantize_head": self.cfg.quantize_head}
        return settings

    def engine_settings(self, graph: str) -> dict:
        """The settings one engine of `graph` is built with, for its cache key: the quantization only
        where it applies, so that export.quantize_head rebuilds only the head and an engine that
        stays in the export dtype keeps the unquantized export's key (its bytes are the same)."""
        settings = {"dtype": self.cfg.dtype, "opset": self.cfg.opset, "device": torch.device(self.cfg.device).type}
        if quant := engine_quant(graph, self.cfg):
            settings |= {"quantize": self.cfg.quantize, "quantize_block": quant.block}
        return settings

    def engine_files(self, stem: str) -> list[str]:
        return [f"{stem}.onnx", f"{stem}.onnx.data"]

    def build(self, specs: list[EngineSpec], dims: dict[str, Dim], stems: list[Path], engines_dir: Path | None = None) -> None:
        first = specs[0]
        quant = engine_quant(first.graph, self.cfg)
        if first.fused:  # built from fused operators, no trace
            for spec, stem in zip(specs, stems):
                start = time.perf_counter()
                weight_bytes = sum(p.numel() * p.element_size() for p in spec.module.parameters())
                path = Path(f"{stem}.onnx")
                fused.write_segment(spec, self.dtype, dims["capacity"].max, self.cfg.opset, path,
                                    external=weight_bytes > EXTERNAL_DATA_BYTES, quant=quant)
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
            if quant is None:
                program.save(path, external_data=weight_bytes > EXTERNAL_DATA_BYTES)
            else:  # a copy: the traced program keeps its float weights for the next engine of the graph
                model = ir.serde.deserialize_model(ir.serde.serialize_model(program.model))
                count = quantize_program(model, quant, self.dtype)
                log.info("%s: %d MatMul(s) as %d-bit MatMulNBits", spec.name, count, quant.bits)
                ir.save(model, path, external_data=f"{path.name}.data" if weight_bytes > EXTERNAL_DATA_BYTES else None)
            fsync_engine(path)
        log.info("%s: wrote %d engine(s), %.2f GB, in %.1f s", first.graph, len(specs),
                 sum(f.stat().st_size for st in stems for f in st.parent.glob(f"{st.name}.onnx*")) / 1e9, time.perf_counter() - traced)

    def load(self, path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], device: str) -> OrtSession:
        return OrtRuntime().load(path, inputs, outputs, device)


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
