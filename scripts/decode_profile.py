"""Where a decode step's time goes, on one GPU, through the runtime's own step functions.

For each path (exit 6 and full depth, text) and batch size: the time of a whole decode step as the
server runs it (runtime.step.Stepper.decode, then the greedy argmax and the one copy of the new ids
to the host), the time of its engines alone (the same captured graphs replayed back to back, CUDA
events), and the roofline (the weights a step reads over the copy bandwidth measured now). The
difference between the first two is the runtime around the engines. Also the time to first token
of a 512-token prompt (prefill and head, one sequence, after a first one of the same length:
ttft_first_call_ms, ONNX Runtime's first run at that length), and the step without CUDA graphs.

Run on the GPU host after an export:
    python3 scripts/decode_profile.py ENGINES_DIR/phone-9b/onnx --out profile.json

The process's GPU memory is sampled with the engines loaded and captured, and again after the runs
(prefill and decode grow ONNX Runtime's arenas). --ort-defaults measures ONNX Runtime's own memory
settings instead of the runtime's (exporters.ort.CUDA_SESSION_CONFIG, CUDA_PROVIDER_OPTIONS);
--session-config KEY=VALUE sets a session option (ep.cuda.fpa_intb_gemm=0: MatMulNBits's default kernel).

--ort-profile DIR runs ONNX Runtime's own profiler instead of the timings (bench/ort_profile.py):
sessions without CUDA graphs (a replay hides its nodes from the profiler), a warm-up, then the
phases a prefill of --prompt tokens at full depth the first time this length is seen, the same
prefill again, and --profile-steps decode steps at batch 1 at the first exit and at full depth; the
traces (DIR/traces) summarised per phase, engine and operator type into DIR/ours.json and ours.md.
On CUDA the node times are launch times unless CUDA_LAUNCH_BLOCKING=1 is set; the CUDA kernels of
each phase come from torch's profiler. scripts/peer_profile.py does the same for ORT GenAI's graph.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from pathlib import Path

import torch

import exporters.ort
from bench import ort_profile
from bench.baseline import copy_bandwidth, step_weight_bytes
from contract.config import RooflineSettings
from contract.manifest import Manifest
from runtime.engines import EngineSet
from runtime.step import Row, Stepper, bucket_for, captured_engines


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def synced_ms(fn, iters: int) -> list[float]:
    out = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        out.append(1e3 * (time.perf_counter() - start))
    return out


def engines_alone_ms(stepper: Stepper, depth: int, batch: int, iters: int) -> float:
    """The step's captured engine graphs replayed back to back, nothing between them."""
    b = bucket_for(batch, stepper.buckets)
    for _ in range(3):
        stepper.replay(b, depth)
    return statistics.median(synced_ms(lambda: stepper.replay(b, depth), iters))


def profile(stepper: Stepper, depth: int, batch: int, prompt: int, steps: int, alone: bool) -> dict:
    g = torch.Generator().manual_seed(depth * 100 + batch)
    vocab = stepper.vocab
    rows, ttft = [], None
    # a prefill at this length first: ONNX Runtime's first run at a new sequence length costs far more
    # than the prefill, and a server that has run a while has seen most lengths (kept as ttft_first_call_ms)
    sync()
    start = time.perf_counter()
    logits, _ = stepper.prefill("first call", torch.randint(0, vocab, (prompt,), generator=g).tolist(), depth, None)
    int(logits.argmax())
    first_call = 1e3 * (time.perf_counter() - start)
    stepper.release("first call")
    for i in range(batch):
        ids = torch.randint(0, vocab, (prompt,), generator=g).tolist()
        sync()
        start = time.perf_counter()
        logits, _ = stepper.prefill(i, ids, depth, None)
        token = int(logits.argmax())  # the first token reaches the host: what a client waits for
        if i == 0:
            ttft = 1e3 * (time.perf_counter() - start)
        rows.append(Row(i, depth, token))

    by_key = {r.key: r for r in rows}

    def step():
        keys, logits = stepper.decode(rows)
        for key, token in zip(keys, logits.argmax(-1).tolist()):  # the one copy of the new ids to the host
            by_key[key].token = token

    times = synced_ms(step, 3 + steps)[3:]
    result = {"depth_segments": depth, "batch": batch, "prompt_tokens": prompt, "ttft_ms": ttft, "ttft_first_call_ms": first_call,
              "step_ms_median": statistics.median(times), "step_ms_p90": sorted(times)[int(0.9 * len(times))]}
    if alone:
        result["engines_alone_ms"] = engines_alone_ms(stepper, depth, batch, steps)
    for i in range(batch):
        stepper.release(i)
    return result


def profile_with_ort(args: argparse.Namespace, manifest: Manifest) -> None:
    """ONNX Runtime's profiler over a cold and a warm prefill and batch-1 decode steps at the first exit and at full depth."""
    if manifest.backend["name"] != "onnx":
        raise SystemExit(f"--ort-profile profiles ONNX Runtime sessions; {args.engines} holds {manifest.backend['name']} engines")
    out = Path(args.ort_profile)
    exporters.ort.PROFILE_DIR = str(out / "traces")
    (out / "traces").mkdir(parents=True, exist_ok=True)
    engines = EngineSet(args.engines, placement=lambda e: args.device, verify=False)  # no CUDA graphs: a replay runs no nodes
    stepper = Stepper(engines, 1, args.capacity, cuda_graphs=False)
    text = manifest.model["config"]["text"]
    exits = text["exit_layers"]
    first, full = 1, len(exits)  # depths in segments
    for name in manifest.path(exits[-1], ["text"]).step:
        engines.session(name)
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(0, stepper.vocab, (n,), generator=g).tolist()
    row = Row(0, full, 0)

    def decode(rows: list[Row], steps: int) -> None:
        for _ in range(steps):
            keys, logits = stepper.decode(rows)
            rows[0].token = int(logits.argmax(-1)[0])  # the new id on the host, as the server needs it

    def prefill(key: int, n: int) -> int:
        logits, _ = stepper.prefill(key, ids(n), full, None)
        return int(logits.argmax())

    # warm-up at another length: the sessions' first runs (allocator, library handles) stay out of the phases
    row.token = prefill(0, max(1, args.prompt // 2))
    decode([row], 3)
    decode([Row(0, first, row.token)], 3)
    stepper.release(0)
    phases = ort_profile.Phases(sync, ort_profile.Kernels() if args.device.startswith("cuda") else None)
    with phases(f"prefill_{args.prompt}_first_call", 1, exits[-1]):
        prefill(1, args.prompt)  # ONNX Runtime's first run at this sequence length
    stepper.release(1)
    with phases(f"prefill_{args.prompt}", 1, exits[-1]):
        row = Row(2, full, prefill(2, args.prompt))
    decode([row], 2)
    with phases(f"decode_exit{exits[-1]}", args.profile_steps, exits[-1]):
        decode([row], args.profile_steps)
    shallow = Row(2, first, row.token)
    decode([shallow], 2)
    with phases(f"decode_exit{exits[0]}", args.profile_steps, exits[0]):
        decode([shallow], args.profile_steps)
    stepper.release(2)
    traces = [ort_profile.end_profiling(name, engines.sessions[name].session) for name in manifest.path(exits[-1], ["text"]).step]
    summary = ort_profile.summarise(traces, phases.phases)
    summary |= {"engines_dir": str(args.engines), "device": args.device, "dtype": manifest.dtype, "prompt_tokens": args.prompt}
    js, md = ort_profile.write(summary, out, "ours", f"Our engines ({Path(args.engines).name}, {manifest.dtype}, {args.device})")
    print(md.read_text())
    print(f"written: {js}, {md}, traces in {out / 'traces'}")


def process_gpu_bytes(device: str) -> int | None:
    """What NVML says this process holds on `device` (ONNX Runtime's arenas included, which torch cannot see)."""
    if not device.startswith("cuda"):
        return None
    import pynvml

    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.device(device).index or 0)
        return next((p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle) if p.pid == os.getpid()), None)
    finally:
        pynvml.nvmlShutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("engines")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--capacity", type=int, default=2048)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--graphs-only", action="store_true", help="on a GPU, skip the second pass without CUDA graphs")
    parser.add_argument("--ort-defaults", action="store_true", help="ONNX Runtime's own arena and initializer settings")
    parser.add_argument("--session-config", action="append", default=[], metavar="KEY=VALUE",
                        help="an ONNX Runtime session option for every CUDA session (repeatable)")
    parser.add_argument("--ort-profile", metavar="DIR", help="ONNX Runtime's profiler instead of the timings, into DIR")
    parser.add_argument("--profile-steps", type=int, default=8, help="with --ort-profile: decode steps per depth")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.ort_defaults:
        exporters.ort.CUDA_SESSION_CONFIG.clear()
        exporters.ort.CUDA_PROVIDER_OPTIONS.clear()
    for entry in args.session_config:
        key, _, value = entry.partition("=")
        exporters.ort.CUDA_SESSION_CONFIG[key] = value
    manifest = Manifest.load(Path(args.engines))
    if args.ort_profile:
        with torch.inference_mode():
            profile_with_ort(args, manifest)
        return
    max_batch = max(args.batches)
    bandwidth = copy_bandwidth(args.device, RooflineSettings())
    quantization = manifest.quantization or {}
    report = {"bandwidth_bytes_per_s": bandwidth.bytes_per_s, "dtype": manifest.dtype, "quantize": quantization.get("scheme"),
              "agreement": quantization.get("agreement"), "rows": [], "memory": [],
              "ort_session_config": dict(exporters.ort.CUDA_SESSION_CONFIG), "ort_provider_options": dict(exporters.ort.CUDA_PROVIDER_OPTIONS)}
    with torch.inference_mode():
        for graphs in ((True,) if args.graphs_only else (True, False)) if args.device.startswith("cuda") else (False,):
            captured = captured_engines(manifest) if graphs else ()
            engines = EngineSet(args.engines, placement=lambda e: args.device, verify=False, cuda_graphs=captured)
            exits = manifest.model["config"]["text"]["exit_layers"]
            stepper = Stepper(engines, max_batch, args.capacity, cuda_graphs=graphs)
            for name in dict.fromkeys(n for e in (exits[0], exits[-1]) for n in manifest.path(e, ["text"]).step):
                engines.session(name)
            stepper.capture()
            # the text path's engines and caches resident, graphs captured: what a full-depth text server holds
            report["memory"].append({"cuda_graphs": graphs, "process_gpu_bytes": process_gpu_bytes(args.device),
                                     "engine_bytes": sum(manifest.engines[n].bytes for n in engines.loaded()),
                                     "engines": engines.loaded(),
                                     "load_seconds": {n: round(engines.loads[n][1], 2) for n in engines.loaded()}})
            print(json.dumps(report["memory"][-1]), flush=True)
            for exit_layer in (exits[0], exits[-1]):
                path = manifest.path(exit_layer, ["text"])
                roofline_ms = 1e3 * step_weight_bytes(manifest, path) / bandwidth.bytes_per_s
                # without graphs on a GPU, batch 1 only: the comparison that says what capture buys
                for batch in args.batches if graphs or not args.device.startswith("cuda") else [1]:
                    row = profile(stepper, exits.index(exit_layer) + 1, batch, args.prompt, args.steps, alone=True)
                    row |= {"path": path.name, "cuda_graphs": graphs, "roofline_ms": roofline_ms,
                            "roofline_fraction": roofline_ms / row["step_ms_median"]}
                    report["rows"].append(row)
                    print(json.dumps(row), flush=True)
            report["memory"][-1]["process_gpu_bytes_after_runs"] = process_gpu_bytes(args.device)
            print(json.dumps(report["memory"][-1]), flush=True)
            del stepper, engines
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    print(f"\ncopy bandwidth {bandwidth.bytes_per_s / 1e12:.2f} TB/s")
    gib = lambda b: f"{b / 2**30:.2f} GiB" if b is not None else "n/a"
    for m in report["memory"]:
        print(f"graphs {m['cuda_graphs']}: engines {gib(m['engine_bytes'])}, process {gib(m['process_gpu_bytes'])} loaded and "
              f"captured, {gib(m['process_gpu_bytes_after_runs'])} after the runs")
    print(f"{'path':<12} {'graphs':>6} {'batch':>5} {'step ms':>8} {'engines ms':>10} {'other ms':>8} {'roofline':>8} {'fraction':>8} {'TTFT ms':>8} {'1st call':>8}")
    for r in report["rows"]:
        step, alone = r["step_ms_median"], r["engines_alone_ms"]
        print(f"{r['path']:<12} {str(r['cuda_graphs']):>6} {r['batch']:>5} {step:>8.2f} {alone:>10.2f} {step - alone:>8.2f} "
              f"{r['roofline_ms']:>8.2f} {r['roofline_fraction']:>8.0%} {r['ttft_ms']:>8.1f} {r['ttft_first_call_ms']:>8.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
