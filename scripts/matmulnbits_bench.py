"""ONNX Runtime's MatMulNBits (int8 / int4 weights, block 32, symmetric) against an fp16 MatMul, per
decoder matrix of a model's dims, on the CUDA provider with CUDA graphs: what weight-only
quantization can buy a decode step before it is built into the engines, with each of the CUDA
provider's two MatMulNBits kernels (its default dequantizing one, and fpA_intB, TensorRT-LLM's
weight-only GEMV/GEMM, which ONNX Runtime turns on with ORT_FPA_INTB_GEMM=1 or this session option).

Each case is a one-node model, packed as the exporter packs it (exporters.quantize.WeightQuant), run
through I/O binding on torch buffers and replayed as a CUDA graph; the figure is the median of
`--iters` replays timed with CUDA events, and the achieved bandwidth is the weight bytes stored over
that time.

    python3 scripts/matmulnbits_bench.py --out matmulnbits.json            # phone-9b's matrices, M = 1 and 16
"""
from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from exporters.quantize import MS, WeightQuant

BLOCK = 32
FPA_INTB_GEMM = "ep.cuda.fpa_intb_gemm"  # ONNX Runtime's session option for ORT_FPA_INTB_GEMM
KERNELS = {"default": "0", "fpa_intb": "1"}  # the CUDA provider's MatMulNBits kernels, by FPA_INTB_GEMM
# phone-9b: hidden 4096, 32 query heads and 2 KV heads of 128, FFN 13696, vocabulary 151552
SHAPES = {"qkv": (4096, 4608), "o": (4096, 4096), "gate_up": (4096, 27392), "down": (13696, 4096), "lm_head": (4096, 151552)}


def model(k: int, n: int, bits: int | None, weight: np.ndarray) -> tuple[onnx.ModelProto, int]:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["m", k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["m", n])
    if bits is None:
        inits = [helper.make_tensor("w", TensorProto.FLOAT16, [k, n], weight.tobytes(), raw=True)]
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
        stored = weight.nbytes
    else:
        quant, w = WeightQuant(bits, BLOCK), torch.from_numpy(weight)
        packed, scales = (t.numpy() for t in quant.pack(w, torch.float16))
        inits = [helper.make_tensor("wq", TensorProto.UINT8, list(packed.shape), packed.tobytes(), raw=True),
                 helper.make_tensor("scales", TensorProto.FLOAT16, list(scales.shape), scales.tobytes(), raw=True)]
        node = helper.make_node("MatMulNBits", ["x", "wq", "scales"], ["y"], domain=MS, **quant.attributes(w))
        stored = packed.nbytes + scales.nbytes
    graph = helper.make_graph([node], "m", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS, 1)], ir_version=10), stored


def time_case(proto: onnx.ModelProto, m: int, k: int, n: int, iters: int, kernel: str) -> tuple[float, torch.Tensor]:
    stream = torch.cuda.Stream()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry(FPA_INTB_GEMM, KERNELS[kernel])
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=[
        ("CUDAExecutionProvider", {"device_id": 0, "enable_cuda_graph": "1", "user_compute_stream": str(stream.cuda_stream)})])
    x = torch.randn(m, k, dtype=torch.float16, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    y = torch.empty(m, n, dtype=torch.float16, device="cuda")
    binding = session.io_binding()
    binding.bind_input("x", "cuda", 0, np.float16, (m, k), x.data_ptr())
    binding.bind_output("y", "cuda", 0, np.float16, (m, n), y.data_ptr())
    run = ort.RunOptions()
    run.add_run_config_entry("gpu_graph_id", "1")
    torch.cuda.synchronize()
    for _ in range(3):  # the first run captures
        session.run_with_iobinding(binding, run)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        session.run_with_iobinding(binding, run)
        end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), y.float().cpu()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    results = []
    reference = {}
    for name, (k, n) in SHAPES.items():
        weight = (rng.standard_normal((k, n), dtype=np.float32) * 0.02).astype(np.float16)
        for bits in (None, 8, 4):
            proto, stored = model(k, n, bits, weight)
            for kernel in ("default",) if bits is None else KERNELS:
                for m in args.batches:
                    ms, y = time_case(proto, m, k, n, args.iters, kernel)
                    if bits is None:
                        reference[m] = y
                    err = float((y - reference[m]).abs().max() / reference[m].abs().max())
                    row = {"matrix": name, "k": k, "n": n, "bits": bits or 16, "kernel": kernel if bits else "MatMul", "m": m,
                           "ms": round(ms, 4), "stored_bytes": stored, "gb_per_s": round(stored / ms / 1e6, 1),
                           "max_rel_error_vs_fp16": round(err, 5)}
                    results.append(row)
                    print(json.dumps(row), flush=True)
    print(f"\n{'matrix':<8} {'M':>3} {'fp16 ms':>8}" + "".join(f" {f'int{b} {k}':>15}" for b in (8, 4) for k in KERNELS))
    for name in SHAPES:
        for m in args.batches:
            at = {(r["bits"], r["kernel"]): r["ms"] for r in results if r["matrix"] == name and r["m"] == m}
            base = at[16, "MatMul"]
            print(f"{name:<8} {m:>3} {base:>8.4f}" + "".join(f" {at[b, k]:>8.4f} {base / at[b, k]:>4.2f}x" for b in (8, 4) for k in KERNELS))
    with open(args.out, "w") as f:
        json.dump({"onnxruntime": ort.__version__, "device": torch.cuda.get_device_name(), "block_size": BLOCK, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
