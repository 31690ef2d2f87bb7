"""The bench report: report.json (versioned, what `compare` reads) and report.md, with the PNG
plots of bench/plots.py beside them. The figures come from bench/metrics.py (which says what may
be compared with what); this module assembles, renders and writes them.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.metrics import (RATIOS, build_metrics, curve_block, decode_batch1, fmt, fmt_bytes, fmt_change, fmt_fraction, fmt_j,
                           fmt_ms, fmt_range, fmt_rate, fmt_ratio, fmt_s, fmt_share, get, headline, mode_block, path_table, ratio,
                           roofline, transformers_block)
from bench.plots import write_plots
from bench.quality import quality_block
from bench.workload import active_groups
from contract.config import BenchApp
from contract.manifest import Manifest, write_atomic

SCHEMA_VERSION = 2
REPORT_KIND = "dyngraph-bench-report"
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


def build_report(app: BenchApp, manifest: Manifest, requests, workload_fingerprint: str, modes: dict, environment: dict,
                 yardsticks: dict, name: str, curve: dict | None = None) -> dict:
    """`curve`: what bench/curve.py run_curve measured, where bench.threshold_curve is on."""
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
                     "groups": {g: {"count": c.count, "max_tokens": c.max_tokens, "modalities": list(c.modalities), "source": c.source}
                                for g, c in active_groups(app.bench).items()},
                     "corpus": app.bench.corpus, "concurrency": list(app.bench.concurrency), "request_rate": app.bench.request_rate},
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
    report["threshold_curve"] = curve_block(curve, paths, exit_layers, "bench.threshold_curve.thresholds is empty")
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


def finite(x):
    """The report with NaN and infinities as null: strict JSON, and a figure that is not a number is not one."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite(v) for v in x]
    return x


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

    if "skipped" not in report["threshold_curve"]:
        out += curve_markdown(report["threshold_curve"])

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

    out += timeline_markdown(modes)
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


def point_name(point: dict) -> str:
    if point["mode"] == "static":
        return "static (full depth)"
    return "calibrated thresholds" if point["threshold"] is None else f"top-1 ≥ {point['threshold']:g}"


def curve_markdown(curve: dict) -> list[str]:
    """The threshold curve's table and the sentence on its fastest point above the quality floor."""
    floor = fmt_share(curve["quality_floor"])
    out = ["## Quality against latency over confidence thresholds", "",
           f"{curve['requests']} requests ({', '.join(curve['groups'])}; at most {curve['max_tokens']} tokens each) at concurrency "
           f"{curve['concurrency']}, through one server per point: static, then dynamic under `runtime.policy.name=confidence` with "
           "each top-1 threshold at every exit (`runtime.policy.confidence`)"
           + (f" and the calibrated ones ({', '.join(f'exit {e}: {fmt_ratio(v)}' for e, v in curve['calibrated_thresholds'].items())})."
              if curve["calibrated_skipped"] is None else f"; no calibrated point: {curve['calibrated_skipped']}.")
           + f" Tokens equal: position by position against {curve['reference']}.", ""]
    rows = [[point_name(p), fmt_share(p["early_exit_share"]), fmt_s(p["mean_latency_s"]), fmt_ratio(p["latency_ratio"]), fmt_s(p["mean_tpot_s"]),
             fmt_share(p["token_agreement"]), ", ".join(f"{g} {fmt_share(v)}" for g, v in p["per_group"].items())] for p in curve["points"]]
    out += [table(["point", "exit early", "mean latency", "latency / static", "time per output token", "tokens equal to full depth",
                   "per group"], rows, "lrrrrrl"), ""]
    failed = [f"{point_name(p)}: {p['failed']}" for p in curve["points"] if p["failed"]]
    if failed:
        out += [f"Failed requests (left out of the figures): {'; '.join(failed)}.", ""]
    best = curve["at_quality_floor"]
    out += [(f"At ≥ {floor} of tokens equal to full-depth greedy, the fastest point of the curve is {point_name({'mode': 'dynamic', **best})}: "
             f"latency {fmt_ratio(best['latency_ratio'])} of static, {fmt_s(best['mean_tpot_s'])} per output token, "
             f"{fmt_share(best['early_exit_share'])} of requests exit early, {fmt_share(best['token_agreement'])} of tokens equal."
             if best else f"No dynamic point of the curve keeps ≥ {floor} of tokens equal to full-depth greedy."), "",
            "Plot: `quality_latency.png`.", ""]
    return out


def timeline_markdown(modes: dict) -> list[str]:
    """Where each group's time to first token went on the server, at the lowest concurrency (no queue)."""
    out = []
    for mode, block in modes.items():
        parts = block["runs"][0]["summary"].get("ttft_parts_ms") if block["runs"] else None
        if not parts:
            continue
        names = list(dict.fromkeys(p for means in parts.values() for p in means))
        if not out:
            out += ["## Where the time to first token went", "",
                    f"The server's timeline (`dyngraph.timeline`), mean ms per part at concurrency {block['runs'][0]['concurrency']}; "
                    "`total` is the server's share of the TTFT the client measured (the rest: the request's and the first chunk's way).", ""]
        rows = [[f"{mode} {group}", *(f"{means.get(p, 0.0):.2f}" for p in names)] for group, means in parts.items()]
        out += [table(["mode / group", *names], rows, "l" + "r" * len(names)), ""]
    return out


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
        first = r.get("first_call_ttft_s") or {}
        rows.append([r["label"], str(r["layers"]), tpot, fmt_ms(r["roofline_s"]), fmt_fraction(r["fraction"]),
                     *(fmt_ms(r["ttft_s"].get(g)) + (f" (first call {fmt_ms(first[g])})" if first.get(g) is not None else "") for g in groups),
                     r["note"] or ""])
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
                     f"append_tokens of the prompt and the first id on the host, on a fresh generator after one at the same prompt "
                     f"length; in brackets that first generator's, ONNX Runtime's first run at the length. {sizes}.")
    notes.append("transformers: its mean time per output token and time to first token (eager generate) on the full-depth decoder.")
    notes.append(f"Roofline: not measured: {roof['skipped']}." if "skipped" in roof else
                 "Roofline: the weights a decode step reads (one embedding row, not the table) over the copy bandwidth of its device, measured in this run.")
    if any((r["fraction"] or 0) > 1 for r in batch1["rows"]):
        notes.append("Above 100% of roofline: those weights were read from caches faster than the device's measured copy bandwidth "
                     "(a model that fits in a CPU's caches); the bound does not apply to them.")
    out += ["\n".join(f"- {n}" for n in notes), ""]
    return out


def print_headline(report: dict, console: Console) -> None:
    heads, ratios = report["headline"], report["ratios"]
    t = Table(title=f"{report['manifest']['model']} / {report['manifest']['backend']} on {report['environment']['device']['name']}", title_justify="left")
    for col in ("", *heads, *(["dynamic/static"] if ratios else [])):
        t.add_column(col, justify="left" if not col else "right")
    rows = [("mean latency", "mean_latency_s", fmt_s, "mean_latency"), ("mean TTFT", "mean_ttft_s", fmt_s, "mean_ttft"),
            ("mean TPOT", "mean_tpot_s", fmt_s, "mean_tpot"), (memory_label(report).lower(), "peak_memory_bytes", fmt_bytes, "peak_memory"),
            ("energy per request", "energy_per_request_j", fmt_j, "energy_per_request"), ("early exit", "early_exit_share", fmt_share, None)]
    for title, key, show, r in rows:
        t.add_row(title, *(show(h[key]) for h in heads.values()), *([fmt_ratio(ratios.get(r)) if r else ""] if ratios else []))
    console.print(t)
    curve = report.get("threshold_curve") or {}
    if "points" in curve:
        console.print("threshold curve (latency / static, tokens equal to full depth): " + "; ".join(
            f"{point_name(p)} {fmt_ratio(p['latency_ratio'])}, {fmt_share(p['token_agreement'])}" for p in curve["points"]))
