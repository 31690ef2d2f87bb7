"""A GLM segment as ONNX Runtime's fused operators, the way its LLM model builder writes decoders.

Tracing the eager segment gives ONNX Runtime a few dozen small kernels per layer and a cache that
grows by concatenation; this graph gives it, per layer:

  SkipSimplifiedLayerNormalization   residual add + RMSNorm in one kernel (the residual comes out too)
  MatMul (+ Add)                     q, k and v packed into one matrix, GLM's biases in one add
  GroupQueryAttention                GLM's rotary inside (interleaved pairs, first half of each head,
                                     from cos/sin caches), the new keys/values written into the
                                     past buffers in place, attention over each row's own length
  MatMul, SkipSimplifiedLayerNorm    o projection, then the residual and the MLP's norm
  MatMul, Split, Sigmoid, Mul, Mul   gate and up in one matrix, SwiGLU
  MatMul                             down projection

and after the last layer one more SkipSimplifiedLayerNormalization: the residual (hidden_out) and
the exit norm of every position, the exit's hidden states (plus the exit's calibrated low-rank
adapter, two MatMuls and an Add, where the model has one): prefill samples from the last position,
a speculative verification from each. With weight-only
quantization (exporters/quantize.py) the four projections of each layer are MatMulNBits instead of
MatMul; the adapter, tiny, stays in the export dtype. GroupQueryAttention
has CUDA and CPU kernels, so CI runs the same graph as the GPU. Weights are stored transposed
([in, out]) as MatMul reads them; the inputs and outputs are exactly the segment's EngineSpec.
"""
from __future__ import annotations

from pathlib import Path

import onnx
import torch
from onnx import TensorProto, helper

from exporters.quantize import MS, WeightQuant
from model.glm import Segment
from contract.engines import EngineSpec, tensor_dtype

ONNX_TYPES = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16,
              torch.int64: TensorProto.INT64, torch.int32: TensorProto.INT32, torch.bool: TensorProto.BOOL,
              torch.uint8: TensorProto.UINT8}


IR_VERSION = 10  # what ONNX Runtime 1.20 and later load (onnx 1.18+ writes 11 and up by default)
EXTERNAL_ALIGN = 4096  # weights start on page boundaries in the .data file, so ONNX Runtime can map them


class Weights:
    """Initializers, written as they are made: into the model (small engines) or straight into
    `<model>.onnx.data` beside it (past protobuf's 2 GB), with no second copy of the bytes."""

    def __init__(self, data_path: Path | None):
        self.data_path = data_path
        self.file = open(data_path, "wb") if data_path else None
        self.protos: list[TensorProto] = []

    def add(self, name: str, t: torch.Tensor) -> str:
        t = t.detach().contiguous().cpu()
        array = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
        if self.file is None:
            self.protos.append(helper.make_tensor(name, ONNX_TYPES[t.dtype], list(t.shape), array.tobytes(), raw=True))
            return name
        offset = -self.file.tell() % EXTERNAL_ALIGN + self.file.tell()
        self.file.seek(offset)
        array.tofile(self.file)
        proto = TensorProto(name=name, data_type=ONNX_TYPES[t.dtype], dims=list(t.shape), data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.data_path.name), ("offset", str(offset)), ("length", str(array.nbytes))):
            proto.external_data.add(key=key, value=value)
        self.protos.append(proto)
        return name

    def close(self) -> None:
        if self.file:
            self.file.close()


def rotary_caches(segment: Segment, positions: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [positions, rot/2] of GLM's rotary: frequency i turns the pair (2i, 2i + 1)."""
    a = segment.args
    rot = int(a.head_dim * a.partial_rotary_factor)
    inv_freq = 1.0 / (a.rope_theta ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    freqs = torch.arange(positions, dtype=torch.float64)[:, None] * inv_freq  # [P, rot/2]
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def write_segment(spec: EngineSpec, dtype: torch.dtype, max_positions: int, opset: int, path: Path, external: bool,
                  quant: WeightQuant | None = None) -> None:
    """The segment's fused graph at `path` (+ `.data` beside it when `external`); with `quant`, its
    projections as MatMulNBits."""
    weights = Weights(Path(f"{path}.data") if external else None)
    try:
        model = segment_graph(spec, dtype, max_positions, opset, weights, quant)
    finally:
        weights.close()
    onnx.save_model(model, str(path))


def segment_graph(spec: EngineSpec, dtype: torch.dtype, max_positions: int, opset: int, weights: Weights,
                  quant: WeightQuant | None = None) -> onnx.ModelProto:
    segment: Segment = spec.module.segment
    a = segment.args
    eps = a.norm_eps
    nodes = []

    def weight(name: str, t: torch.Tensor) -> str:
        return weights.add(name, t.to(dtype))

    def node(op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs) -> list[str]:
        nodes.append(helper.make_node(op, inputs, outputs, name=outputs[0] or f"{op}_{len(nodes)}", domain=domain or None, **attrs))
        return outputs

    def linear(x: str, name: str, w: torch.Tensor, out: str) -> str:
        """x @ w (w [in, out]): a MatMul, or with `quant` a MatMulNBits over the packed weight."""
        if quant is None:
            return node("MatMul", [x, weight(name, w)], [out])[0]
        packed, scales = quant.pack(w, dtype)
        return node("MatMulNBits", [x, weights.add(f"{name}.q{quant.bits}", packed), weights.add(f"{name}.scales", scales)], [out],
                    MS, **quant.attributes(w))[0]

    cos, sin = rotary_caches(segment, max_positions, dtype)
    weight("cos_cache", cos)
    weight("sin_cache", sin)
    ffn = a.ffn_dim
    constants = [helper.make_tensor("gate_up_split", TensorProto.INT64, [2], [ffn, ffn])]

    h, branch = "hidden", None  # the residual stream, and the branch output still to be added to it
    for i, layer in enumerate(segment.layers):
        p = f"layers.{i}."
        attn = layer.self_attn
        ln1 = weight(p + "input_layernorm.weight", layer.input_layernorm.weight)
        if branch is None:
            (x,) = node("SimplifiedLayerNormalization", [h, ln1], [p + "attn_in"], axis=-1, epsilon=eps)
        else:
            x, _, _, h = node("SkipSimplifiedLayerNormalization", [branch, h, ln1], [p + "attn_in", "", "", p + "residual_in"],
                              MS, epsilon=eps)
        w_qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).t()  # [D, (H + 2 Hkv) hd]
        qkv = linear(x, p + "qkv_proj.weight.T", w_qkv, p + "qkv")
        if attn.q_proj.bias is not None:
            b_qkv = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
            (qkv,) = node("Add", [qkv, weight(p + "qkv_proj.bias", b_qkv)], [p + "qkv_biased"])
        past_key, past_value = f"past_key.{i}", f"past_value.{i}"
        (ctx, _, _) = node("GroupQueryAttention",
                           [qkv, "", "", past_key, past_value, "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"],
                           [p + "attn", f"present_key.{i}", f"present_value.{i}"], MS,
                           num_heads=a.n_heads, kv_num_heads=a.n_kv_heads, do_rotary=1, rotary_interleaved=1,
                           scale=a.head_dim ** -0.5)
        o = linear(ctx, p + "o_proj.weight.T", attn.o_proj.weight.t(), p + "attn_out")
        ln2 = weight(p + "post_attention_layernorm.weight", layer.post_attention_layernorm.weight)
        x, _, _, h = node("SkipSimplifiedLayerNormalization", [o, h, ln2], [p + "mlp_in", "", "", p + "residual_mid"], MS, epsilon=eps)
        gu = linear(x, p + "gate_up_proj.weight.T", layer.mlp.gate_up_proj.weight.t(), p + "gate_up")
        gate, up = node("Split", [gu, "gate_up_split"], [p + "gate", p + "up"], axis=-1)
        (sig,) = node("Sigmoid", [gate], [p + "gate_sigmoid"])
        (silu,) = node("Mul", [gate, sig], [p + "gate_silu"])
        (act,) = node("Mul", [silu, up], [p + "act"])
        branch = linear(act, p + "down_proj.weight.T", layer.mlp.down_proj.weight.t(), p + "mlp_out")
    exit_w = weight("exit_norm.weight", segment.exit_norm.weight)
    normed = "exit_hidden" if segment.exit_adapter is None else "exit_normed"
    node("SkipSimplifiedLayerNormalization", [branch, h, exit_w], [normed, "", "", "hidden_out"], MS, epsilon=eps)
    if segment.exit_adapter is not None:  # the calibrated low-rank adapter after the exit norm (model.glm.Segment.exit): n + up(down(n))
        (low,) = node("MatMul", [normed, weight("exit_adapter.down.weight.T", segment.exit_adapter.down.weight.t())], ["exit_low"])
        (delta,) = node("MatMul", [low, weight("exit_adapter.up.weight.T", segment.exit_adapter.up.weight.t())], ["exit_delta"])
        node("Add", [normed, delta], ["exit_hidden"])

    def value_info(t) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(t.name, ONNX_TYPES[tensor_dtype(t, dtype)], list(t.shape))

    graph = helper.make_graph(nodes, spec.graph, [value_info(t) for t in spec.inputs], [value_info(t) for t in spec.outputs],
                              [*weights.protos, *constants])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)],
                             producer_name="dyngraph", ir_version=IR_VERSION)
