"""The bench's numbers: everything in a report computed from what a run measured (bench/run.py's
ModeResult), and how each unit is written. A figure that could not be measured (energy on a CPU,
a yardstick that was switched off) is null with the reason beside it, never filled in. `build_metrics`
flattens the figures that `compare` checks, each with its unit, its kind, the scope across which it
may be compared and which direction is better:

  scope "any"            what ran, not how fast: exit shares, weights read per token, engine bytes
                         loaded, failed requests, tokens equal to full-depth greedy
  scope "device_kind"    peak memory (and its dynamic/static ratio): a GPU's against a GPU's, a host's
                         RSS against a host's
  scope "machine_class"  whatever a clock or an energy counter measured, ratios of them included
                         (latency, throughput, energy, roofline fractions, against transformers or
                         the peer): only against a report from the same machine class (below)

report.json and report.md are bench/report.py's, the PNG plots bench/plots.py's.
"""
from __future__ import annotations

from dataclasses import asdict

import numpy as np

from bench.baseline import encode_weight_bytes, step_engine_bytes
from bench.quality import agreement, share
from contract.manifest import Manifest


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
        "ttft_parts_ms": timeline_means(ok),
    }


def timeline_means(records: list[dict]) -> dict[str, dict[str, float]]:
    """Per group, the server's mean ms per part of the time to first token (the responses' timelines;
    a part some requests lack, such as a load, counts 0 for them), `total` their sum."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        if r.get("timeline"):
            groups.setdefault(r["group"], []).append(r["timeline"])
    out = {}
    for group, timelines in sorted(groups.items()):
        parts = list(dict.fromkeys(p for t in timelines for p in t))
        means = {p: sum(t.get(p, 0.0) for t in timelines) / len(timelines) for p in parts}
        out[group] = means | {"total": sum(means.values())}
    return out


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
        def per_group(key: str) -> dict[str, float | None]:
            at = {p["prompt_tokens"]: p[key] for p in head["prefill"] if key in p}
            return {g: float(np.mean([at[n] for n in lengths[g]])) if lengths.get(g) and all(n in at for n in lengths[g]) else None
                    for g in text_groups}

        ttft = per_group("ttft_s")
        without = next((r["decode_step_s"]["median"] for r in timed[1:] if not r["cuda_graph"]), None)
        rows.append(row("peer", label, depth["layers"], peer["device"], head["decode_step_s"]["median"],
                        roofline_s(depth["step_weight_bytes"], peer["device"]), ttft, failed or None, cuda_graph=head["cuda_graph"],
                        tpot_without_graph_s=without, weight_bytes=depth["step_weight_bytes"], prefill=head["prefill"],
                        first_call_ttft_s=per_group("first_call_ttft_s")))
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


def curve_block(curve: dict | None, paths: dict[str, dict], exit_layers: list[int], skipped: str) -> dict:
    """The threshold curve (bench/curve.py): per point the mean latency over the static point's on the
    same requests, time per output token, early-exit share and the tokens equal to the static point's
    greedy full-depth output (bench/quality.py); and the fastest point with at least 95 % of them."""
    if curve is None:
        return {"skipped": skipped}
    results = {label: (point, [request_record(r) for r in result.runs[0].requests], result)
               for label, (point, result) in curve["results"].items()}
    static = results["static"][1]
    reference = {r["index"]: r["tokens"] for r in static if r["ok"]}
    base = get(stats([r["latency_s"] for r in static if r["ok"]]), "mean")
    points = []
    for label, (point, records, result) in results.items():
        s = summarize(records, paths, exit_layers)
        pooled, groups = [0, 0], {}
        for r in records:
            if r["ok"] and r["index"] in reference:
                same, total = agreement(r["tokens"], reference[r["index"]])
                for acc in (pooled, groups.setdefault(r["group"], [0, 0])):
                    acc[0] += same
                    acc[1] += total
        mean = get(s, "latency_s", "mean")
        points.append({"label": label, "mode": point.mode, "threshold": point.threshold, "settings": list(point.extra),
                       "requests": s["requests"], "failed": s["failed"], "mean_latency_s": mean, "latency_ratio": ratio(mean, base),
                       "mean_ttft_s": get(s, "ttft_s", "mean"), "mean_tpot_s": get(s, "tpot_s", "mean"),
                       "early_exit_share": s["early_exit_share"], "exit_histogram": s["exit_histogram"],
                       "token_agreement": share(pooled), "tokens": pooled[1], "per_group": {g: share(v) for g, v in sorted(groups.items())},
                       "log": result.log_file, "startup_s": result.startup_s, "records": records})
    good = [p for p in points if p["mode"] == "dynamic" and p["latency_ratio"] is not None and (p["token_agreement"] or 0) >= CURVE_QUALITY]
    best = min(good, key=lambda p: p["latency_ratio"], default=None)
    requests = curve["requests"]
    return {"concurrency": result.runs[0].concurrency, "requests": len(requests), "groups": sorted({r.group for r in requests}),
            "max_tokens": max(r.max_tokens for r in requests), "reference": "the static point's greedy full-depth output on the same requests",
            "calibrated_thresholds": curve["thresholds"], "calibrated_skipped": curve["calibrated_skipped"], "points": points,
            "quality_floor": CURVE_QUALITY, "at_quality_floor": None if best is None else
            {k: best[k] for k in ("label", "threshold", "latency_ratio", "mean_tpot_s", "early_exit_share", "token_agreement")}}


CURVE_QUALITY = 0.95  # the curve's point the report names: the fastest with at least this share of tokens equal to full depth


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


# --- units: how each figure is written (report.md, the plots, compare) -------------------------


def fmt(x, kind: str) -> str:
    return fmt_bytes(x) if kind == "bytes" else fmt_s(x) if kind == "s" else "n/a" if x is None else f"{x:,.1f}"


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


def fmt_ms(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x * 1e3:.2f} ms" if x >= 1e-4 else f"{x * 1e6:.1f} µs"  # a tiny model's roofline is microseconds


def fmt_fraction(x: float | None) -> str:
    return fmt_share(x) if x is None or x >= 0.01 else f"{100 * x:.2f}%"


def fmt_range(values: list[int]) -> str:
    if not values:
        return "no"
    return str(values[0]) if values[0] == values[-1] else f"{values[0]}–{values[-1]}"
