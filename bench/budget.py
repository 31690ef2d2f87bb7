"""`python -m pipeline bench 'bench.memory_budgets_gb=[...]'`: the dynamic mode with modules on demand
under each GPU memory budget (runtime.offload.gpu_memory_budget_gb; 0, no limit, always runs first as
the reference), for each quantization in bench.quantizations (else export.quantize's export alone),
on the same workload at each concurrency level.

Each (quantization, budget) is one server (bench/run.py's run_mode: warm-up, then the workload at each
level, memory sampled around it). Per level the report gives the peak memory (the bench's figure:
NVML for a GPU, the server's RSS on the CPU), mean and p99 latency, engine loads and budget evictions
per request (the server's /stats engine_loads before and after the run) and the share of tokens equal
to the unlimited budget's greedy output at the lowest level (bench/quality.py). A budget the server
refuses at start-up (smaller than the largest engine a path needs: it exits 2 with one line naming
both) is a row marked refused, with that line.

Reports go to `<output_dir>/<date>-<device>-<model>-<backend>-budgets/`: budgets.json, budgets.md,
budget_latency.png (mean latency against the budget, one line per quantization and level) and the
servers' logs.
"""
from __future__ import annotations

import json
import statistics
import tempfile
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench.host import cpu_model, git_state, open_nvml, report_folder, slug
from bench.metrics import fmt_bytes, fmt_s, fmt_share, run_memory
from bench.quality import agreement
from bench.run import ModeResult, RunResult, check_request, quantization_label, run_mode
from bench.server import BenchError, ServerExited
from contract.config import BenchApp
from pipeline.console import make_console

OFFLOAD = "runtime.offload.enabled=true"


def budget_label(budget: float) -> str:
    return "no limit" if budget == 0 else f"{budget:g} GB"


def check_budgets(app: BenchApp) -> list[float]:
    """The budgets to run, the unlimited reference first; bad settings refused in one line."""
    cfg = app.bench
    if cfg.soak is not None or cfg.speculation is not None:
        raise BenchError(f"bench.memory_budgets_gb={list(cfg.memory_budgets_gb)} sweeps the dynamic mode's budget: "
                         "it runs instead of a soak or bench=speculation, not with them")
    bad = [b for b in cfg.memory_budgets_gb if b < 0]
    if bad:
        raise BenchError(f"bench.memory_budgets_gb={list(cfg.memory_budgets_gb)}: budgets are GiB per device, 0 or more (0: no limit)")
    return [0.0, *dict.fromkeys(float(b) for b in cfg.memory_budgets_gb if b != 0)]


def run_budgets(app: BenchApp, server_overrides: list[str], console: Console | None = None) -> Path:
    """Run the sweep; return the report folder."""
    console = console or make_console()
    budgets = check_budgets(app)
    variants = {quantization_label(q): replace(app, export=replace(app.export, quantize=q),
                                               bench=replace(app.bench, quantizations=[], memory_budgets_gb=[]))
                for q in (app.bench.quantizations or [app.export.quantize])}
    checked = {label: check_request(variant) for label, variant in variants.items()}  # a missing export, before anything runs
    nvml = open_nvml(app)
    log_dir = Path(tempfile.mkdtemp(prefix="dyngraph-budgets-"))
    some = next(iter(checked.values()))[2]
    console.print(f"[bold]memory budgets[/] {', '.join(budget_label(b) for b in budgets)}: {len(some)} requests x concurrency "
                  f"{list(app.bench.concurrency)}, dynamic mode with modules on demand, {', '.join(variants)}")
    rows: list[dict] = []
    gpu_labels: set[str] = set()
    progress = Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, disable=not app.progress)
    try:
        with progress:
            for label, variant in variants.items():
                _, _, requests = checked[label]
                overrides = [o for o in server_overrides if not o.startswith("export.quantize=")]
                overrides.append(f"export.quantize={variant.export.quantize or 'null'}")
                for budget in budgets:
                    name = f"{label}-{'unlimited' if budget == 0 else f'{budget:g}gb'}"
                    extra = (OFFLOAD, f"runtime.offload.gpu_memory_budget_gb={budget:g}")
                    try:
                        result = run_mode(variant, "dynamic", requests, overrides, nvml, log_dir, progress, console, extra=extra, label=name)
                    except ServerExited as e:
                        if e.code != 2:  # a crash, not a refusal
                            raise
                        console.print(f"{name}: refused: {e.line}")
                        rows.append({"quantization": label, "budget_gb": budget, "concurrency": None, "refused": e.line,
                                     "log": f"server-{name}.log"})
                        continue
                    gpu_labels.update(result.gpu_labels)
                    rows += [summarize(label, budget, run, result) for run in result.runs]
        device = (nvml.info(sorted(gpu_labels)[0]).name if nvml else "GPU") if gpu_labels else cpu_model()
    finally:
        if nvml is not None:
            nvml.close()
    compare_tokens(rows)
    report = {"model": app.model.name, "backend": app.export.backend, "device": device, "placement": app.server.runtime,
              "requests": len(some), "concurrency": list(app.bench.concurrency), "budgets_gb": budgets,
              "quantizations": list(variants), "engines": {label: str(checked[label][0]) for label in variants},
              "git": git_state(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rows": rows}
    device_slug = slug(device) if gpu_labels else "cpu-" + slug(device)
    report_dir = report_folder(app, f"{datetime.now(timezone.utc):%Y-%m-%d}-{device_slug}-{app.model.name}-{app.export.backend}-budgets", log_dir)
    (report_dir / "budgets.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (report_dir / "budgets.md").write_text(render_markdown(report))
    plot(report, report_dir / "budget_latency.png")
    console.print(render_markdown(report), markup=False, highlight=False)
    console.print(f"report: {report_dir / 'budgets.md'}")
    failed = sum(r.get("failed", 0) for r in rows)
    if failed:
        raise BenchError(f"{failed} requests failed under the budgets; the report in {report_dir} records them")
    return report_dir


def summarize(quantization: str, budget: float, run: RunResult, result: ModeResult) -> dict:
    """One served (quantization, budget, concurrency) row; its outputs stay until compare_tokens."""
    ok = [r for r in run.requests if r.ok]
    latencies = [r.latency_s for r in ok if r.latency_s is not None]
    before, after = run.stats_before.get("engine_loads") or {}, run.stats.get("engine_loads") or {}

    def delta(key: str) -> int:
        return sum(v.get(key, 0) for v in after.values()) - sum(v.get(key, 0) for v in before.values())

    memory = run_memory(run, result.gpu_labels, result.baseline_device_used)
    n = len(run.requests)
    return {"quantization": quantization, "budget_gb": budget, "concurrency": run.concurrency, "refused": None,
            "requests": n, "failed": n - len(ok), "errors": sorted({r.error for r in run.requests if not r.ok}),
            "peak_memory_bytes": memory["peak_memory_bytes"], "memory_method": memory["method"],
            "resident_engine_bytes": run.stats.get("resident_engine_bytes"),
            "latency_mean_s": statistics.fmean(latencies) if latencies else None,
            "latency_p99_s": float(np.percentile(latencies, 99)) if latencies else None,
            "engine_loads": delta("loads"), "engine_loads_per_request": delta("loads") / n if n else None,
            "budget_evictions_per_request": delta("unloads_budget") / n if n else None,
            "load_seconds_per_request": delta("load_seconds") / n if n else None,
            "log": result.log_file, "outputs": {r.index: r.tokens for r in ok}}


def compare_tokens(rows: list[dict]) -> None:
    """Each served row's tokens against its quantization's unlimited budget at the lowest level (greedy)."""
    for row in rows:
        if row["refused"] is not None:
            continue
        served = [r for r in rows if r["quantization"] == row["quantization"] and r["budget_gb"] == 0 and r["refused"] is None]
        reference = min(served, key=lambda r: r["concurrency"])["outputs"] if served else {}
        pairs = [agreement(out, reference[i]) for i, out in row["outputs"].items() if i in reference]
        equal, compared = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
        row["tokens_equal"] = equal / compared if compared else None
        row["tokens_compared"] = compared
    for row in rows:
        row.pop("outputs", None)


def render_markdown(report: dict) -> str:
    lines = [f"# Memory budgets: {report['model']} ({report['backend']}) on {report['device']}", "",
             f"Dynamic mode with modules on demand under each `runtime.offload.gpu_memory_budget_gb` (GiB of engine weights "
             f"per device; no limit is the reference), {report['requests']} requests per concurrency level, placement "
             f"{report['placement']}. Peak memory: {memory_method(report)}. Tokens equal: the share of generated tokens equal "
             f"to the unlimited budget's greedy output at the lowest level. Git {(report['git'].get('commit') or '?')[:12]}, "
             f"{report['date']}.", "",
             "| quantization | budget | concurrency | peak memory | mean latency | p99 latency | engine loads / request "
             "| budget evictions / request | tokens equal | failed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if r["refused"] is not None:
            lines.append(f"| {r['quantization']} | {budget_label(r['budget_gb'])} | – | refused: {r['refused'].replace('|', '/')} "
                         "| – | – | – | – | – | – |")
            continue
        lines.append(f"| {r['quantization']} | {budget_label(r['budget_gb'])} | {r['concurrency']} | {fmt_bytes(r['peak_memory_bytes'])} "
                     f"| {fmt_s(r['latency_mean_s'])} | {fmt_s(r['latency_p99_s'])} | {r['engine_loads_per_request']:.2f} "
                     f"| {r['budget_evictions_per_request']:.2f} | {fmt_share(r['tokens_equal'])} | {r['failed']} |")
    return "\n".join(lines) + "\n"


def memory_method(report: dict) -> str:
    methods = {r["memory_method"] for r in report["rows"] if r.get("memory_method")}
    return "; ".join(sorted(methods)) or "none measured"


def plot(report: dict, path: Path) -> None:
    """Mean latency against the budget (no limit at the right), one line per quantization and concurrency level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted(b for b in report["budgets_gb"] if b) + [0.0]
    fig, ax = plt.subplots(figsize=(7, 4))
    served = [r for r in report["rows"] if r["refused"] is None]
    levels = sorted({r["concurrency"] for r in served})
    for quantization in report["quantizations"]:
        for level in levels:
            by_budget = {r["budget_gb"]: r["latency_mean_s"] for r in served if r["quantization"] == quantization and r["concurrency"] == level}
            ys = [by_budget.get(b) for b in budgets]
            name = quantization + (f", concurrency {level}" if len(levels) > 1 else "")
            ax.plot(range(len(budgets)), [np.nan if y is None else y for y in ys], marker="o", label=name)
    refused = sorted({r["budget_gb"] for r in report["rows"] if r["refused"] is not None})
    ax.set_xticks(range(len(budgets)), [budget_label(b) + (" (refused)" if b in refused else "") for b in budgets], fontsize=8)
    ax.set_xlabel("runtime.offload.gpu_memory_budget_gb")
    ax.set_ylabel("mean latency (s)")
    ax.set_title(f"Latency under a memory budget, {report['model']} on {report['device']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
