"""A calibration's plots: agreement.png (agreement against threshold and exit rate, per exit) and
training.png (the heads' training loss and held-out KL)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from calibrate.run import TrainResult


def write_plots(report: dict, result: TrainResult, directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(11, 4.2))
    for k, e in enumerate(report["exits"]):
        color = colors[k % len(colors)]
        for which, style in (("after", "-"), ("before", ":")):
            curve = e["curve"][which]
            label = f"exit {e['exit_layer']}" + (" (uncalibrated)" if which == "before" else "")
            ax_t.plot(curve["threshold"], curve["agreement"], style, color=color, label=label)
            ax_r.plot(curve["exit_rate"], curve["agreement"], style, color=color, label=label)
        at = e["at_threshold"]
        if e["threshold"] is not None:
            ax_t.plot([e["threshold"]], [at["agreement"]], "o", color=color)
            ax_r.plot([at["exit_rate"]], [at["agreement"]], "o", color=color)
    for ax in (ax_t, ax_r):
        ax.axhline(report["config"]["target_agreement"], color="grey", ls="--", lw=1, label="target")
        ax.set_ylabel("top-1 agreement with full depth")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    ax_t.set_xlabel("threshold on the exit's top-1 probability")
    ax_r.set_xlabel("exit rate (share of held-out positions at or above the threshold)")
    ax_t.legend(fontsize=7)
    fig.suptitle(agreement_title(report), fontsize=10)
    written.append(save(fig, plt, directory / "agreement.png"))

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for k, e in enumerate(report["exits"]):
        losses = result.losses[k]
        if losses:
            window = max(1, len(losses) // 50)
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            ax.plot(np.arange(len(smooth)) + window, smooth, color=colors[k % len(colors)], label=f"exit {e['exit_layer']} (train)")
        ax.axhline(e["heldout"]["before"]["kl"], color=colors[k % len(colors)], ls=":", lw=1)
        ax.axhline(e["heldout"]["after"]["kl"], color=colors[k % len(colors)], ls="--", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("KL(full depth || exit), nats")
    ax.set_yscale("log")
    ax.set_title("training batches; held-out before (dotted) and after (dashed)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    written.append(save(fig, plt, directory / "training.png"))
    return written


def agreement_title(report: dict) -> str:
    """agreement.png's title: it promises dots only when a threshold was chosen, and so drawn."""
    chosen = any(e["threshold"] is not None for e in report["exits"])
    return (f"{report['model']['name']}: held-out agreement per exit "
            f"({'dots: the chosen thresholds' if chosen else 'no exit reaches the target: no threshold chosen'})")


def save(fig, plt, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return path
