"""`python -m pipeline compare BASE.json NEW.json`: every metric of two bench reports, its change,
and whether the change is a regression past its tolerance (exit status 1) or not (0).

Each metric in a report says what may be compared with what (see bench/metrics.py): what ran
(exit shares, weights read per token, engine bytes, failed requests, tokens equal to full-depth
greedy) across machines; peak memory between two GPU runs or two CPU runs; times, throughput,
energy and every ratio of them only between reports of the same machine class. What is skipped,
and why, is printed: one line per reason.
"""
from __future__ import annotations

import fnmatch
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from contract.config import CompareConfig
from bench.metrics import KIND_SCOPES, fmt_bytes, fmt_s
from bench.report import REPORT_KIND, SCHEMA_VERSION

KINDS = tuple(KIND_SCOPES)
DEFAULT_TOLERANCE = 0.10
EPSILON = 1e-9  # float noise in a ratio of equal numbers is not a change


class CompareError(ValueError):
    """Input that cannot be compared (missing file, not a report, another schema): one line, exit 2."""


def load_report(path: str | Path) -> dict:
    p = Path(path)
    if not str(path):
        raise CompareError("give two reports: python -m pipeline compare BASE.json NEW.json")
    if not p.is_file():
        raise CompareError(f"{p}: no such file")
    try:
        report = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CompareError(f"{p} is not a JSON file: {e}") from None
    if not isinstance(report, dict) or report.get("kind") != REPORT_KIND:
        raise CompareError(f"{p} is not a dyngraph bench report (no \"kind\": \"{REPORT_KIND}\")")
    if report.get("schema_version") != SCHEMA_VERSION:
        raise CompareError(f"{p} has report schema version {report.get('schema_version')}, this dyngraph reads {SCHEMA_VERSION}: "
                           "run the bench again to compare")
    if not isinstance(report.get("metrics"), dict):
        raise CompareError(f"{p} has no metrics")
    return report


def tolerance_for(name: str, tolerances: dict[str, float]) -> float:
    """The exact name's tolerance, else the longest (most specific) matching glob's."""
    if name in tolerances:
        return float(tolerances[name])
    matches = [p for p in tolerances if fnmatch.fnmatchcase(name, p)]
    return float(tolerances[max(matches, key=len)]) if matches else DEFAULT_TOLERANCE


@dataclass
class Row:
    name: str
    base: float
    new: float
    change: float  # relative (fraction of base) or absolute, as the metric's tolerance is
    tolerance: float
    absolute: bool
    unit: str
    verdict: str  # ok (within tolerance) | better (past it, the good way) | REGRESSION


@dataclass
class Comparison:
    rows: list[Row] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> metric names
    notes: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[Row]:
        return [r for r in self.rows if r.verdict == "REGRESSION"]

    def skip(self, reason: str, name: str) -> None:
        self.skipped.setdefault(reason, []).append(name)


def judge(better: str, base: float, new: float, tolerance: float, absolute: bool) -> tuple[float, str]:
    if absolute:
        change = new - base
    elif base == 0:
        change = 0.0 if new == 0 else math.copysign(math.inf, new)
    else:
        change = (new - base) / abs(base)
    worse = {"lower": change, "higher": -change, "equal": abs(change)}[better]
    if worse > tolerance + EPSILON:
        return change, "REGRESSION"
    if better != "equal" and -worse > tolerance + EPSILON:
        return change, "better"
    return change, "ok"


def describe(report: dict) -> str:
    m, w = report["manifest"], report["workload"]
    return (f"{report.get('name')}: {m['model']}/{m['backend']} {m['dtype']} on {report['environment']['machine_class']}, "
            f"workload {w['name']} [{w['fingerprint'][:8]}]")


def compare_reports(base: dict, new: dict, cfg: CompareConfig, tolerances: dict[str, float]) -> Comparison:
    out = Comparison()
    unknown = [k for k in cfg.kinds if k not in KINDS]
    if unknown:
        raise CompareError(f"compare.kinds has {unknown}; the kinds are {list(KINDS)}")
    bd, nd = base["environment"]["device"], new["environment"]["device"]
    base_class, new_class = base["environment"]["machine_class"], new["environment"]["machine_class"]
    # why the timings are not compared, if they are not: one reason, so that it is said in one line
    timings_skipped = None
    if base_class != new_class:
        timings_skipped = (f"another machine class (base {base_class}; new {new_class}): times, throughput, energy "
                           "and their ratios compare only within one machine class")
    if base["workload"]["fingerprint"] != new["workload"]["fingerprint"]:
        out.notes.append(f"the workloads differ ({base['workload']['name']} [{base['workload']['fingerprint'][:8]}] vs "
                         f"{new['workload']['name']} [{new['workload']['fingerprint'][:8]}]): the figures measure different requests")
    differ = [f"{key} {base['manifest'][key]} vs {new['manifest'][key]}" for key in ("model", "backend", "dtype")
              if base["manifest"][key] != new["manifest"][key]]
    if differ:
        out.notes.append("the engines differ: " + ", ".join(differ))
        # the same machine running other engines: its times say nothing about a regression
        timings_skipped = timings_skipped or (f"the engines differ ({', '.join(differ)}): times and energy compare only "
                                              "between runs of the same engines")

    for name, b in base["metrics"].items():
        n = new["metrics"].get(name)
        if b["kind"] not in cfg.kinds:
            out.skip(f"{b['kind']} metrics are not compared (compare.kinds={list(cfg.kinds)})", name)
        elif n is None:
            out.skip("missing in the new report", name)
        elif b["scope"] == "machine_class" and timings_skipped:
            out.skip(timings_skipped, name)
        elif b["scope"] == "device_kind" and bd["kind"] != nd["kind"]:
            out.skip(f"base measured {bd['kind']} memory, new {nd['kind']} memory: bytes compare only between two GPU runs or two CPU runs", name)
        elif b["value"] is None or n["value"] is None:
            out.skip("unavailable (null) in " + ("both reports" if b["value"] is None and n["value"] is None else
                                                 "the base report" if b["value"] is None else "the new report"), name)
        else:
            tol = tolerance_for(name, tolerances)
            absolute = b.get("tolerance") == "absolute"
            change, verdict = judge(b["better"], float(b["value"]), float(n["value"]), tol, absolute)
            out.rows.append(Row(name, float(b["value"]), float(n["value"]), change, tol, absolute, b["unit"], verdict))
    extra = sorted(set(new["metrics"]) - set(base["metrics"]))
    if extra:
        out.notes.append(f"{len(extra)} metrics of the new report are not in the base: {', '.join(extra[:6])}{', ...' if len(extra) > 6 else ''}")
    return out


def fmt_value(value: float, unit: str) -> str:
    if unit == "s":
        return fmt_s(value)
    if unit == "B":
        return fmt_bytes(value)
    if unit in ("share", "of roofline"):
        return f"{100 * value:.1f}%"
    return f"{value:.4g}"


def fmt_change(row: Row) -> str:
    if row.absolute:
        return f"{row.change:+.3g}"
    return "inf" if math.isinf(row.change) else f"{100 * row.change:+.1f}%"


def fmt_tolerance(row: Row) -> str:
    return f"±{row.tolerance:g}" if row.absolute else f"±{100 * row.tolerance:g}%"


def print_comparison(c: Comparison, base: dict, new: dict, stream: TextIO) -> None:
    print(f"base: {describe(base)}", file=stream)
    print(f"new:  {describe(new)}", file=stream)
    for note in c.notes:
        print(f"note: {note}", file=stream)
    if c.rows:
        width = max(len(r.name) for r in c.rows)
        header = f"{'metric':<{width}}  {'base':>12}  {'new':>12}  {'change':>8}  {'tolerance':>9}  verdict"
        print(header, file=stream)
        for r in c.rows:
            print(f"{r.name:<{width}}  {fmt_value(r.base, r.unit):>12}  {fmt_value(r.new, r.unit):>12}  {fmt_change(r):>8}  "
                  f"{fmt_tolerance(r):>9}  {r.verdict}", file=stream)
    for reason, names in c.skipped.items():
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        print(f"skipped {len(names)}: {reason} ({shown})", file=stream)
    regressions = c.regressions
    if regressions:
        print(f"{len(regressions)} regression(s) past tolerance: {', '.join(r.name for r in regressions)}", file=stream)
    else:
        print(f"no regression: {len(c.rows)} metrics compared, {sum(len(v) for v in c.skipped.values())} skipped", file=stream)


def run_compare(cfg: CompareConfig, tolerances: dict[str, float] | None = None, stream: TextIO = sys.stdout) -> int:
    """Exit status: 0 no regression, 1 a regression past tolerance. Raises CompareError for bad input."""
    base, new = load_report(cfg.base), load_report(cfg.new)
    merged = {**cfg.tolerances, **(tolerances or {})}
    bad = [k for k, v in merged.items() if v is None or float(v) < 0]
    if bad:
        raise CompareError(f"tolerances must be >= 0: {', '.join(bad)}")
    comparison = compare_reports(base, new, cfg, merged)
    print_comparison(comparison, base, new, stream)
    return 1 if comparison.regressions else 0
