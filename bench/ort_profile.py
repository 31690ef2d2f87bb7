"""ONNX Runtime's own profiler, read back: where a step's time goes, per engine and per operator.

A session made with profiling on (exporters.ort.PROFILE_DIR, or SessionOptions.enable_profiling)
writes, once its InferenceSession's end_profiling() is called, one JSON trace of all its runs: a
`model_run` event per run and a `<node>_kernel_time` event per node executed, with its operator
type and execution provider. Their `ts` counts microseconds from the session's profiling start
(InferenceSession.get_profiling_start_time_ns(), on the wall clock time.time_ns() reads), so each
run and node belongs to the phase (a prefill, N decode steps) whose wall-clock window holds it:
`Phases` records the windows, `summarise` divides what fell in each by its steps.

What a node's time is depends on the provider. On the CPU it is the kernel's run. On CUDA it is the
host's side of the node (launching its kernels, and whatever it waits for): kernels run
asynchronously, and ONNX Runtime's release builds have no CUDA activity profiler. Under
CUDA_LAUNCH_BLOCKING=1 each launch returns when its kernel has finished, so a node's time is then
its kernels' GPU time plus one launch each (`launch_blocking` in the summary says which). `Kernels`
adds the GPU's own record on CUDA: the kernels and copies of the process, as CUPTI sees them
through torch's profiler, counted and timed per phase, whichever library launched them.

A node's decoder layer is read from its name (`layers.<i>.` in our segments, `/model/layers.<i>/`
in ORT GenAI's builder output; ONNX Runtime's fusions keep the first node's name): per phase, the
nodes in layers are counted per layer, the others (embedding, attention-mask arithmetic, final
norm, LM head) apart.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

LAYER = re.compile(r"layers[./](\d+)[./]")
CPU_PROVIDER = "CPUExecutionProvider"


@dataclass
class Phase:
    name: str  # e.g. "decode_exit6", "prefill_512"
    steps: int  # decode steps (or prefills) in the window
    layers: int  # decoder layers one step runs
    start_ns: int = 0
    end_ns: int = 0
    kernels: dict | None = None  # Kernels' record of the window, on CUDA


class Phases:
    """The wall-clock windows of a run's phases; `sync` waits for the device before each mark."""

    def __init__(self, sync: Callable[[], None], kernels: "Kernels | None" = None):
        self.sync, self.kernels, self.phases = sync, kernels, []

    @contextlib.contextmanager
    def __call__(self, name: str, steps: int, layers: int):
        phase = Phase(name, steps, layers)
        with self.kernels.record(phase) if self.kernels else contextlib.nullcontext():
            self.sync()
            phase.start_ns = time.time_ns()
            yield phase
            self.sync()
            phase.end_ns = time.time_ns()
        self.phases.append(phase)


class Kernels:
    """The CUDA work of a phase as CUPTI records it through torch's profiler (kernels, copies and
    memsets of every library in the process): how many per step, their GPU time per step, and the
    ten that take the most."""

    def __init__(self):
        import torch

        self.cuda = torch.autograd.DeviceType.CUDA

    @contextlib.contextmanager
    def record(self, phase: Phase):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            yield
        by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        for e in prof.profiler.kineto_results.events():
            if e.device_type() == self.cuda:
                by_name[e.name()][0] += 1
                by_name[e.name()][1] += e.duration_ns() / 1e3  # microseconds
        n = max(phase.steps, 1)
        top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:10]
        phase.kernels = {"kernels_per_step": sum(c for c, _ in by_name.values()) / n,
                         "gpu_us_per_step": sum(t for _, t in by_name.values()) / n,
                         "top": [{"kernel": name[:120], "per_step": c / n, "us_per_step": t / n} for name, (c, t) in top]}


@dataclass
class Trace:
    """One session's trace file and its profiling start on the wall clock."""

    engine: str
    path: str
    start_ns: int


def end_profiling(engine: str, session) -> Trace:
    """Close an onnxruntime.InferenceSession's trace (profiling stops for it) and say where it is."""
    start = session.get_profiling_start_time_ns()
    return Trace(engine, session.end_profiling(), start)


@dataclass
class OpFigures:
    nodes: float = 0.0
    us: float = 0.0


@dataclass
class EngineFigures:
    runs: float = 0.0
    run_us: float = 0.0  # the runs' own time (host side on CUDA): nodes plus the run's setup, allocations, end sync
    nodes: float = 0.0
    node_us: float = 0.0
    ops: dict[str, OpFigures] = field(default_factory=dict)


def summarise(traces: list[Trace], phases: list[Phase]) -> dict:
    """Per phase, per step: its wall time; per engine its runs, nodes and their time, per operator
    type; over all engines the same per operator type, with the nodes inside decoder layers per layer."""
    runs, nodes = [], []
    for trace in traces:
        for e in json.loads(Path(trace.path).read_text()):
            at = trace.start_ns + int(e.get("ts", 0) * 1000)
            if e.get("cat") == "Session" and e.get("name") == "model_run":
                runs.append((trace.engine, at, e["dur"]))
            elif e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                args = e.get("args", {})
                nodes.append((trace.engine, at, e["dur"], args.get("op_name", "?"), args.get("provider", ""), e["name"]))
    on_cuda = any(provider.startswith("CUDA") for *_, provider, _ in nodes)
    out = []
    for p in phases:  # totals over the window first, then per step: counts stay whole until the one division
        engines: dict[str, EngineFigures] = {}
        ops: dict[str, dict] = {}
        for engine, at, dur in runs:
            if p.start_ns <= at <= p.end_ns:
                fig = engines.setdefault(engine, EngineFigures())
                fig.runs += 1
                fig.run_us += dur
        for engine, at, dur, op, provider, name in nodes:
            if not p.start_ns <= at <= p.end_ns:
                continue
            label = f"{op} (CPU)" if on_cuda and provider == CPU_PROVIDER else op  # shape arithmetic a CUDA session leaves on the host
            fig = engines.setdefault(engine, EngineFigures())
            fig.nodes += 1
            fig.node_us += dur
            op_fig = fig.ops.setdefault(label, OpFigures())
            op_fig.nodes += 1
            op_fig.us += dur
            layer = LAYER.search(name)
            in_layer = layer is not None and int(layer.group(1)) < p.layers  # the builder names its final norm after layer N
            row = ops.setdefault(label, {"nodes_per_step": 0, "us_per_step": 0.0, "layer_nodes_per_step": 0, "layer_us_per_step": 0.0})
            row["nodes_per_step"] += 1
            row["us_per_step"] += dur
            row["layer_nodes_per_step"] += in_layer
            row["layer_us_per_step"] += dur if in_layer else 0
        n = max(p.steps, 1)
        for fig in engines.values():
            fig.runs, fig.run_us, fig.nodes, fig.node_us = fig.runs / n, fig.run_us / n, fig.nodes / n, fig.node_us / n
            for op_fig in fig.ops.values():
                op_fig.nodes, op_fig.us = op_fig.nodes / n, op_fig.us / n
        for row in ops.values():
            for key in ("nodes_per_step", "us_per_step", "layer_nodes_per_step", "layer_us_per_step"):
                row[key] /= n
            row["nodes_per_layer"] = row["layer_nodes_per_step"] / p.layers if p.layers else None
            row["us_per_layer"] = row["layer_us_per_step"] / p.layers if p.layers else None
        total_nodes = sum(r["nodes_per_step"] for r in ops.values())
        layer_nodes = sum(r["layer_nodes_per_step"] for r in ops.values())
        out.append({"name": p.name, "steps": p.steps, "layers": p.layers, "wall_ms_per_step": (p.end_ns - p.start_ns) / 1e6 / n,
                    "runs_per_step": sum(f.runs for f in engines.values()),
                    "run_us_per_step": sum(f.run_us for f in engines.values()),
                    "nodes_per_step": total_nodes, "node_us_per_step": sum(f.node_us for f in engines.values()),
                    "nodes_per_layer": layer_nodes / p.layers if p.layers else None,
                    "nodes_outside_layers_per_step": total_nodes - layer_nodes,
                    "engines": {name: {**asdict(f), "ops": {k: asdict(v) for k, v in sorted(f.ops.items(), key=lambda kv: -kv[1].us)}}
                                for name, f in engines.items()},
                    "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]["us_per_step"])), "kernels": p.kernels})
    return {"on_cuda": on_cuda, "launch_blocking": on_cuda and os.environ.get("CUDA_LAUNCH_BLOCKING") == "1",
            "traces": [asdict(t) for t in traces], "phases": out}


def what_node_time_is(summary: dict) -> str:
    if not summary["on_cuda"]:
        return "node time: the kernel's run on the CPU"
    if summary["launch_blocking"]:
        return "node time: its CUDA kernels' time plus one launch each (CUDA_LAUNCH_BLOCKING=1)"
    return "node time: the host's side of each node (kernel launches; the GPU runs them asynchronously): rerun with CUDA_LAUNCH_BLOCKING=1 for kernel time"


def fmt(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def markdown(summary: dict, title: str) -> str:
    """One table per phase: per engine, then per operator type."""
    out = [f"# {title}", "", f"ONNX Runtime's profiler; per step of each phase; {what_node_time_is(summary)}.", ""]
    for p in summary["phases"]:
        out += [f"## {p['name']}: {p['steps']} step(s), {p['layers']} layers, {fmt(p['wall_ms_per_step'], 3)} ms per step (wall, synchronised)", "",
                f"{fmt(p['runs_per_step'])} session runs, {fmt(p['nodes_per_step'])} nodes per step ({fmt(p['nodes_per_layer'], 2)} per decoder "
                f"layer, {fmt(p['nodes_outside_layers_per_step'])} outside the layers); node time {fmt(p['node_us_per_step'])} µs, "
                f"runs {fmt(p['run_us_per_step'])} µs per step.", ""]
        if p["kernels"]:
            k = p["kernels"]
            out += [f"CUDA kernels and copies (CUPTI): {fmt(k['kernels_per_step'])} per step, {fmt(k['gpu_us_per_step'])} µs of GPU time per step.", ""]
        out += ["| engine | runs | nodes | node µs | run µs |", "|---|---:|---:|---:|---:|"]
        out += [f"| {name} | {fmt(e['runs'])} | {fmt(e['nodes'])} | {fmt(e['node_us'])} | {fmt(e['run_us'])} |" for name, e in p["engines"].items()]
        out += ["", "| operator | nodes | µs | nodes per layer | µs per layer |", "|---|---:|---:|---:|---:|"]
        out += [f"| {op} | {fmt(r['nodes_per_step'])} | {fmt(r['us_per_step'])} | {fmt(r['nodes_per_layer'], 2)} | {fmt(r['us_per_layer'], 2)} |"
                for op, r in p["ops"].items()]
        if p["kernels"]:
            out += ["", "| kernel (top 10 by GPU time) | per step | µs per step |", "|---|---:|---:|"]
            out += [f"| `{k['kernel']}` | {fmt(k['per_step'])} | {fmt(k['us_per_step'])} |" for k in p["kernels"]["top"]]
        out.append("")
    return "\n".join(out)


def side_by_side(ours: dict, peer: dict, pairs: list[tuple[str, str]]) -> str:
    """Our phases beside the peer's, per operator type, per decoder layer: (our phase, peer phase) pairs."""
    by_name = lambda s: {p["name"]: p for p in s["phases"]}
    a, b = by_name(ours), by_name(peer)
    out = ["# Our engines beside ORT GenAI's graph, per decoder layer", "",
           f"ONNX Runtime's profiler on both; ours: {what_node_time_is(ours)}; the peer: {what_node_time_is(peer)}.", ""]
    for mine, theirs in pairs:
        if mine not in a or theirs not in b:
            out += [f"({mine} beside {theirs}: not both profiled)", ""]
            continue
        p, q = a[mine], b[theirs]
        out += [f"## {mine} ({p['layers']} layers) beside the peer's {theirs} ({q['layers']} layers)", "",
                f"Wall per step: ours {fmt(p['wall_ms_per_step'], 3)} ms, the peer's {fmt(q['wall_ms_per_step'], 3)} ms. "
                f"Nodes per decoder layer: ours {fmt(p['nodes_per_layer'], 2)}, the peer's {fmt(q['nodes_per_layer'], 2)}; outside the "
                f"layers per step: ours {fmt(p['nodes_outside_layers_per_step'])} in {fmt(p['runs_per_step'])} session runs, the peer's "
                f"{fmt(q['nodes_outside_layers_per_step'])} in {fmt(q['runs_per_step'])}.", ""]
        if p["kernels"] and q["kernels"]:
            out += [f"CUDA kernels per step: ours {fmt(p['kernels']['kernels_per_step'])} ({fmt(p['kernels']['gpu_us_per_step'])} µs GPU), "
                    f"the peer's {fmt(q['kernels']['kernels_per_step'])} ({fmt(q['kernels']['gpu_us_per_step'])} µs GPU).", ""]
        out += ["| operator | ours: nodes per layer | ours: µs per layer | peer: nodes per layer | peer: µs per layer | ours: µs per step | peer: µs per step |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        empty = {"nodes_per_layer": 0.0, "us_per_layer": 0.0, "us_per_step": 0.0}
        for op in dict.fromkeys([*p["ops"], *q["ops"]]):
            x, y = p["ops"].get(op, empty), q["ops"].get(op, empty)
            out.append(f"| {op} | {fmt(x['nodes_per_layer'], 2)} | {fmt(x['us_per_layer'], 2)} | {fmt(y['nodes_per_layer'], 2)} | "
                       f"{fmt(y['us_per_layer'], 2)} | {fmt(x['us_per_step'])} | {fmt(y['us_per_step'])} |")
        out.append("")
    return "\n".join(out)


def write(summary: dict, directory: Path, stem: str, title: str) -> tuple[Path, Path]:
    """`stem`.json and `stem`.md in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    js, md = directory / f"{stem}.json", directory / f"{stem}.md"
    js.write_text(json.dumps(summary, indent=1))
    md.write_text(markdown(summary, title))
    return js, md
