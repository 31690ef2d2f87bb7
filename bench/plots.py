"""The bench report's PNG plots (matplotlib, files only): latency distributions, memory per device,
energy per request, exit depth and batch-1 decode, each drawn from report.json's content."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.metrics import fmt_fraction, fmt_s

COLORS = {"static": "#4c72b0", "dynamic": "#dd8452"}


def write_plots(report: dict, directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, whatever display the machine has
    import matplotlib.pyplot as plt

    written = []
    for name, draw in (("latency.png", plot_latency), ("memory.png", plot_memory), ("energy.png", plot_energy), ("exits.png", plot_exits),
                       ("decode.png", plot_decode), ("quality_latency.png", plot_quality_latency)):
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


def plot_quality_latency(report: dict, plt):
    """The threshold curve: tokens equal to full-depth greedy against latency relative to static, a point per server."""
    curve = report.get("threshold_curve") or {"skipped": "no curve"}
    points = [p for p in curve.get("points", []) if p["latency_ratio"] is not None and p["token_agreement"] is not None]
    if "skipped" in curve or not points:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.4))
    swept = sorted((p for p in points if p["threshold"] is not None), key=lambda p: p["threshold"])
    if swept:
        ax.plot([p["latency_ratio"] for p in swept], [100 * p["token_agreement"] for p in swept], "-o", color=COLORS["dynamic"],
                label="dynamic, top-1 threshold at every exit")
        for k, p in enumerate(swept):  # labels above and below in turn: points of equal quality sit side by side
            ax.annotate(f"{p['threshold']:g}", (p["latency_ratio"], 100 * p["token_agreement"]), textcoords="offset points",
                        xytext=(4, 6 if k % 2 == 0 else -12), fontsize=8)
    marks = {"static": ("s", COLORS["static"], "static (full depth)"), "calibrated": ("*", "#c44e52", "calibrated thresholds")}
    for p in points:
        if p["label"] in marks:
            marker, color, name = marks[p["label"]]
            ax.scatter([p["latency_ratio"]], [100 * p["token_agreement"]], marker=marker, s=120, color=color, zorder=3, label=name)
    ax.axhline(100 * curve["quality_floor"], color="grey", ls=":", lw=1, label=f"{100 * curve['quality_floor']:.0f}% of tokens equal")
    best = curve.get("at_quality_floor")
    if best:
        ax.axvline(best["latency_ratio"], color="grey", ls="--", lw=1, label=f"fastest above it: {best['latency_ratio']:.2f} of static")
    ax.set_xlabel("mean latency relative to static")
    ax.set_ylabel("tokens equal to full-depth greedy (%)")
    low = min(100 * p["token_agreement"] for p in points)
    ax.set_ylim(max(0.0, low - 5), 102)
    ax.set_yticks([y for y in ax.get_yticks() if max(0.0, low - 5) <= y <= 100])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"Quality against latency over confidence thresholds ({curve['requests']} requests, concurrency {curve['concurrency']})",
                 fontsize=10)
    fig.tight_layout()
    return fig
