"""`python -m pipeline bench 'bench.memory_budgets_gb=[...]'`: the dynamic mode with modules on demand
under each GPU memory budget (runtime.offload.gpu_memory_budget_gb; 0, no limit, always runs as the
reference), for each quantization in bench.quantizations (else export.quantize's export alone), beside
reference servers of each (bench.memory_budget_references: static, the static mode; resident, the
dynamic mode with every engine loaded at start; bench.memory_budget_servers sets both per
quantization), on the same workload at each concurrency level.

Each (quantization, server) is one server (bench/run.py's run_mode: warm-up, then the workload at each
level, memory sampled around it); with bench.memory_budget_phases the workload goes to it in parts, one
after the other, so that the first part's peak is its own. Per part and level the report gives the
peak memory (the bench's figure: NVML for a GPU, the server's RSS on the CPU) and its ratio to static's,
mean and p99 latency and their ratios to static, resident and no limit, the mean time to first token,
engine loads, budget evictions and load seconds per request (the server's /stats engine_loads before
and after the run), and the share of tokens equal to the no-limit server's greedy output and to
static's (full depth) at the lowest level (bench/quality.py).

Which servers run, in this order: static, no limit and resident for every quantization, then each
quantization's budgets as listed, so that a sweep cut short (bench.memory_budget_run_limit_s bounds
each run, a `timeout` around the command the whole; the report is rewritten after every server) loses
the last. A budget under which a path's engines do not all fit makes its requests reload engines at
every decode step: bound those runs. A budget at or above all of an export's engines never evicts: it
runs no server, and the no-limit rows stand for it. A budget the server refuses at start-up (smaller than the
largest engine a path needs: it exits 2 with one line naming both) is a row marked refused, with that
line; a server that fails is a row with its error, and the sweep goes on.

Reports go to `<output_dir>/<date>-<device>-<model>-<backend>-budgets/`, rewritten after every server:
budgets.json, budgets.md, budget_latency.png (mean latency against the budget, one line per
quantization and level, static's latency dotted) and the servers' logs.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench.host import cpu_model, git_state, open_nvml, slug, unique_dir
from bench.metrics import fmt_bytes, fmt_ratio, fmt_s, fmt_share, ratio, run_memory
from bench.quality import agreement
from bench.run import ModeResult, RunResult, check_request, quantization_label, run_mode
from bench.server import BenchError, ServerExited
from bench.workload import BenchRequest, active_groups
from contract.config import BenchApp
from pipeline.console import make_console

ON_DEMAND = "on demand"
# the reference servers: their mode and the overrides after every other
REFERENCES = {"static": ("static", ()), "resident": ("dynamic", ("runtime.offload.enabled=false",))}


@dataclass(frozen=True)
class Point:
    """One server of the sweep: a reference, or modules on demand under a budget (0: no limit)."""

    quantization: str
    server: str  # static | resident | on demand
    budget_gb: float | None = None  # on demand only

    @property
    def name(self) -> str:
        if self.budget_gb is None:
            return f"{self.quantization}-{self.server}"
        return f"{self.quantization}-{'unlimited' if self.budget_gb == 0 else f'{self.budget_gb:g}gb'}"

    @property
    def mode(self) -> str:
        return "dynamic" if self.budget_gb is not None else REFERENCES[self.server][0]

    @property
    def extra(self) -> tuple[str, ...]:
        if self.budget_gb is None:
            return REFERENCES[self.server][1]
        return "runtime.offload.enabled=true", f"runtime.offload.gpu_memory_budget_gb={self.budget_gb:g}"

    def key(self) -> dict:
        return {"quantization": self.quantization, "server": self.server, "budget_gb": self.budget_gb}


def budget_label(budget: float) -> str:
    return "no limit" if budget == 0 else f"{budget:g} GB"


def server_label(row: dict) -> str:
    return row["server"] if row["budget_gb"] is None else f"{ON_DEMAND}, {budget_label(row['budget_gb'])}"


def is_sweep(app: BenchApp) -> bool:
    return bool(app.bench.memory_budgets_gb or app.bench.memory_budget_servers)


def check_sweep(app: BenchApp, labels: list[str]) -> dict[str, tuple[list[str], list[float]]]:
    """Each quantization's reference servers and budgets (no limit first); bad settings refused in one line."""
    cfg = app.bench
    if cfg.soak is not None or cfg.speculation is not None:
        raise BenchError(f"bench.memory_budgets_gb={list(cfg.memory_budgets_gb)} sweeps the dynamic mode's budget: "
                         "it runs instead of a soak or bench=speculation, not with them")
    if cfg.memory_budget_servers:
        from exporters.quantize import BITS  # the exporter's torch.onnx imports, only for a sweep that names quantizations

        known = [quantization_label(q) for q in (None, *BITS)]  # one this sweep does not run is left alone: a preset's, narrowed
        unknown = [k for k in cfg.memory_budget_servers if k not in known]
        if unknown:
            raise BenchError(f"bench.memory_budget_servers names {', '.join(unknown)}, not a quantization ({', '.join(known)})")
    servers = {}
    for label in labels:
        own = cfg.memory_budget_servers.get(label)
        refs = cfg.memory_budget_references if own is None or own.references is None else own.references
        budgets = cfg.memory_budgets_gb if own is None or own.budgets_gb is None else own.budgets_gb
        where = f"bench.memory_budget_servers.{label}" if own is not None else "bench"
        if any(b < 0 for b in budgets):
            raise BenchError(f"{where}: budgets {list(budgets)}: budgets are GiB per device, 0 or more (0: no limit)")
        bad = [r for r in refs if r not in REFERENCES]
        if bad:
            raise BenchError(f"{where}: references {list(refs)}: {', '.join(bad)} is not one of {', '.join(REFERENCES)}")
        servers[label] = (list(dict.fromkeys(refs)), [0.0, *dict.fromkeys(float(b) for b in budgets if b != 0)])
    if cfg.memory_budget_run_limit_s < 0:
        raise BenchError(f"bench.memory_budget_run_limit_s={cfg.memory_budget_run_limit_s:g} must be 0 (no limit) or more")
    groups = active_groups(cfg)
    for phase, names in cfg.memory_budget_phases.items():
        missing = [g for g in names if g not in groups]
        if missing or not names:
            raise BenchError(f"bench.memory_budget_phases.{phase}={list(names)} must name groups of bench={cfg.name} that send "
                             f"requests ({', '.join(groups)}){': not ' + ', '.join(missing) if missing else ''}")
    return servers


def split_phases(app: BenchApp, requests: list[BenchRequest]) -> dict[str, list[BenchRequest]]:
    """The workload's parts in order (bench.memory_budget_phases), each in send order; one part, named after the workload, without."""
    phases = {name: [r for r in requests if r.group in groups] for name, groups in app.bench.memory_budget_phases.items()}
    empty = [name for name, chosen in phases.items() if not chosen]
    if empty:
        raise BenchError(f"bench.memory_budget_phases.{empty[0]} sends no request (its groups have count 0)")
    return phases or {app.bench.name: requests}


def plan(servers: dict[str, tuple[list[str], list[float]]], engine_bytes: dict[str, int]) -> tuple[list[Point], list[dict]]:
    """The servers in the order they run (static, no limit and resident for every quantization, then each
    quantization's budgets as listed), and the rows of the budgets that hold every engine (no server)."""
    points = [Point(q, "static") for q, (refs, _) in servers.items() if "static" in refs] \
        + [Point(q, ON_DEMAND, 0.0) for q in servers] + [Point(q, "resident") for q, (refs, _) in servers.items() if "resident" in refs]
    holds = []
    for q, (_, budgets) in servers.items():
        for b in budgets[1:]:
            if b * 2**30 >= engine_bytes[q]:
                holds.append({**Point(q, ON_DEMAND, b).key(), "phase": None, "concurrency": None, "holds_all": True})
            else:
                points.append(Point(q, ON_DEMAND, b))
    return points, holds


def run_budgets(app: BenchApp, server_overrides: list[str], console: Console | None = None) -> Path:
    """Run the sweep; return the report folder."""
    console = console or make_console()
    started = time.perf_counter()
    cfg = app.bench
    variants = {quantization_label(q): replace(app, export=replace(app.export, quantize=q), bench=replace(cfg, quantizations=[]))
                for q in (cfg.quantizations or [app.export.quantize])}
    servers = check_sweep(app, list(variants))
    checked = {label: check_request(variant) for label, variant in variants.items()}  # a missing export, before anything runs
    engine_bytes = {label: sum(e.bytes for e in manifest.engines.values()) for label, (_, manifest, _) in checked.items()}
    phases = {label: split_phases(app, requests) for label, (_, _, requests) in checked.items()}
    points, rows = plan(servers, engine_bytes)
    nvml = open_nvml(app)
    gpu = app.server.runtime != "cpu"
    device = (nvml.gpus[0].name if nvml and nvml.gpus else "GPU") if gpu else cpu_model()
    folder = unique_dir(Path(app.output_dir).expanduser() / (app.run_name or f"{datetime.now(timezone.utc):%Y-%m-%d}-"
                        f"{slug(device) if gpu else 'cpu-' + slug(device)}-{app.model.name}-{app.export.backend}-budgets"),
                        keep_name=bool(app.run_name))
    some = next(iter(phases.values()))
    report = {"model": app.model.name, "backend": app.export.backend, "device": device, "placement": app.server.runtime,
              "concurrency": list(cfg.concurrency), "phases": {name: {"groups": sorted({r.group for r in chosen}), "requests": len(chosen)}
                                                               for name, chosen in some.items()},
              "quantizations": list(variants), "budgets_gb": {q: b for q, (_, b) in servers.items()},
              "references": {q: r for q, (r, _) in servers.items()},
              "engine_bytes": engine_bytes, "engines": {label: str(checked[label][0]) for label in variants},
              "run_limit_s": cfg.memory_budget_run_limit_s or None, "servers": [p.name for p in points], "server_s": {}, "cut_short": None,
              "git": git_state(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "wall_s": None, "rows": rows}
    console.print(f"[bold]memory budgets[/] {len(points)} servers ({', '.join(p.name for p in points)}): "
                  f"{', '.join(f'{name} {len(chosen)} requests' for name, chosen in some.items())} x concurrency {list(cfg.concurrency)}")
    progress = Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, disable=not app.progress)
    point = None
    try:
        with progress:
            for point in points:
                variant = variants[point.quantization]
                overrides = [o for o in server_overrides if not o.startswith("export.quantize=")]
                overrides.append(f"export.quantize={variant.export.quantize or 'null'}")
                began = time.perf_counter()
                try:
                    result = run_mode(variant, point.mode, [], overrides, nvml, folder, progress, console, extra=point.extra,
                                      label=point.name, phases=phases[point.quantization], limit_s=cfg.memory_budget_run_limit_s or None)
                except ServerExited as e:
                    refused = e.code == 2 and bool(point.budget_gb)
                    console.print(f"{point.name}: {'refused' if refused else 'failed'}: {e.line if refused else e}")
                    rows.append({**point.key(), "phase": None, "concurrency": None, **({"refused": e.line} if refused else {"error": str(e)}),
                                 "log": f"server-{point.name}.log"})
                except BenchError as e:  # a warm-up request that failed, a server that died mid-run: the sweep goes on
                    console.print(f"{point.name}: failed: {e}")
                    rows.append({**point.key(), "phase": None, "concurrency": None, "error": str(e), "log": f"server-{point.name}.log"})
                else:
                    if result.gpu_labels and nvml:
                        report["device"] = nvml.info(result.gpu_labels[0]).name
                    rows += [summarize(point, run, result) for run in result.runs]
                report["server_s"][point.name] = round(time.perf_counter() - began, 1)  # start to stop: what a plan adds up
                write_report(report, folder, started)
    except KeyboardInterrupt:
        report["cut_short"] = f"interrupted while {point.name if point else 'the first server'} ran: its rows and the later servers' are missing"
        write_report(report, folder, started)
        raise BenchError(f"interrupted; the report in {folder} has the servers that finished") from None
    finally:
        if nvml is not None:
            nvml.close()
    write_report(report, folder, started)
    console.print(render_markdown(finished(report)), markup=False, highlight=False)
    console.print(f"report: {folder / 'budgets.md'} ({time.perf_counter() - started:.0f} s)")
    failed = sum(r.get("failed", 0) for r in rows)
    errors = [r for r in rows if r.get("error")]
    if failed or errors:
        raise BenchError(f"{failed} requests failed and {len(errors)} servers failed under the budgets; the report in {folder} records them")
    return folder


def summarize(point: Point, run: RunResult, result: ModeResult) -> dict:
    """One served (server, phase, concurrency) row; its outputs stay (`_outputs`) for the token comparisons."""
    ok = [r for r in run.requests if r.ok]
    latencies = [r.latency_s for r in ok if r.latency_s is not None]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    before, after = run.stats_before.get("engine_loads") or {}, run.stats.get("engine_loads") or {}

    def delta(key: str) -> float:
        return sum(v.get(key, 0) for v in after.values()) - sum(v.get(key, 0) for v in before.values())

    memory = run_memory(run, result.gpu_labels, result.baseline_device_used)
    n = len(run.requests)
    cut = sum(r.cut for r in run.requests)
    return {**point.key(), "phase": run.phase, "concurrency": run.concurrency, "requests": n, "cut": cut,
            "failed": n - len(ok) - cut, "errors": sorted({r.error for r in run.requests if not r.ok and not r.cut}),
            "startup_s": result.startup_s, "run_s": run.duration_s,
            "peak_memory_bytes": memory["peak_memory_bytes"], "memory_method": memory["method"],
            "resident_engine_bytes": run.stats.get("resident_engine_bytes"),
            "latency_mean_s": statistics.fmean(latencies) if latencies else None,
            "latency_p99_s": float(np.percentile(latencies, 99)) if latencies else None,
            "ttft_mean_s": statistics.fmean(ttfts) if ttfts else None,
            "engine_loads": delta("loads"), "engine_loads_per_request": delta("loads") / n if n else None,
            "budget_evictions_per_request": delta("unloads_budget") / n if n else None,
            "load_seconds_per_request": delta("load_seconds") / n if n else None,
            "log": result.log_file, "_outputs": {r.index: r.tokens for r in ok}}


def served(row: dict) -> bool:
    return "requests" in row


def compare(rows: list[dict]) -> None:
    """Each served row against its quantization's references in the same phase: peak and latency over
    static's, resident's and no limit's at the same level; tokens equal to no limit's and to static's
    (full depth) greedy output at their lowest level."""
    def reference(row: dict, server: str, budget: float | None, lowest: bool = False) -> dict | None:
        same = [r for r in rows if served(r) and r["quantization"] == row["quantization"] and r["phase"] == row["phase"]
                and r["server"] == server and r["budget_gb"] == budget and (lowest or r["concurrency"] == row["concurrency"])]
        return min(same, key=lambda r: r["concurrency"]) if same else None

    def tokens(row: dict, base: dict | None) -> tuple[float | None, int]:
        pairs = [agreement(out, base["_outputs"][i]) for i, out in row["_outputs"].items() if base and i in base["_outputs"]]
        equal, compared = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
        return (equal / compared if compared else None), compared

    for row in filter(served, rows):
        static, resident, unlimited = (reference(row, "static", None), reference(row, "resident", None),
                                       reference(row, ON_DEMAND, 0.0))
        row["peak_vs_static"] = ratio(row["peak_memory_bytes"], static and static["peak_memory_bytes"])
        for name, base in (("static", static), ("resident", resident), ("unlimited", unlimited)):
            row[f"latency_vs_{name}"] = ratio(row["latency_mean_s"], base and base["latency_mean_s"])
        row["tokens_equal"], row["tokens_compared"] = tokens(row, reference(row, ON_DEMAND, 0.0, lowest=True))
        row["tokens_equal_full_depth"], row["tokens_compared_full_depth"] = tokens(row, reference(row, "static", None, lowest=True))


def finished(report: dict) -> dict:
    """The report as written: ratios and token shares filled in, the outputs left out."""
    rows = [dict(r) for r in report["rows"]]
    compare(rows)
    for r in rows:
        r.pop("_outputs", None)
    return {**report, "rows": rows}


def write_report(report: dict, folder: Path, started: float) -> None:
    report["wall_s"] = round(time.perf_counter() - started, 1)
    out = finished(report)
    (folder / "budgets.json").write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    (folder / "budgets.md").write_text(render_markdown(out))
    plot(out, folder / "budget_latency.png")


def render_markdown(report: dict) -> str:
    refs = {r for rs in report["references"].values() for r in rs}
    servers = "; ".join(f"{q} ({fmt_bytes(report['engine_bytes'][q])} of engines): "
                        f"{', '.join([*report['references'][q], *(budget_label(b) for b in report['budgets_gb'][q])])}"
                        for q in report["quantizations"])
    lines = [f"# Memory budgets: {report['model']} ({report['backend']}) on {report['device']}", "",
             f"Modules on demand (`runtime.offload.enabled=true`) under each `runtime.offload.gpu_memory_budget_gb` (GiB of engine "
             f"weights per device; no limit: nothing is evicted) beside {' and '.join(REFERENCE_TEXT[r] for r in REFERENCES if r in refs) or 'no reference server'}, "
             f"placement {report['placement']}, concurrency {report['concurrency']}. Servers: {servers}. Peak memory: {memory_method(report)}; "
             "× static: over the static server's at the same level. Tokens: the share equal to the no-limit server's greedy output "
             "(and to static's, full depth) at its lowest level."
             + (f" Each run stopped after {report['run_limit_s']:g} s, its unfinished requests counted as cut." if report["run_limit_s"] else "")
             + f" Git {(report['git'].get('commit') or '?')[:12]}, {report['date']}, {report['wall_s']} s in all.", ""]
    if report["cut_short"]:
        lines += [f"**Cut short**: {report['cut_short']}.", ""]
    rows = report["rows"]
    headers = ["quantization", "server", "concurrency", "peak memory", "× static", "mean latency", "× static", "× no limit",
               *(["× resident"] if "resident" in refs else []), "p99 latency", "mean TTFT", "loads / request", "evictions / request",
               "load s / request", "tokens = no limit", *(["tokens = static"] if "static" in refs else []), "failed", "cut"]
    for phase, info in report["phases"].items():
        lines += [f"## {phase}: {info['requests']} requests ({', '.join(info['groups'])})", "",
                  "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        for r in (r for r in rows if served(r) and r["phase"] == phase):
            cells = [r["quantization"], server_label(r), str(r["concurrency"]), fmt_bytes(r["peak_memory_bytes"]),
                     fmt_ratio(r["peak_vs_static"]), fmt_s(r["latency_mean_s"]), fmt_ratio(r["latency_vs_static"]),
                     fmt_ratio(r["latency_vs_unlimited"]), *([fmt_ratio(r["latency_vs_resident"])] if "resident" in refs else []),
                     fmt_s(r["latency_p99_s"]), fmt_s(r["ttft_mean_s"]), f"{r['engine_loads_per_request']:.2f}",
                     f"{r['budget_evictions_per_request']:.2f}", f"{r['load_seconds_per_request']:.2f}", fmt_share(r["tokens_equal"]),
                     *([fmt_share(r["tokens_equal_full_depth"])] if "static" in refs else []), str(r["failed"]), str(r["cut"])]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    others = [r for r in rows if not served(r)]
    if others:
        lines += ["Not measured:", ""]
        for r in others:
            what = (f"holds every engine ({fmt_bytes(report['engine_bytes'][r['quantization']])}): nothing is ever evicted, the no-limit rows stand for it"
                    if r.get("holds_all") else f"refused at start-up: {r['refused']}" if r.get("refused") else f"failed: {r['error']}")
            lines.append(f"- {r['quantization']}, {server_label(r)}: {what}")
        lines.append("")
    return "\n".join(lines)


REFERENCE_TEXT = {"static": "the static mode (every engine resident, full depth)",
                  "resident": "the dynamic mode with every engine loaded at start (`runtime.offload.enabled=false`, resident)"}


def memory_method(report: dict) -> str:
    methods = {r["memory_method"] for r in report["rows"] if r.get("memory_method")}
    return "; ".join(sorted(methods)) or "none measured"


def plot(report: dict, path: Path) -> None:
    """Mean latency against the budget (no limit at the right), one panel per phase, one line per
    quantization and level; a budget that holds every engine takes no limit's figure, static's latency dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({b for bs in report["budgets_gb"].values() for b in bs if b}) + [0.0]
    rows = report["rows"]
    phases = list(report["phases"])
    fig, axes = plt.subplots(1, len(phases), figsize=(6.5 * len(phases), 4), squeeze=False)
    levels = sorted({r["concurrency"] for r in rows if served(r)})
    for ax, phase in zip(axes[0], phases):
        mine = [r for r in rows if served(r) and r["phase"] == phase]
        for i, quantization in enumerate(report["quantizations"]):
            for level in levels:
                at = {r["budget_gb"]: r["latency_mean_s"] for r in mine
                      if r["quantization"] == quantization and r["concurrency"] == level and r["server"] == ON_DEMAND}
                holds = {r["budget_gb"] for r in rows if r.get("holds_all") and r["quantization"] == quantization}
                points = [(x, at.get(0.0) if b in holds else at.get(b)) for x, b in enumerate(budgets)
                          if b in report["budgets_gb"][quantization]]
                points = [(x, y) for x, y in points if y is not None]  # a budget refused, or not reached before a cut
                if not points:
                    continue
                colour = f"C{i * len(levels) + levels.index(level)}"
                name = quantization + (f", concurrency {level}" if len(levels) > 1 else "")
                ax.plot(*zip(*points), marker="o", color=colour, label=name)
                static = [r["latency_mean_s"] for r in mine if r["quantization"] == quantization and r["concurrency"] == level
                          and r["server"] == "static" and r["latency_mean_s"] is not None]
                if static:
                    ax.axhline(static[0], color=colour, linestyle=":", linewidth=1, label=f"{name}: static")
        refused = sorted({r["budget_gb"] for r in rows if r.get("refused")})
        ax.set_xticks(range(len(budgets)), [budget_label(b) + (" (refused)" if b in refused else "") for b in budgets], fontsize=8)
        ax.set_xlabel("runtime.offload.gpu_memory_budget_gb")
        ax.set_ylabel("mean latency (s)")
        ax.set_yscale("log")
        ax.set_title(f"{phase}: latency under a memory budget, {report['model']} on {report['device']}", fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
