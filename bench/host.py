"""The machine a bench or soak run measures on, and the folder its report goes to: NVML for a GPU
placement, the CPU's model, the checkout's commit, a device name as a folder-name slug."""
from __future__ import annotations

import json
import logging
import platform
import re
import shutil
import subprocess
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from bench.gpu_monitor import Nvml, NvmlUnavailable
from bench.server import BenchError, server_env
from contract.config import BenchApp

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent


def open_nvml(app: BenchApp) -> Nvml | None:
    """NVML, only for a GPU placement: a CPU run never touches the driver."""
    if app.server.runtime == "cpu":
        return None
    try:
        return Nvml.open(server_env("dynamic"))
    except NvmlUnavailable as e:
        log.warning("no GPU measurements: %s", e)
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def slug(text: str) -> str:
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    text = re.sub(r"\b(cpu|processor)\b|@.*$", "", text)  # "Intel(R) Xeon(R) CPU @ 2.20GHz" -> "intel-xeon"
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "device"


def unique_dir(path: Path, keep_name: bool) -> Path:
    """A fresh report folder: a second run on the same day gets -2, -3, ... unless named explicitly."""
    candidate, n = path, 2
    while not keep_name and candidate.exists():
        candidate, n = path.with_name(f"{path.name}-{n}"), n + 1
    try:
        candidate.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BenchError(f"cannot create the report folder {candidate}: {e.strerror}") from None
    return candidate


def report_folder(app, name: str, logs: Path) -> Path:
    """The run's report folder under output_dir (`run_name`, else `name` made unique), with the server
    logs the run kept in `logs` moved into it."""
    folder = unique_dir(Path(app.output_dir).expanduser() / (app.run_name or name), keep_name=bool(app.run_name))
    for f in logs.iterdir():
        shutil.move(f, folder / f.name)
    logs.rmdir()
    return folder


def write_reports(app, kind: str, device: str, engines: str, log_dir: Path, report: dict, markdown: str, plot: Callable[[Path], None]) -> Path:
    """A comparison's report folder, `<date>-<device>-<model>-<engines>-<kind>` (report_folder, with the
    logs of `log_dir`), holding <kind>.json, <kind>.md and <kind>.png (drawn by `plot`); its path."""
    folder = report_folder(app, f"{datetime.now(timezone.utc):%Y-%m-%d}-{slug(device)}-{app.model.name}-{engines}-{kind}", log_dir)
    (folder / f"{kind}.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (folder / f"{kind}.md").write_text(markdown)
    plot(folder / f"{kind}.png")
    return folder


def git_state() -> dict:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}
