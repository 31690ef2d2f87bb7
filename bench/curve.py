"""bench.threshold_curve: quality against latency over the confidence policy's thresholds.

After the modes, the bench starts one server per point of the curve and sends each the same
requests (bench.threshold_curve.groups / .requests, at most .max_tokens tokens each) at one
concurrency level: a static server first, whose greedy full-depth output is the reference and
whose latency is the yardstick, then a dynamic server under `runtime.policy.name=confidence` at each
threshold (`runtime.policy.confidence=T`, the same top-1 threshold at every exit) and, where the
engines carry calibrated thresholds, one at those (`runtime.policy.confidence=null`). Per point the
report gives the mean latency over static's, the time per output token, the share of requests that
exit early and the share of tokens equal to the reference (bench/metrics.py curve_block), in a table
of report.md and in quality_latency.png. A threshold of 1.0 exits nowhere but at full depth.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from contract.config import BenchApp
from contract.manifest import Manifest
from bench.server import BenchError
from bench.workload import BenchRequest

CONFIDENCE = "runtime.policy.name=confidence"


@dataclass(frozen=True)
class Point:
    label: str  # "static", the threshold ("0.9"), "calibrated"; its server's log is server-curve-<label>.log
    mode: str
    threshold: float | None  # the top-1 threshold at every exit; None: static, or the calibrated ones
    extra: tuple[str, ...]  # the server's overrides for it


def check_curve(app: BenchApp) -> None:
    """The curve's settings, before anything runs."""
    cfg = app.bench.threshold_curve
    if not cfg.thresholds:
        return
    if app.bench.temperature != 0:
        raise BenchError(f"bench.threshold_curve needs greedy outputs to compare (bench.temperature=0, not {app.bench.temperature})")
    bad = [t for t in cfg.thresholds if not 0.0 <= t <= 1.0]
    if bad:
        raise BenchError(f"bench.threshold_curve.thresholds={list(cfg.thresholds)}: {bad[0]} is not a probability")
    unknown = [g for g in cfg.groups if g not in app.bench.groups]
    if unknown:
        raise BenchError(f"bench.threshold_curve.groups names {unknown[0]!r}, not a group of bench={app.bench.name} ({', '.join(app.bench.groups)})")
    if cfg.requests < 0 or cfg.max_tokens < 0 or cfg.concurrency < 1:
        raise BenchError("bench.threshold_curve: requests and max_tokens must be >= 0 (0: all) and concurrency >= 1")


def curve_requests(app: BenchApp, requests: list[BenchRequest]) -> list[BenchRequest]:
    """The workload's requests the curve sends, in send order, each capped at max_tokens."""
    cfg = app.bench.threshold_curve
    chosen = [r for r in requests if not cfg.groups or r.group in cfg.groups]
    chosen = chosen[:cfg.requests] if cfg.requests else chosen
    if not chosen:
        raise BenchError(f"bench.threshold_curve: the groups {list(cfg.groups)} send no request in this workload")
    return [replace(r, max_tokens=min(r.max_tokens, cfg.max_tokens)) if cfg.max_tokens else r for r in chosen]


def curve_points(app: BenchApp, manifest: Manifest) -> tuple[list[Point], str | None]:
    """The servers to run, the static reference first; and why the calibrated point is left out, if it is."""
    cfg = app.bench.threshold_curve
    points = [Point("static", "static", None, ())]
    points += [Point(f"{t:g}", "dynamic", t, (CONFIDENCE, f"runtime.policy.confidence={t}")) for t in sorted(set(cfg.thresholds))]
    calibrated = (manifest.exits or {}).get("thresholds")
    missing = None
    if not cfg.calibrated:
        missing = "bench.threshold_curve.calibrated=false"
    elif not calibrated:
        missing = "the engines carry no calibrated thresholds (python -m pipeline calibrate)"
    else:
        points.append(Point("calibrated", "dynamic", None, (CONFIDENCE, "runtime.policy.confidence=null")))
    return points, missing


def run_curve(app: BenchApp, manifest: Manifest, requests: list[BenchRequest], run_point: Callable) -> dict:
    """Each point's server through the curve's requests; `run_point(mode, requests, levels, extra, label)`
    is bench/run.py's run_mode for one server. Returns what bench/metrics.py curve_block reads."""
    cfg = app.bench.threshold_curve
    chosen = curve_requests(app, requests)
    points, missing = curve_points(app, manifest)
    results = {p.label: (p, run_point(p.mode, chosen, [cfg.concurrency], p.extra, f"curve-{p.label}")) for p in points}
    return {"results": results, "requests": chosen, "calibrated_skipped": missing, "thresholds": calibrated_thresholds(manifest)}


def calibrated_thresholds(manifest: Manifest) -> dict[str, float | None] | None:
    return (manifest.exits or {}).get("thresholds")
