"""The bench report: report.json (versioned, what `compare` reads), report.md and PNG plots.

Everything in the report is computed from what the run measured; a figure that could not be
measured (energy on a CPU, a yardstick that was switched off) is null with the reason beside it,
never filled in. `metrics` flattens the figures that `compare` checks, each with its unit, its
kind, the scope across which it may be compared and which direction is better:

  scope "any"            what ran, not how fast: exit shares, weights read per token, engine bytes
                         loaded, failed requests, tokens equal to full-depth greedy
  scope "device_kind"    peak memory (and its dynamic/static ratio): a GPU's against a GPU's, a host's
                         RSS against a host's
  scope "machine_class"  whatever a clock or an energy counter measured, ratios of them included
                         (latency, throughput, energy, roofline fractions, against transformers or
                         the peer): only against a report from the same machine class (below)
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from bench.baseline import encode_weight_bytes, step_engine_bytes
from contract.config import BenchApp
from contract.manifest import Manifest, write_atomic
from bench.quality import quality_block

SCHEMA_VERSION = 2
REPORT_KIND = "dyngraph-bench-report"
MODE_TITLES = {"static": "Static graph", "dynamic": "Dynamic graph"}
COLORS = {"static": "#4c72b0", "dynamic": "#dd8452"}
# the targets for the default mix on the GPU host: reported against, never tuned toward
TARGETS = [
    ("ratio.mean_latency", "dynamic/static mean latency", "<=", 0.5),
    ("ratio.peak_memory", "dynamic/static peak memory", "<=", 0.65),
    ("ratio.energy_per_request", "dynamic/static energy per request", "<=", 0.55),
    ("roofline.full_depth_fraction", "full-depth decode at batch 1, fraction of roofline (exit 24 text path, else static)", ">=", 0.5),
    ("ratio.transformers_over_dynamic_tpot", "per-token speed-up over transformers' generate", ">=", 5.0),
    ("ratio.over_peer.full_depth", "full-depth text decode at batch 1 over ORT GenAI's at the same depth", "<=", 1.0),
    ("ratio.over_peer.first_exit", "first-exit text decode at batch 1 over ORT GenAI's at that depth", "<=", 1.0),
]


# --- the machine ----------------------------------------------------------------------------


def machine_class(kind: str, name: str, placement: str, gpu_count: int, cpu_cores: int | None) -> str:
    """What a run's timings depend on besides the code and the engines: two reports' times, energy
    and their ratios are compared only when this string is equal. A GPU run: how many GPUs of which
    model, and the placement over them; a CPU run: the CPU model and its cores (ONNX Runtime's
    threads, and what the server and the bench client share)."""
    if kind == "cpu":
        return f"cpu: {name}, {cpu_cores} cores, placement {placement}"
    return f"{kind}: {gpu_count} x {name}, placement {placement}"


# --- statistics -----------------------------------------------------------------------------


def stats(values: list[float | None]) -> dict | None:
    v = [x for x in values if x is not None]
    if not v:
        return None
    a = np.asarray(v, dtype=float)
    return {"n": len(v), "mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "min": float(a.min()), "max": float(a.max())}


def get(d: dict | None, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return default
        d = d[k]
    return d


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


# --- summaries --------------------------------------------------------------------------------


def path_table(manifest: Manifest) -> dict[str, dict]:
    """Each exported path with the bytes of weights its decode step and its encode phase read."""
    table = {}
    for p in manifest.paths:
        per_engine = step_engine_bytes(manifest, p)
        table[p.name] = {"exit_layer": p.exit_layer, "modalities": list(p.modalities), "static": p.static, "step": list(p.step),
                         "encode": list(p.encode), "step_engine_bytes": per_engine, "step_weight_bytes": sum(per_engine.values()),
                         "encode_weight_bytes": encode_weight_bytes(manifest, p)}
    return table


def summarize(records: list[dict], paths: dict[str, dict], exit_layers: list[int]) -> dict:
    """Latency statistics, the exit histogram and the work of a set of request records."""
    ok = [r for r in records if r["ok"]]
    tokens = sum(r["completion_tokens"] or 0 for r in ok)
    histogram = {str(layer): 0 for layer in exit_layers}
    by_path: dict[str, int] = {}
    for r in ok:
        layer = r["exit_layer"] if r["exit_layer"] is not None else get(paths, r["path"], "exit_layer")
        if layer is not None:
            histogram[str(layer)] = histogram.get(str(layer), 0) + 1
        by_path[r["path"]] = by_path.get(r["path"], 0) + 1
    known = [r for r in ok if r["path"] in paths]
    full = max(exit_layers)
    # work: the decode weights each generated token made the server read, token-weighted
    weight_bytes = sum((r["completion_tokens"] or 0) * paths[r["path"]]["step_weight_bytes"] for r in known)
    known_tokens = sum(r["completion_tokens"] or 0 for r in known)
    return {
        "requests": len(records), "ok": len(ok), "failed": len(records) - len(ok),
        "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in ok), "completion_tokens": tokens,
        "latency_s": stats([r["latency_s"] for r in ok]), "ttft_s": stats([r["ttft_s"] for r in ok]),
        "tpot_s": stats([r["tpot_s"] for r in ok]),
        "exit_histogram": histogram, "paths": dict(sorted(by_path.items())),
        "early_exit_share": sum(v for k, v in histogram.items() if int(k) < full) / len(ok) if ok else None,
        "weight_bytes_per_token": weight_bytes / known_tokens if known_tokens else None,
        "encode_weight_bytes_per_request": sum(paths[r["path"]]["encode_weight_bytes"] for r in known) / len(known) if known else None,
    }


def request_record(r) -> dict:
    d = asdict(r)
    for k in ("devices", "engines", "modalities"):  # per path, not per request: see the mode's path table
        d.pop(k)
    return d


def run_memory(run, gpu_labels: list[str], baseline_used: dict[str, int | None]) -> dict:
    """Peak memory of one run, per device and in total; `method` says what the total counts."""
    devices: dict[str, dict] = {}
    server_devices = run.stats.get("devices") or {}
    for label in sorted(set(server_devices) | set(gpu_labels)):
        figures = server_devices.get(label) or {}
        entry = {"torch_peak_allocated_bytes": figures.get("torch_peak_allocated_bytes")}
        if label in gpu_labels:
            device_peak, base = run.memory.device_used.get(label), baseline_used.get(label)
            entry |= {"nvml_process_peak_bytes": run.memory.process_used.get(label),
                      "nvml_device_peak_bytes": device_peak,
                      "nvml_device_delta_bytes": device_peak - base if device_peak is not None and base is not None else None}
        devices[label] = entry
    if gpu_labels:
        process = [devices[g].get("nvml_process_peak_bytes") for g in gpu_labels]
        delta = [devices[g].get("nvml_device_delta_bytes") for g in gpu_labels]
        if all(v is not None for v in process):
            total, method = sum(process), "GPU memory NVML attributes to the server process, summed over its GPUs"
        elif all(v is not None for v in delta):
            # a container's PID namespace hides the server from NVML's process list
            total, method = sum(delta), "GPU memory in use (NVML) minus what was in use before the server started, summed over its GPUs"
        else:
            total, method = None, "no NVML memory samples"
    else:
        total, method = run.memory.host_rss, "resident memory (RSS) of the server process"
    allocated = [e["torch_peak_allocated_bytes"] for e in devices.values() if e.get("torch_peak_allocated_bytes") is not None]
    return {"peak_memory_bytes": total, "method": method, "host_peak_rss_bytes": run.memory.host_rss,
            "peak_allocated_bytes": sum(allocated) if allocated else None, "devices": devices, "samples": run.memory.samples}


def max_or_none(values) -> int | float | None:
    v = [x for x in values if x is not None]
    return max(v) if v else None


def mode_block(result, paths: dict[str, dict], exit_layers: list[int], manifest: Manifest) -> dict:
    runs = []
    for run in result.runs:
        records = [request_record(r) for r in run.requests]
        summary = summarize(records, paths, exit_layers)
        summary |= {"duration_s": run.duration_s, "requests_per_s": summary["ok"] / run.duration_s,
                    "tokens_per_s": summary["completion_tokens"] / run.duration_s}
        energy = {"total_j": run.energy.joules, "per_device_j": run.energy.per_device_j, "reason": run.energy.reason,
                  "per_request_j": run.energy.joules / summary["ok"] if run.energy.joules is not None and summary["ok"] else None}
        runs.append({"concurrency": run.concurrency, "request_rate": run.request_rate, "summary": summary,
                     "memory": run_memory(run, result.gpu_labels, result.baseline_device_used), "energy": energy,
                     "engines_loaded": run.stats.get("engines_loaded"), "requests_per_path": run.stats.get("requests_per_path"),
                     "requests": records})
    pooled = summarize([r for run in runs for r in run["requests"]], paths, exit_layers)
    duration = sum(r["summary"]["duration_s"] for r in runs)
    pooled |= {"duration_s": duration, "requests_per_s": pooled["ok"] / duration if duration else None,
               "tokens_per_s": pooled["completion_tokens"] / duration if duration else None}
    energies = [r["energy"]["total_j"] for r in runs]
    reasons = [r["energy"]["reason"] for r in runs if r["energy"]["reason"]]
    total_j = sum(energies) if energies and all(e is not None for e in energies) else None
    loaded = runs[-1]["engines_loaded"] or []
    memory_devices: dict[str, dict] = {}
    for run in runs:
        for label, figures in run["memory"]["devices"].items():
            slot = memory_devices.setdefault(label, {})
            for k, v in figures.items():
                slot[k] = max_or_none([slot.get(k), v])
    return {
        "server": {"command": result.command, "startup_s": result.startup_s, "log": result.log_file, "gpus": result.gpu_labels},
        "paths": {name: {**info, "step_weight_bytes": get(paths, name, "step_weight_bytes")} for name, info in sorted(result.paths.items())},
        "runs": runs,
        "summary": pooled,
        "memory": {"peak_memory_bytes": max_or_none(r["memory"]["peak_memory_bytes"] for r in runs),
                   "method": runs[0]["memory"]["method"],
                   "peak_allocated_bytes": max_or_none(r["memory"]["peak_allocated_bytes"] for r in runs),
                   "host_peak_rss_bytes": max_or_none(r["memory"]["host_peak_rss_bytes"] for r in runs),
                   "devices": memory_devices},
        "energy": {"total_j": total_j, "per_request_j": total_j / pooled["ok"] if total_j is not None and pooled["ok"] else None,
                   "reason": reasons[0] if reasons else None},
        "engines_loaded": loaded,
        # engines loaded on demand during the runs (runtime.offload): the loads and the seconds they took,
        # as the server counts them since it started (its warm-up included), and KV bytes a request holds per path
        "engine_loads": result.runs[-1].stats.get("engine_loads") if result.runs else None,
        "kv_per_request_bytes": ((result.runs[-1].stats.get("kv_cache") or {}).get("per_request_bytes")) if result.runs else None,
        # as stored (quantized weights and their scales), which is what the engines hold in memory
        "weights_loaded_bytes": sum(manifest.engines[e].bytes for e in loaded if e in manifest.engines) if loaded else None,
    }


def headline(block: dict) -> dict:
    s = block["summary"]
    return {
        "mean_latency_s": get(s, "latency_s", "mean"), "p50_latency_s": get(s, "latency_s", "p50"),
        "p90_latency_s": get(s, "latency_s", "p90"), "p99_latency_s": get(s, "latency_s", "p99"),
        "mean_ttft_s": get(s, "ttft_s", "mean"), "p90_ttft_s": get(s, "ttft_s", "p90"), "mean_tpot_s": get(s, "tpot_s", "mean"),
        "requests_per_s": s["requests_per_s"], "tokens_per_s": s["tokens_per_s"],
        "peak_memory_bytes": block["memory"]["peak_memory_bytes"], "peak_allocated_bytes": block["memory"]["peak_allocated_bytes"],
        "energy_per_request_j": block["energy"]["per_request_j"], "early_exit_share": s["early_exit_share"],
        "weight_bytes_per_token": s["weight_bytes_per_token"], "encode_weight_bytes_per_request": s["encode_weight_bytes_per_request"],
        "weights_loaded_bytes": block["weights_loaded_bytes"], "failed_requests": s["failed"],
    }


# dynamic/static ratio name -> the headline figure it divides
RATIOS = {"mean_latency": "mean_latency_s", "p50_latency": "p50_latency_s", "p90_latency": "p90_latency_s", "p99_latency": "p99_latency_s",
          "mean_ttft": "mean_ttft_s", "mean_tpot": "mean_tpot_s", "requests_per_s": "requests_per_s", "tokens_per_s": "tokens_per_s",
          "peak_memory": "peak_memory_bytes", "peak_allocated": "peak_allocated_bytes", "energy_per_request": "energy_per_request_j",
          "weight_bytes_per_token": "weight_bytes_per_token", "encode_weight_bytes_per_request": "encode_weight_bytes_per_request",
          "weights_loaded_bytes": "weights_loaded_bytes"}


def base_concurrency(report_modes: dict) -> int:
    """Batch-1 figures (roofline, per-token comparison) come from the lowest concurrency run."""
    return min(run["concurrency"] for block in report_modes.values() for run in block["runs"])


def roofline(modes: dict, paths: dict[str, dict], bandwidth: dict[str, dict], exit_layers: list[int], skipped: str) -> dict:
    if not bandwidth:
        return {"skipped": skipped}
    c = base_concurrency(modes)
    rows = []
    for mode, block in modes.items():
        run = next(r for r in block["runs"] if r["concurrency"] == c)
        for name, info in block["paths"].items():
            if name not in paths:
                continue
            tpot = stats([r["tpot_s"] for r in run["requests"] if r["ok"] and r["path"] == name])
            placed = info.get("devices") or {}
            fallback = next(iter(bandwidth))
            # each engine's weights stream at its own device's bandwidth; the engines of a step run
            # one after the other, across a two-GPU split too
            per_engine = paths[name]["step_engine_bytes"]
            seconds = {e: b / bandwidth[placed.get(e) if placed.get(e) in bandwidth else fallback]["bytes_per_s"] for e, b in per_engine.items()}
            roof = sum(seconds.values())
            rows.append({"mode": mode, "path": name, "exit_layer": paths[name]["exit_layer"],
                         "devices": sorted({placed.get(e, fallback) for e in per_engine}),
                         "weight_bytes": paths[name]["step_weight_bytes"], "roofline_s": roof,
                         "tpot_s": get(tpot, "mean"), "requests": get(tpot, "n", default=0),
                         "fraction": roof / tpot["mean"] if tpot and tpot["mean"] > 0 else None})
    # full depth at batch 1: the dynamic text path through every layer, else the static graph
    full = [r for name in (f"exit{max(exit_layers)}-text", "static") for r in rows if r["path"] == name and r["fraction"]]
    return {"concurrency": c, "bandwidth": bandwidth, "paths": rows, "full_depth_fraction": full[0]["fraction"] if full else None,
            "full_depth_path": full[0]["path"] if full else None,
            "note": "weights only: a decode step at batch 1 also reads its KV cache, small next to the weights at these lengths; "
                    "the embedding counts one row, not its table"}


def transformers_block(hf: dict | None, modes: dict) -> dict:
    if hf is None:
        return {"skipped": "bench.transformers.enabled=false"}
    if "skipped" in hf:
        return hf
    c = base_concurrency(modes)
    indices = {row["index"] for row in hf["requests"]}
    server = {}
    match = []
    for mode, block in modes.items():
        run = next(r for r in block["runs"] if r["concurrency"] == c)
        same = [r for r in run["requests"] if r["index"] in indices and r["ok"]]
        server[mode] = {"tpot_s": get(stats([r["tpot_s"] for r in same]), "mean"), "ttft_s": get(stats([r["ttft_s"] for r in same]), "mean"),
                        "paths": sorted({r["path"] for r in same})}
        prompt = {r["index"]: r["prompt_tokens"] for r in same}
        match += [prompt.get(row["index"]) == row["prompt_tokens"] for row in hf["requests"]]
    speedup = {mode: ratio(hf["tpot_s"], s["tpot_s"]) for mode, s in server.items()}
    return {**hf, "concurrency": c, "server": server, "speedup": speedup,
            "prompt_ids_match": f"{sum(match)}/{len(match)}"}  # our template's ids against the server's usage.prompt_tokens


# the rows of the batch-1 decode table at one depth, in this order
ROW_ORDER = {"dynamic": 0, "static": 1, "peer": 2, "transformers": 3}


def decode_batch1(modes: dict, paths: dict[str, dict], roof: dict, hf: dict, peer: dict, exit_layers: list[int], workload: dict) -> dict:
    """Batch-1 decode of our text paths beside the peer (ORT GenAI), transformers and the roofline.

    Ours: each path's mean time per output token at the lowest concurrency, as the roofline table
    has it; the peer: its median decode step; transformers: its mean. Roofline: the weights each
    decode step reads (one embedding row) over the bandwidth of the device it ran on. TTFT per
    text-only workload group: the mean over that group's requests (for the peer: its time to
    first token at each of those requests' prompt lengths)."""
    c = base_concurrency(modes)
    bandwidth = roof.get("bandwidth") or {}
    roof_rows = {(r["mode"], r["path"]): r for r in roof.get("paths", [])}
    text_groups = [g for g, info in workload["groups"].items() if list(info["modalities"]) == ["text"]]
    first, full = exit_layers[0], exit_layers[-1]

    def roofline_s(weight_bytes: int | None, device: str | None) -> float | None:
        bw = bandwidth.get(device) if device else None
        return weight_bytes / bw["bytes_per_s"] if bw and weight_bytes else None

    def row(kind: str, label: str, layers: int, device: str | None, tpot: float | None, roof_s: float | None,
            ttft: dict[str, float | None], note: str | None = None, **extra) -> dict:
        return {"kind": kind, "label": label, "layers": layers, "device": device, "tpot_s": tpot, "roofline_s": roof_s,
                "fraction": roof_s / tpot if roof_s and tpot else None, "ttft_s": ttft, "note": note, **extra}

    rows = []
    peer_depths = [d["layers"] for d in peer.get("depths", [])]
    ours = [("dynamic", f"exit{layers}-text") for layers in sorted({first, full, *peer_depths}) if f"exit{layers}-text" in paths]
    ours += [("static", name) for name, info in paths.items() if info["static"]]
    for mode, name in ours:
        block = modes.get(mode)
        if block is None:
            continue
        run = next(r for r in block["runs"] if r["concurrency"] == c)
        done = [r for r in run["requests"] if r["ok"] and r["path"] == name]
        tpot = get(stats([r["tpot_s"] for r in done]), "mean")
        ttft = {g: get(stats([r["ttft_s"] for r in done if r["group"] == g]), "mean") for g in text_groups}
        devices = sorted(set((get(block, "paths", name, "devices") or {}).values()))
        rows.append(row(mode, f"dyngraph {mode}, `{name}`", paths[name]["exit_layer"], ", ".join(devices) or None, tpot,
                        get(roof_rows.get((mode, name)), "roofline_s"), ttft,
                        None if done else f"no request took this path at concurrency {c}", path=name, requests=len(done),
                        weight_bytes=paths[name]["step_weight_bytes"]))
    lengths = peer.get("prompt_lengths") or {}
    for depth in peer.get("depths", []):
        label = f"ORT GenAI, {depth['layers']} layers"
        if "skipped" in depth:
            rows.append(row("peer", label, depth["layers"], peer["device"], None, None, {g: None for g in text_groups}, f"not run: {depth['skipped']}"))
            continue
        timed = [r for r in depth["runs"] if "skipped" not in r]
        head = timed[0]  # the headline: CUDA graphs where on CUDA, unless they failed
        failed = "; ".join(f"{'CUDA graphs' if r['cuda_graph'] else 'no CUDA graphs'}: {r['skipped']}" for r in depth["runs"] if "skipped" in r)
        at = {p["prompt_tokens"]: p["ttft_s"] for p in head["prefill"]}
        ttft = {g: float(np.mean([at[n] for n in lengths[g]])) if lengths.get(g) and all(n in at for n in lengths[g]) else None
                for g in text_groups}
        without = next((r["decode_step_s"]["median"] for r in timed[1:] if not r["cuda_graph"]), None)
        rows.append(row("peer", label, depth["layers"], peer["device"], head["decode_step_s"]["median"],
                        roofline_s(depth["step_weight_bytes"], peer["device"]), ttft, failed or None, cuda_graph=head["cuda_graph"],
                        tpot_without_graph_s=without, weight_bytes=depth["step_weight_bytes"], prefill=head["prefill"]))
    if "skipped" not in hf:
        full_bytes = get(paths, f"exit{full}-text", "step_weight_bytes")
        ttft = {g: get(stats([r["ttft_s"] for r in hf["requests"] if r["group"] == g]), "mean") for g in text_groups}
        rows.append(row("transformers", "transformers `generate`", full, hf["device"], hf["tpot_s"], roofline_s(full_bytes, hf["device"]), ttft,
                        weight_bytes=full_bytes))
    rows.sort(key=lambda r: (r["layers"], ROW_ORDER[r["kind"]]))

    def over_peer(layers: int) -> float | None:
        ours_ = next((r["tpot_s"] for r in rows if r["kind"] == "dynamic" and r["layers"] == layers), None)
        theirs = next((r["tpot_s"] for r in rows if r["kind"] == "peer" and r["layers"] == layers), None)
        return ratio(ours_, theirs)

    prompt_tokens = {g: sorted(set(lengths.get(g) or [r["prompt_tokens"] for block in modes.values() for run in block["runs"]
                                                       for r in run["requests"] if r["group"] == g and r["prompt_tokens"]]))
                     for g in text_groups}
    return {"concurrency": c, "groups": prompt_tokens, "rows": rows,
            "over_peer": {"first_exit": over_peer(first), "full_depth": over_peer(full)},
            "roofline_skipped": roof.get("skipped"), "peer_skipped": peer.get("skipped")}


# where each kind of metric may be compared (module docstring); a memory figure that counts what
# was loaded rather than measuring a process (engine bytes) says "any" itself
KIND_SCOPES = {"exits": "any", "work": "any", "errors": "any", "quality": "any", "memory": "device_kind",
               "time": "machine_class", "energy": "machine_class"}
# dynamic/static ratio name (a part of it) -> the kind of the figures it divides
RATIO_KINDS = {"latency": "time", "ttft": "time", "tpot": "time", "requests_per_s": "time", "tokens_per_s": "time",
               "peak_memory": "memory", "peak_allocated": "memory", "weights_loaded_bytes": "memory",
               "energy_per_request": "energy", "weight_bytes": "work"}


def metric(value, unit: str, kind: str, better: str, tolerance: str = "relative", scope: str | None = None) -> dict:
    return {"value": value, "unit": unit, "kind": kind, "scope": scope or KIND_SCOPES[kind], "better": better, "tolerance": tolerance}


def build_metrics(report: dict) -> dict[str, dict]:
    m: dict[str, dict] = {}
    exits = report["manifest"]["exit_layers"]
    for mode, block in report["modes"].items():
        h = report["headline"][mode]
        for key in ("mean_latency_s", "p50_latency_s", "p90_latency_s", "p99_latency_s", "mean_ttft_s", "p90_ttft_s", "mean_tpot_s"):
            m[f"{mode}.{key}"] = metric(h[key], "s", "time", "lower")
        for key in ("requests_per_s", "tokens_per_s"):
            m[f"{mode}.{key}"] = metric(h[key], key.removesuffix("_per_s") + "/s", "time", "higher")
        for run in block["runs"]:
            s, c = run["summary"], run["concurrency"]
            m[f"{mode}.c{c}.mean_latency_s"] = metric(get(s, "latency_s", "mean"), "s", "time", "lower")
            m[f"{mode}.c{c}.mean_ttft_s"] = metric(get(s, "ttft_s", "mean"), "s", "time", "lower")
            m[f"{mode}.c{c}.mean_tpot_s"] = metric(get(s, "tpot_s", "mean"), "s", "time", "lower")
            m[f"{mode}.c{c}.tokens_per_s"] = metric(s["tokens_per_s"], "tokens/s", "time", "higher")
        m[f"{mode}.peak_memory_bytes"] = metric(h["peak_memory_bytes"], "B", "memory", "lower")
        m[f"{mode}.peak_allocated_bytes"] = metric(h["peak_allocated_bytes"], "B", "memory", "lower")
        m[f"{mode}.weights_loaded_bytes"] = metric(h["weights_loaded_bytes"], "B", "memory", "lower", scope="any")
        m[f"{mode}.energy_per_request_j"] = metric(h["energy_per_request_j"], "J", "energy", "lower")
        m[f"{mode}.weight_bytes_per_token"] = metric(h["weight_bytes_per_token"], "B", "work", "lower")
        m[f"{mode}.encode_weight_bytes_per_request"] = metric(h["encode_weight_bytes_per_request"], "B", "work", "lower")
        m[f"{mode}.failed_requests"] = metric(h["failed_requests"], "requests", "errors", "lower", "absolute")
        # null where the quality block says why (sampled outputs, no static mode to be the reference)
        m[f"{mode}.token_agreement"] = metric(get(report, "quality", "modes", mode, "token_agreement"), "share", "quality", "higher", "absolute")
    if "dynamic" in report["modes"]:
        histogram = report["modes"]["dynamic"]["summary"]["exit_histogram"]
        ok = report["modes"]["dynamic"]["summary"]["ok"]
        for layer in exits:
            m[f"dynamic.exit_share.{layer}"] = metric(histogram.get(str(layer), 0) / ok if ok else None, "share", "exits", "equal", "absolute")
        m["dynamic.early_exit_share"] = metric(report["headline"]["dynamic"]["early_exit_share"], "share", "exits", "equal", "absolute")
    for name, value in report["ratios"].items():
        kind = next(v for k, v in RATIO_KINDS.items() if k in name)
        m[f"ratio.{name}"] = metric(value, "dynamic/static", kind, "higher" if name.endswith("per_s") else "lower",
                                    scope="any" if name == "weights_loaded_bytes" else None)
    hf = report["transformers"]
    if "skipped" not in hf:
        m["transformers.tpot_s"] = metric(hf["tpot_s"], "s", "time", "lower")
        m["ratio.transformers_over_dynamic_tpot"] = metric(hf["speedup"].get("dynamic"), "x", "time", "higher")
    roof = report["roofline"]
    if "skipped" not in roof:
        for device, bw in roof["bandwidth"].items():
            m[f"roofline.bandwidth.{device}_bytes_per_s"] = metric(bw["bytes_per_s"], "B/s", "time", "higher")
        for row in roof["paths"]:
            m[f"roofline.{row['mode']}.{row['path']}.fraction"] = metric(row["fraction"], "of roofline", "time", "higher")
        m["roofline.full_depth_fraction"] = metric(roof["full_depth_fraction"], "of roofline", "time", "higher")
    batch1 = report["decode_batch1"]
    for row in batch1["rows"]:
        if row["kind"] == "peer" and row["tpot_s"] is not None:
            m[f"peer.l{row['layers']}.decode_s"] = metric(row["tpot_s"], "s", "time", "lower")
            m[f"peer.l{row['layers']}.roofline_fraction"] = metric(row["fraction"], "of roofline", "time", "higher")
    for key, value in batch1["over_peer"].items():
        if value is not None:  # dyngraph's text path over the peer at the same depth, batch 1
            m[f"ratio.over_peer.{key}"] = metric(value, "dyngraph/peer", "time", "lower")
    return m


def build_report(app: BenchApp, manifest: Manifest, requests, workload_fingerprint: str, modes: dict, environment: dict,
                 yardsticks: dict, name: str) -> dict:
    paths = path_table(manifest)
    exit_layers = list(manifest.model["config"]["text"]["exit_layers"])
    blocks = {mode: mode_block(result, paths, exit_layers, manifest) for mode, result in modes.items()}
    heads = {mode: headline(block) for mode, block in blocks.items()}
    ratios = {}
    if "static" in heads and "dynamic" in heads:
        for key, figure in RATIOS.items():
            ratios[key] = ratio(heads["dynamic"][figure], heads["static"][figure])
        static_runs = {r["concurrency"]: r["summary"] for r in blocks["static"]["runs"]}
        for run in blocks["dynamic"]["runs"]:
            c, s = run["concurrency"], static_runs.get(run["concurrency"])
            ratios[f"c{c}.mean_latency"] = ratio(get(run["summary"], "latency_s", "mean"), get(s, "latency_s", "mean"))
            ratios[f"c{c}.tokens_per_s"] = ratio(run["summary"]["tokens_per_s"], get(s, "tokens_per_s"))
    config = asdict(app)
    config.pop("compare")  # compare's settings are not part of what was measured
    report = {
        "kind": REPORT_KIND,
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": environment,
        "config": config,
        "manifest": {"model": manifest.model["name"], "parameters": manifest.model["parameters"], "weights_hash": manifest.model["weights_hash"],
                     "backend": manifest.backend["name"], "backend_versions": manifest.backend.get("versions"), "dtype": manifest.dtype,
                     "created": manifest.created, "exit_layers": exit_layers,
                     "engines": {n: {"parameters": e.parameters, "bytes": e.bytes, "layers": e.layers} for n, e in manifest.engines.items()},
                     "paths": paths,
                     # weight quantization: scheme and per-path agreement with the eager model (not the cache keys)
                     "quantization": {k: v for k, v in (manifest.quantization or {}).items() if k != "keys"} or None},
        "workload": {"name": app.bench.name, "fingerprint": workload_fingerprint, "requests": len(requests),
                     "groups": {g: {"count": c.count, "max_tokens": c.max_tokens, "modalities": list(c.modalities)} for g, c in app.bench.groups.items()},
                     "concurrency": list(app.bench.concurrency), "request_rate": app.bench.request_rate},
        "modes": blocks,
        "headline": heads,
        "ratios": ratios,
    }
    report["transformers"] = transformers_block(yardsticks.get("transformers"), blocks)
    report["roofline"] = roofline(blocks, paths, yardsticks.get("bandwidth") or {}, exit_layers,
                                  yardsticks.get("bandwidth_skipped") or "bench.roofline.enabled=false")
    report["peer"] = yardsticks.get("peer") or {"skipped": "bench.peer.enabled=false"}
    report["decode_batch1"] = decode_batch1(blocks, paths, report["roofline"], report["transformers"], report["peer"], exit_layers,
                                            report["workload"])
    report["quality"] = quality_block(blocks, app.bench.temperature)
    report["metrics"] = build_metrics(report)
    return report


# --- writing --------------------------------------------------------------------------------


def write_report(report: dict, directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    report = finite(report)
    write_atomic(directory / "report.json", (json.dumps(report, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode())
    plots = write_plots(report, directory)
    (directory / "report.md").write_text(render_markdown(report, [p.name for p in plots]))
    return [directory / "report.json", directory / "report.md", *plots]


QUANTIZATION_FIGURES = (  # (headline key, column, format)
    ("peak_memory_bytes", "peak memory", "bytes"), ("peak_allocated_bytes", "allocator peak", "bytes"),
    ("weights_loaded_bytes", "engines loaded", "bytes"), ("mean_latency_s", "mean latency", "s"),
    ("mean_ttft_s", "mean TTFT", "s"), ("mean_tpot_s", "mean TPOT", "s"), ("tokens_per_s", "tokens/s", "n"),
)


def write_quantizations(reports: dict[str, dict], directory: Path) -> None:
    """bench.quantizations: each mode's headline per quantization, its ratio to the first entry's
    (the baseline, e.g. unquantized), the engine load time and the export's agreement figures."""
    base_label = next(iter(reports))
    rows, out = [], {}
    for label, report in reports.items():
        for mode, head in report["headline"].items():
            base = reports[base_label]["headline"].get(mode, {})
            loads = report["modes"][mode].get("engine_loads") or {}
            quantization = report["manifest"].get("quantization") or {}
            figures = {key: head.get(key) for key, _, _ in QUANTIZATION_FIGURES}
            out.setdefault(label, {})[mode] = {
                **figures, "ratio_to_" + base_label: {k: ratio(v, base.get(k)) for k, v in figures.items()},
                "engine_load_seconds": sum(f["load_seconds"] for f in loads.values()) if loads else None,
                "min_top1_agreement": min((a["top1_agreement"] for a in (quantization.get("agreement") or {}).values()), default=None),
                "report": report["name"]}
            rows.append([label, mode, *(fmt(figures[k], kind) + (f" ({fmt_ratio(ratio(figures[k], base.get(k)))})" if label != base_label else "")
                                        for k, _, kind in QUANTIZATION_FIGURES),
                         f"{out[label][mode]['engine_load_seconds']:.1f} s" if loads else "",
                         fmt_share(out[label][mode]["min_top1_agreement"])])
    header = ["quantization", "mode", *(col for _, col, _ in QUANTIZATION_FIGURES), "engine loads", "worst path top-1 vs eager"]
    method = next(iter(reports[base_label]["modes"].values()))["memory"]["method"]
    md = ["# Weight quantizations side by side", "",
          f"Each row is one mode of one quantization's bench (its own export and report folder); in brackets the ratio to "
          f"`{base_label}` in the same mode. Peak memory: {method}. Engine loads: the seconds the server spent loading "
          f"engines since it started. Top-1: the export's agreement with the eager model on the manifest's random prompts, "
          f"worst path.", "", table(header, rows, "ll" + "r" * (len(header) - 2)), ""]
    write_atomic(directory / "quantizations.json", (json.dumps(finite(out), indent=1) + "\n").encode())
    write_atomic(directory / "quantizations.md", "\n".join(md).encode())


def fmt(x, kind: str) -> str:
    return fmt_bytes(x) if kind == "bytes" else fmt_s(x) if kind == "s" else "n/a" if x is None else f"{x:,.1f}"


def finite(x):
    """The report with NaN and infinities as null: strict JSON, and a figure that is not a number is not one."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite(v) for v in x]
    return x


def fmt_s(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def fmt_bytes(x: float | None) -> str:
    if x is None:
        return "n/a"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(x) >= size:
            return f"{x / size:.2f} {unit}"
    return f"{x:.0f} B"


def fmt_j(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f} J" if x >= 10 else f"{x:.2f} J"


def fmt_share(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def fmt_change(x: float | None) -> str:
    return "" if x is None else f"{(x - 1) * 100:+.0f}%"


def fmt_rate(x: float | None, unit: str = "") -> str:
    return "n/a" if x is None else f"{x:.2f} {unit}".rstrip()


def table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    marks = {"l": "---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks[a] for a in align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def memory_label(report: dict) -> str:
    return "Peak GPU memory" if report["environment"]["device"]["kind"] == "cuda" else "Peak memory (server RSS)"


def render_markdown(report: dict, plots: list[str]) -> str:
    env, man = report["environment"], report["manifest"]
    modes, heads, ratios = report["modes"], report["headline"], report["ratios"]
    both = "static" in heads and "dynamic" in heads
    device = env["device"]
    gpus = ", ".join(f"{g['label']} {g['name']}" for g in device["gpus"]) or "none (CPU run)"
    out = [f"# dyngraph bench: {man['model']} / {man['backend']} ({man['dtype']}) on {device['name']}", ""]
    out += [f"`{report['name']}`, {report['created']}; workload `{report['workload']['name']}` ({report['workload']['requests']} requests, "
            f"concurrency {report['workload']['concurrency']}, request rate {report['workload']['request_rate'] or 'closed loop'}); "
            f"placement `{device['placement']}`.", ""]

    if both:
        out += ["## Static vs dynamic", ""]
        s, d = heads["static"], heads["dynamic"]
        rows = [
            ["Mean latency", fmt_s(s["mean_latency_s"]), fmt_s(d["mean_latency_s"]), fmt_ratio(ratios["mean_latency"]), fmt_change(ratios["mean_latency"])],
            [memory_label(report), fmt_bytes(s["peak_memory_bytes"]), fmt_bytes(d["peak_memory_bytes"]), fmt_ratio(ratios["peak_memory"]), fmt_change(ratios["peak_memory"])],
            ["Energy per request", fmt_j(s["energy_per_request_j"]), fmt_j(d["energy_per_request_j"]), fmt_ratio(ratios["energy_per_request"]), fmt_change(ratios["energy_per_request"])],
            ["Early exit (before the last layer)", fmt_share(s["early_exit_share"]), fmt_share(d["early_exit_share"]), "", ""],
            ["Tokens equal to full-depth greedy", *(fmt_share(get(report, "quality", "modes", m, "token_agreement")) for m in ("static", "dynamic")), "", ""],
            ["Time to first token (mean)", fmt_s(s["mean_ttft_s"]), fmt_s(d["mean_ttft_s"]), fmt_ratio(ratios["mean_ttft"]), fmt_change(ratios["mean_ttft"])],
            ["Time per output token (mean)", fmt_s(s["mean_tpot_s"]), fmt_s(d["mean_tpot_s"]), fmt_ratio(ratios["mean_tpot"]), fmt_change(ratios["mean_tpot"])],
            ["Throughput", fmt_rate(s["tokens_per_s"], "tok/s"), fmt_rate(d["tokens_per_s"], "tok/s"), fmt_ratio(ratios["tokens_per_s"]), fmt_change(ratios["tokens_per_s"])],
            ["Decode weights read per token", fmt_bytes(s["weight_bytes_per_token"]), fmt_bytes(d["weight_bytes_per_token"]), fmt_ratio(ratios["weight_bytes_per_token"]), fmt_change(ratios["weight_bytes_per_token"])],
            ["Engine weights loaded", fmt_bytes(s["weights_loaded_bytes"]), fmt_bytes(d["weights_loaded_bytes"]), fmt_ratio(ratios["weights_loaded_bytes"]), fmt_change(ratios["weights_loaded_bytes"])],
        ]
        out += [table(["Metric", "Static graph", "Dynamic graph", "Dynamic/static", "Change"], rows), ""]
        notes = [f"Latency: request sent to `[DONE]`, over every request of every concurrency level ({', '.join(str(c) for c in report['workload']['concurrency'])})."]
        notes.append(f"{memory_label(report)}: {modes['dynamic']['memory']['method']}; the highest of the runs.")
        q = report["quality"]
        notes.append(f"Tokens equal to full-depth greedy: position by position against the {q['reference']} (bench/quality.py); dynamic per group: "
                     + ", ".join(f"{g} {fmt_share(v)}" for g, v in q["modes"]["dynamic"]["per_group"].items()) + "." if "modes" in q else
                     f"Tokens equal to full-depth greedy: n/a, {q['reason']}.")
        energy_reason = modes["dynamic"]["energy"]["reason"] or modes["static"]["energy"]["reason"]
        notes.append("Energy: unavailable, " + energy_reason + "." if energy_reason else
                     "Energy: NVML's total-energy counter of each GPU the server used, over each run, divided by its requests (idle time between requests included).")
        out += ["\n".join(f"- {n}" for n in notes), ""]

        out += ["### Against the issue's targets", "", "Targets for the default mix on the GPU host, reported against rather than tuned toward.", ""]
        rows = []
        for key, text, op, goal in TARGETS:
            value = get(report["metrics"], key, "value")
            met = "n/a" if value is None else ("yes" if (value <= goal if op == "<=" else value >= goal) else "no")
            rows.append([text, f"{op} {goal:g}", fmt_ratio(value), met])
        out += [table(["Target", "Goal", "Measured", "Met"], rows), ""]

    out += ["## Per concurrency level", ""]
    rows = []
    for mode, block in modes.items():
        for run in block["runs"]:
            s, e, mem = run["summary"], run["energy"], run["memory"]
            rows.append([mode, str(run["concurrency"]), f"{s['ok']}/{s['requests']}",
                         *(fmt_s(get(s, "latency_s", q)) for q in ("mean", "p50", "p90", "p99")),
                         fmt_s(get(s, "ttft_s", "mean")), fmt_s(get(s, "ttft_s", "p90")), fmt_s(get(s, "tpot_s", "mean")),
                         fmt_rate(s["requests_per_s"]), fmt_rate(s["tokens_per_s"]), fmt_j(e["per_request_j"]),
                         fmt_bytes(mem["peak_memory_bytes"])])
    out += [table(["mode", "conc.", "ok", "latency mean", "p50", "p90", "p99", "TTFT mean", "TTFT p90", "TPOT mean", "req/s", "tok/s",
                   "J/request", "peak memory"], rows, "ll" + "r" * 12), ""]

    out += ["## Exit depth", ""]
    layers = [str(x) for x in man["exit_layers"]]
    rows = []
    for mode, block in modes.items():
        h, ok = block["summary"]["exit_histogram"], block["summary"]["ok"] or 1
        rows.append([mode] + [f"{h.get(layer, 0)} ({100 * h.get(layer, 0) / ok:.0f}%)" for layer in layers])
    out += [table(["mode"] + [f"exit {layer}" for layer in layers], rows), "", "Requests per path (all runs):", ""]
    rows = []
    for mode, block in modes.items():
        for path, n in block["summary"]["paths"].items():
            info = block["paths"].get(path, {})
            rows.append([mode, f"`{path}`", str(n), fmt_bytes(get(man, "paths", path, "step_weight_bytes")),
                         ", ".join(sorted(set((info.get("devices") or {}).values()))), " → ".join(info.get("engines") or [])])
    out += [table(["mode", "path", "requests", "weights per step", "devices", "engines"], rows, "lllrll"), ""]
    rows = [[mode, str(len(block["engines_loaded"] or [])), fmt_bytes(block["weights_loaded_bytes"]), ", ".join(block["engines_loaded"] or [])]
            for mode, block in modes.items()]
    out += ["Engines loaded at the end of the runs:", "", table(["mode", "engines", "bytes", "names"], rows, "lrrl"), ""]
    rows = []
    for mode, block in modes.items():
        loads = block.get("engine_loads") or {}
        for name, fig in sorted(loads.items()):
            unloads = ", ".join(f"{k.removeprefix('unloads_')} {v}" for k, v in fig.items() if k.startswith("unloads_") and v)
            rows.append([mode, name, str(fig["loads"]), f"{fig['load_seconds']:.2f} s", unloads])
    if rows:
        out += ["Engine loads since the server started (warm-up included; modules on demand load here):", "",
                table(["mode", "engine", "loads", "seconds", "unloads"], rows, "llrrl"), ""]
    rows = [[mode, f"`{path}`", fmt_bytes(n)] for mode, block in modes.items() for path, n in sorted((block.get("kv_per_request_bytes") or {}).items())]
    if rows:
        out += ["KV cache one request holds (its rows in the segments it reaches):", "", table(["mode", "path", "bytes"], rows, "llr"), ""]

    out += ["## Memory per device", ""]
    rows = []
    for mode, block in modes.items():
        for label, fig in block["memory"]["devices"].items():
            rows.append([mode, label, fmt_bytes(fig.get("nvml_process_peak_bytes")), fmt_bytes(fig.get("nvml_device_delta_bytes")),
                         fmt_bytes(fig.get("torch_peak_allocated_bytes"))])
        rows.append([mode, "host", "", "", f"RSS {fmt_bytes(block['memory']['host_peak_rss_bytes'])}"])
    out += [table(["mode", "device", "NVML, server process", "NVML, device minus before", "torch allocator peak"], rows, "llrrr"), "",
            "On the CPU the runtime's torch figure is the bytes of the KV slots it holds (torch keeps no CPU allocation counters).", ""]

    hf = report["transformers"]
    out += ["## Against transformers' eager generate", ""]
    if "skipped" in hf:
        out += [f"Not run: {hf['skipped']}.", ""]
    else:
        rows = [["transformers `generate`", fmt_s(hf["tpot_s"]), "1.00", ""]]
        for mode, s in hf["server"].items():
            rows.append([f"dyngraph {mode}", fmt_s(s["tpot_s"]), fmt_ratio(hf["speedup"][mode]), ", ".join(f"`{p}`" for p in s["paths"])])
        out += [f"{len(hf['requests'])} text requests, one at a time: {hf['implementation']}, attention `{hf['attn_implementation']}`, "
                f"{hf['dtype']} on {hf['device']}, the decoder weights of the engines (written with save_glm_checkpoint); "
                f"dyngraph at concurrency {hf['concurrency']}. Prompt ids equal to the server's prompt token count: {hf['prompt_ids_match']}.", "",
                table(["", "time per output token", "speed-up", "paths"], rows, "lrrl"), ""]

    roof = report["roofline"]
    out += ["## Roofline", ""]
    if "skipped" in roof:
        out += [f"Not run: {roof['skipped']}.", ""]
    else:
        bw = "; ".join(f"{d}: {b['bytes_per_s'] / 1e9:.1f} GB/s ({b['method']}, {fmt_bytes(b['copy_bytes'])} buffer)" for d, b in roof["bandwidth"].items())
        rows = [[r["mode"], f"`{r['path']}`", fmt_bytes(r["weight_bytes"]), fmt_s(r["roofline_s"]), fmt_s(r["tpot_s"]), str(r["requests"]),
                 fmt_share(r["fraction"])] for r in roof["paths"]]
        out += [f"Copy bandwidth (bytes read + written per second): {bw}. Roofline = decode weights of the path / bandwidth; "
                f"measured = mean time per output token at concurrency {roof['concurrency']}. {roof['note'].capitalize()}.", "",
                table(["mode", "path", "weights per step", "roofline", "measured", "requests", "of roofline"], rows, "llrrrrr"), ""]

    out += decode_markdown(report)

    if plots:
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    if not any(p.startswith("energy") for p in plots):
        out += ["No energy plot: energy was unavailable in this run.", ""]

    libs = ", ".join(f"{k} {v}" for k, v in env["libraries"].items())
    out += ["## Environment", "",
            table(["", ""], [["device", f"{device['name']} ({device['kind']})"], ["GPUs", gpus], ["driver", device.get("driver") or "n/a"],
                             ["machine class", f"{env['machine_class']} (`compare` checks timings only against this class)"],
                             ["CPU", f"{env['cpu']['model']} ({env['cpu']['cores']} cores, 1-minute load average {get(env, 'cpu', 'load_average_1m', default=float('nan')):.1f} at the end)"], ["Python", env["python"]], ["libraries", libs],
                             ["commit", f"{get(env, 'git', 'commit') or 'n/a'}{' (dirty)' if get(env, 'git', 'dirty') else ''}"],
                             ["engines", f"{man['parameters']:,} parameters, weights {man['weights_hash'][:12]}, exported {man['created']}"],
                             ["server", "`" + " ".join(modes[next(iter(modes))]["server"]["command"][1:]) + "`"]], "ll"), ""]
    return "\n".join(out)


def fmt_ms(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x * 1e3:.2f} ms" if x >= 1e-4 else f"{x * 1e6:.1f} µs"  # a tiny model's roofline is microseconds


def fmt_fraction(x: float | None) -> str:
    return fmt_share(x) if x is None or x >= 0.01 else f"{100 * x:.2f}%"


def decode_markdown(report: dict) -> list[str]:
    batch1, peer, roof = report["decode_batch1"], report["peer"], report["roofline"]
    out = ["## Decode at batch 1 beside the peer and the roofline", ""]
    groups = batch1["groups"]
    header = ["", "layers", "ms/token", "roofline", "of roofline"]
    header += [f"TTFT `{g}` ({fmt_range(n)} tokens)" for g, n in groups.items()] + ["notes"]
    rows = []
    for r in batch1["rows"]:
        tpot = fmt_ms(r["tpot_s"])
        if r.get("tpot_without_graph_s") is not None:
            tpot += f" ({fmt_ms(r['tpot_without_graph_s'])} without CUDA graphs)"
        rows.append([r["label"], str(r["layers"]), tpot, fmt_ms(r["roofline_s"]), fmt_fraction(r["fraction"]),
                     *(fmt_ms(r["ttft_s"].get(g)) for g in groups), r["note"] or ""])
    out += [table(header, rows, "lrrrr" + "r" * len(groups) + "l"), ""]
    notes = [f"dyngraph: each path's mean time per output token at concurrency {batch1['concurrency']} through the real server "
             "(client side of the HTTP stream), and the same requests' time to first token."]
    if "skipped" in peer:
        notes.append(f"ORT GenAI: not run: {peer['skipped']}.")
    else:
        built = [d for d in peer["depths"] if "skipped" not in d]
        sizes = "; ".join(f"{d['layers']} layers: built in {d['build_s']:.0f} s, {fmt_bytes(d['build_bytes'])} on disk"
                          f"{', deleted' if d['deleted'] else ', NOT deleted'}" for d in built)
        notes.append(f"ORT GenAI: {peer['implementation']} on {peer['device']} ({peer['dtype']}, {peer['provider']} provider), "
                     f"{peer['architecture']}, random weights from the model seed. Decode: the median step (generate_next_token and "
                     f"the new id's copy to the host) over {peer['decode_tokens']} greedy tokens after each prompt length; TTFT: "
                     f"append_tokens of the prompt and the first token. {sizes}.")
    notes.append("transformers: its mean time per output token and time to first token (eager generate) on the full-depth decoder.")
    notes.append(f"Roofline: not measured: {roof['skipped']}." if "skipped" in roof else
                 "Roofline: the weights a decode step reads (one embedding row, not the table) over the copy bandwidth of its device, measured in this run.")
    if any((r["fraction"] or 0) > 1 for r in batch1["rows"]):
        notes.append("Above 100% of roofline: those weights were read from caches faster than the device's measured copy bandwidth "
                     "(a model that fits in a CPU's caches); the bound does not apply to them.")
    out += ["\n".join(f"- {n}" for n in notes), ""]
    return out


def fmt_range(values: list[int]) -> str:
    if not values:
        return "no"
    return str(values[0]) if values[0] == values[-1] else f"{values[0]}–{values[-1]}"


# --- plots ----------------------------------------------------------------------------------


def write_plots(report: dict, directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, whatever display the machine has
    import matplotlib.pyplot as plt

    written = []
    for name, draw in (("latency.png", plot_latency), ("memory.png", plot_memory), ("energy.png", plot_energy), ("exits.png", plot_exits),
                       ("decode.png", plot_decode)):
        fig = draw(report, plt)
        if fig is None:
            continue
        fig.savefig(directory / name, dpi=110, bbox_inches="tight", metadata={"Software": None})
        plt.close(fig)
        written.append(directory / name)
    return written


def ecdf(ax, values: list[float], **kw) -> None:
    v = np.sort(np.asarray(values, dtype=float))
    ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", **kw)


def plot_latency(report: dict, plt):
    modes = report["modes"]
    levels = report["workload"]["concurrency"]
    fig, axes = plt.subplots(2, len(levels), figsize=(4.2 * len(levels), 6.4), squeeze=False)
    for col, c in enumerate(levels):
        for row, (key, title) in enumerate((("latency_s", "end-to-end latency"), ("ttft_s", "time to first token"))):
            ax = axes[row][col]
            for mode, block in modes.items():
                run = next((r for r in block["runs"] if r["concurrency"] == c), None)
                values = [r[key] for r in run["requests"] if r["ok"] and r[key] is not None] if run else []
                if values:
                    ecdf(ax, values, color=COLORS[mode], lw=2, label=f"{mode} (mean {fmt_s(float(np.mean(values)))})")
                    ax.axvline(float(np.mean(values)), color=COLORS[mode], ls=":", lw=1)
            ax.set_title(f"{title}, concurrency {c}", fontsize=10)
            ax.set_xlabel("seconds")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="lower right")
        axes[0][col].set_ylabel("share of requests") if col == 0 else None
        axes[1][col].set_ylabel("share of requests") if col == 0 else None
    fig.suptitle(f"Latency distribution per mode: {report['manifest']['model']} on {report['environment']['device']['name']}", fontsize=11)
    fig.tight_layout()
    return fig


def byte_unit(largest: float) -> tuple[str, float]:
    return ("GiB", float(1 << 30)) if largest >= 1 << 30 else ("MiB", float(1 << 20)) if largest >= 1 << 20 else ("KiB", 1024.0)


def plot_memory(report: dict, plt):
    modes = report["modes"]
    gpu = report["environment"]["device"]["kind"] == "cuda"
    panels = [("peak", "Peak GPU memory (NVML)" if gpu else "Peak server RSS (host)"),
              ("allocated", "torch allocator peak" if gpu else "KV slots peak (runtime)")]
    labels = sorted({label for block in modes.values() for label in block["memory"]["devices"]}) if gpu else ["cpu"]

    def value(block: dict, label: str, key: str) -> float:
        figures = block["memory"]["devices"].get(label, {})
        if key == "allocated":
            v = figures.get("torch_peak_allocated_bytes")
        elif gpu:
            v = figures.get("nvml_process_peak_bytes")
            v = figures.get("nvml_device_delta_bytes") if v is None else v
        else:
            v = block["memory"]["host_peak_rss_bytes"]
        return float(v or 0)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / max(1, len(modes))
    for ax, (key, title) in zip(axes, panels):
        values = {mode: [value(block, label, key) for label in labels] for mode, block in modes.items()}
        unit, scale = byte_unit(max([v for vs in values.values() for v in vs] + [1.0]))
        for k, (mode, vs) in enumerate(values.items()):
            xs = np.arange(len(labels)) + (k - (len(modes) - 1) / 2) * width
            bars = ax.bar(xs, [v / scale for v in vs], width, color=COLORS[mode], label=mode)
            ax.bar_label(bars, labels=[f"{v / scale:.2f}" for v in vs], fontsize=8)
        ax.set_xticks(np.arange(len(labels)), labels)
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Memory per device (highest of the runs)", fontsize=11)
    fig.tight_layout()
    return fig


def plot_energy(report: dict, plt):
    modes = report["modes"]
    if all(block["energy"]["per_request_j"] is None for block in modes.values()):
        return None
    levels = report["workload"]["concurrency"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    width = 0.8 / max(1, len(modes))
    for k, (mode, block) in enumerate(modes.items()):
        per_run = {r["concurrency"]: r["energy"]["per_request_j"] for r in block["runs"]}
        values = [per_run.get(c) or 0.0 for c in levels]
        bars = ax.bar(np.arange(len(levels)) + (k - (len(modes) - 1) / 2) * width, values, width, color=COLORS[mode], label=mode)
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=8)
    ax.set_xticks(np.arange(len(levels)), [f"concurrency {c}" for c in levels])
    ax.set_ylabel("joules per request")
    ax.set_title("Energy per request (NVML total-energy counter, all GPUs used)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_exits(report: dict, plt):
    modes = report["modes"]
    layers = [str(x) for x in report["manifest"]["exit_layers"]]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    width = 0.8 / max(1, len(modes))
    for k, (mode, block) in enumerate(modes.items()):
        h, ok = block["summary"]["exit_histogram"], block["summary"]["ok"] or 1
        values = [100 * h.get(layer, 0) / ok for layer in layers]
        bars = ax.bar(np.arange(len(layers)) + (k - (len(modes) - 1) / 2) * width, values, width, color=COLORS[mode], label=mode)
        ax.bar_label(bars, labels=[f"{v:.0f}%" for v in values], fontsize=8)
    ax.set_xticks(np.arange(len(layers)), [f"exit {layer}" for layer in layers])
    ax.set_ylabel("% of requests")
    ax.set_ylim(0, 110)
    ax.set_title("Exit depth per request", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


KIND_COLORS = {"dynamic": COLORS["dynamic"], "static": COLORS["static"], "peer": "#55a868", "transformers": "#8172b2"}
DECODE_NAMES = {"dynamic": "dyngraph", "static": "dyngraph", "peer": "ORT GenAI", "transformers": "transformers"}


def decode_title(rows: list[dict], roofline: bool) -> str:
    """The decode plot's title, naming only what it draws: a yardstick that did not run is not in it."""
    names = list(dict.fromkeys(DECODE_NAMES[r["kind"]] for r in rows)) + (["the roofline"] if roofline else [])
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"Decode at batch 1: {listed}"


def plot_decode(report: dict, plt):
    """Batch-1 ms/token per row of the decode table, the roofline of each as a tick."""
    rows = [r for r in report["decode_batch1"]["rows"] if r["tpot_s"] is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.6))
    ys = np.arange(len(rows))[::-1]
    values = [r["tpot_s"] * 1e3 for r in rows]
    bars = ax.barh(ys, values, color=[KIND_COLORS[r["kind"]] for r in rows], height=0.6)
    ax.bar_label(bars, labels=[f"{v:.2f}" + (f" ({fmt_fraction(r['fraction'])} of roofline)" if r["fraction"] else "") for v, r in zip(values, rows)],
                 fontsize=8, padding=3)
    roofs = [(y, r["roofline_s"] * 1e3) for y, r in zip(ys, rows) if r["roofline_s"]]
    if roofs:
        ax.scatter([v for _, v in roofs], [y for y, _ in roofs], marker="|", s=400, color="black", zorder=3, label="roofline")
        ax.legend(fontsize=8, loc="best")
    names = [r["label"].replace("`", "") + ("" if r["kind"] == "peer" else f" ({r['layers']} layers)") for r in rows]
    ax.set_yticks(ys, names, fontsize=8)
    ax.set_xlabel("ms per output token, batch 1")
    ax.set_xlim(0, max(values) * 1.35)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(decode_title(rows, bool(roofs)), fontsize=10)
    fig.tight_layout()
    return fig


def print_headline(report: dict, console: Console) -> None:
    heads, ratios = report["headline"], report["ratios"]
    t = Table(title=f"{report['manifest']['model']} / {report['manifest']['backend']} on {report['environment']['device']['name']}", title_justify="left")
    for col in ("", *heads, *(["dynamic/static"] if ratios else [])):
        t.add_column(col, justify="left" if not col else "right")
    rows = [("mean latency", "mean_latency_s", fmt_s, "mean_latency"), ("mean TTFT", "mean_ttft_s", fmt_s, "mean_ttft"),
            ("mean TPOT", "mean_tpot_s", fmt_s, "mean_tpot"), (memory_label(report).lower(), "peak_memory_bytes", fmt_bytes, "peak_memory"),
            ("energy per request", "energy_per_request_j", fmt_j, "energy_per_request"), ("early exit", "early_exit_share", fmt_share, None)]
    for title, key, fmt, r in rows:
        t.add_row(title, *(fmt(h[key]) for h in heads.values()), *([fmt_ratio(ratios.get(r)) if r else ""] if ratios else []))
    console.print(t)
