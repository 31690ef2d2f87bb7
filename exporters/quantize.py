"""Weight-only quantization: a MatMul's constant [K, N] weight as ONNX Runtime's MatMulNBits.

The weight is cut into blocks of `block` values along K, each stored as `bits`-bit integers with
one scale in the activations' dtype (symmetric: no zero points, ONNX Runtime centres the integers
itself). The numbers come from ONNX Runtime's own quantizer kernel (the one its
MatMulNBitsQuantizer calls), so the packing is exactly what its CPU and CUDA kernels read.
Activations stay in the export dtype; only the stored weight and the bytes a step reads shrink.

Two writers use it: the fused segment graph (exporters/fused.py) emits MatMulNBits directly, and
`quantize_program` rewrites the MatMuls of a traced engine (the LM head, the cross-attention).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch
from torch.onnx._internal.exporter._core import TorchTensor

from contract.config import ExportConfig

MS = "com.microsoft"  # ONNX Runtime's contrib operators (MatMulNBits, and the fused segment's)
BITS = {"int8": 8, "int4": 4}  # export.quantize -> MatMulNBits' bits
BLOCKS = (16, 32, 64, 128, 256)  # what MatMulNBits accepts (a power of two, at least 16)
# the graphs whose matrices are quantized (the decoder and the cross-attention); the encoders and
# the embedding table keep the export dtype
QUANTIZED_GRAPHS = ("segment", "cross_kv", "cross_attn")


@dataclass(frozen=True)
class WeightQuant:
    bits: int
    block: int

    def pack(self, weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """weight [K, N] (as MatMul reads it) -> (packed uint8 [N, K / block, block * bits / 8], scales [N, K / block])."""
        # imported here: the export stage reads BITS and engine_quant for every backend, and onnxruntime
        # is an optional extra that only the ONNX backend needs
        from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

        quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(block_size=self.block, is_symmetric=True, bits=self.bits))
        packed, scales, _ = quantizer.qbits_block_quant(np.ascontiguousarray(weight.detach().float().cpu().numpy()))
        return torch.from_numpy(packed), torch.from_numpy(scales).to(dtype)

    def attributes(self, weight: torch.Tensor) -> dict:
        k, n = weight.shape
        return {"K": k, "N": n, "bits": self.bits, "block_size": self.block}


def engine_quant(graph: str, cfg: ExportConfig) -> WeightQuant | None:
    """The quantization an engine of `graph` gets under `cfg`: the decoder's and cross-attention's
    matrices, and the LM head's with export.quantize_head; None for the rest and without export.quantize."""
    if cfg.quantize is None or not (graph.startswith(QUANTIZED_GRAPHS) or (cfg.quantize_head and graph == "lm_head")):
        return None
    return WeightQuant(BITS[cfg.quantize], cfg.quantize_block)


def quantize_program(model: ir.Model, quant: WeightQuant, dtype: torch.dtype) -> int:
    """Replace every MatMul of `model` whose second input is a constant 2-D weight, and every Gemm
    of a constant weight without bias (the LM head: x @ W.T), by MatMulNBits; returns how many."""
    graph = model.graph
    count = 0
    for node in list(graph):
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            continue
        w = node.inputs[1]
        if w is None or not w.is_initializer() or w.const_value is None or len(w.const_value.shape) != 2:
            continue
        weight = torch.from_numpy(np.array(w.const_value.numpy()))  # [K, N] for MatMul; a copy: the IR array is read-only
        if node.op_type == "Gemm":
            attrs = {k: a.value for k, a in node.attributes.items()}
            if len(node.inputs) > 2 or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
                continue
            weight = weight.t() if attrs.get("transB", 0) else weight
        packed, scales = quant.pack(weight, dtype)
        q = ir.Value(name=f"{w.name}.q{quant.bits}", const_value=TorchTensor(packed, f"{w.name}.q{quant.bits}"))
        s = ir.Value(name=f"{w.name}.scales", const_value=TorchTensor(scales, f"{w.name}.scales"))
        graph.register_initializer(q)
        graph.register_initializer(s)
        replacement = ir.node("MatMulNBits", [node.inputs[0], q, s], attributes=quant.attributes(weight), domain=MS,
                              name=f"{node.name}.nbits")
        old, new = node.outputs[0], replacement.outputs[0]
        name, old.name = old.name, f"{old.name}.float"  # free the name for the replacement
        new.name, new.type, new.shape = name, old.type, old.shape
        graph.insert_before(node, replacement)
        for i, out in enumerate(graph.outputs):  # the LM head writes the graph's output
            if out is old:
                graph.outputs[i] = new
        old.replace_all_uses_with(new)
        graph.remove(node, safe=True)
        if not w.uses():
            graph.initializers.pop(w.name)
        count += 1
    if count and MS not in model.opset_imports:
        model.opset_imports[MS] = 1
    return count
