"""One decode step (batch 1, one token, KV length 512) through one exported segment engine (six
phone-9b layers, fp16), four ways, against the copy-bandwidth roofline:

  onnx        the engine as exported, ONNX Runtime's CUDA provider with I/O binding
  onnx+fused  the same after onnxscript's ORT fusions (RMSNorm, attention -> contrib operators)
  torch       the eager module the engine came from
  torch graph the same module captured in a torch CUDA graph

Run on the GPU host after an export: python scripts/segment_microbench.py ENGINES_DIR [OUT_JSON]
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import onnx_ir as ir
import torch
from omegaconf import OmegaConf
from onnxscript.rewriter.ort_fusions import optimize_for_ort

from exporters.onnx import OrtSession
from model.autoglm import ModelConfig, meta_model
from pipeline.baseline import copy_bandwidth
from pipeline.config import RooflineSettings
from pipeline.engines import SegmentEngine
from pipeline.manifest import Manifest

PAST, ITERS = 512, 50


def timed(fn, iters: int = ITERS) -> float:
    """Median milliseconds per call, CUDA events around each."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    directory = Path(sys.argv[1]) / "phone-9b" / "onnx"
    manifest = Manifest.load(directory)
    record = manifest.engines["segment.0"]
    device = torch.device("cuda:0")
    cfg = manifest.model["config"]
    feeds = {
        "hidden": torch.randn(1, 1, cfg["text"]["dim"], device=device, dtype=torch.float16),
        "position_ids": torch.full((1, 1), PAST, device=device, dtype=torch.long),
        "kv_mask": torch.ones(1, PAST, device=device, dtype=torch.bool),
        "kv": torch.randn(6, 2, 1, cfg["text"]["n_kv_heads"], PAST, cfg["text"]["head_dim"], device=device, dtype=torch.float16),
    }
    weight_bytes = record.parameters * 2
    bandwidth = copy_bandwidth(str(device), RooflineSettings()).bytes_per_s  # the bench's measure: read + written
    roofline_ms = weight_bytes / bandwidth * 1e3
    results = {"weights_gb": weight_bytes / 1e9, "bandwidth_gb_s": bandwidth / 1e9, "roofline_ms": roofline_ms, "past": PAST}

    session = OrtSession(directory / record.path, record.input_specs(), record.output_specs(), "cuda:0")
    results["onnx"] = timed(lambda: session.run(feeds))
    del session

    start = time.perf_counter()
    model = ir.load(directory / record.path)
    fusions = optimize_for_ort(model)
    fused_path = Path("/tmp/segment0-fused.onnx")
    ir.save(model, fused_path, external_data="segment0-fused.onnx.data")
    results["fusion_seconds"] = time.perf_counter() - start
    results["fusions"] = {k: v for k, v in (fusions[1] if isinstance(fusions, tuple) else fusions).items() if v}
    del model
    session = OrtSession(fused_path, record.input_specs(), record.output_specs(), "cuda:0")
    results["onnx+fused"] = timed(lambda: session.run(feeds))
    del session

    # the eager module the engine was exported from (random weights: timing only)
    model_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg))
    segment = SegmentEngine(meta_model(model_cfg).text.segments[0])
    segment.to(torch.float16).to_empty(device=device).requires_grad_(False)
    for p in segment.parameters():
        p.normal_(0.0, 0.02)
    args = tuple(feeds.values())
    with torch.inference_mode():
        results["torch"] = timed(lambda: segment(*args))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                segment(*args)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            segment(*args)
        results["torch graph"] = timed(graph.replay)

    print(f"one decode step through segment.0 (6 layers, {weight_bytes / 1e9:.2f} GB fp16, KV {PAST}) on {torch.cuda.get_device_name()}")
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s -> roofline {roofline_ms:.2f} ms; fusions {results['fusions']}")
    for name in ("onnx", "onnx+fused", "torch", "torch graph"):
        print(f"  {name:<12} {results[name]:7.2f} ms  {roofline_ms / results[name]:5.0%} of roofline")
    if len(sys.argv) > 2:
        Path(sys.argv[2]).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
