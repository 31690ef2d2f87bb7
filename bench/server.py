"""Server control for the bench and the soak: `python -m runtime.serve` as a subprocess the bench
owns, started on a free port, ready when /health answers (every replica, with cluster=ray),
stopped with SIGTERM so that in-flight requests finish."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from contract.config import BenchApp

ROOT = Path(__file__).resolve().parent.parent


class BenchError(Exception):
    """A problem with the request, the environment or the server, reported as one line."""


class ServerExited(BenchError):
    """The server exited before it was ready: its exit status and the last line of its log (a refusal's one line)."""

    def __init__(self, message: str, code: int, line: str):
        super().__init__(message)
        self.code, self.line = code, line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_launch(app: BenchApp) -> None:
    """What every bench checks of how it starts its servers, before anything runs."""
    if not 0 <= app.server.port <= 65535:
        raise BenchError(f"server.port={app.server.port} must lie in 0..65535 (0: any free port)")


class Server:
    """`python -m runtime.serve` in one mode, as a subprocess that the bench owns and stops."""

    def __init__(self, app: BenchApp, mode: str, server_overrides: list[str], log_path: Path, extra: tuple[str, ...] = ()):
        """`extra`: overrides after every other, server.args included (the threshold curve's policy settings)."""
        self.port = app.server.port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "runtime.serve", *server_overrides, f"runtime={app.server.runtime}",
                        f"runtime.mode={mode}", f"server.port={self.port}",
                        f"engines_dir={Path(app.engines_dir).expanduser().resolve()}", f"cluster={app.server.cluster}",
                        *([f"cluster.num_replicas={app.server.replicas}"] if app.server.cluster == "ray" else []), *app.server.args, *extra]
        self.replicas = app.server.replicas if app.server.cluster == "ray" else 0  # replicas that must answer before it is ready
        self.env = server_env(mode)
        self.log_path = log_path
        self.startup_timeout_s = app.server.startup_timeout_s
        self.process: subprocess.Popen | None = None
        self.startup_s = 0.0
        self.model_id = ""  # read from /v1/models once it is ready

    def __enter__(self) -> Server:
        t0 = time.perf_counter()
        self.log_file = self.log_path.open("wb")
        self.process = subprocess.Popen(self.command, cwd=ROOT, env=self.env, stdout=self.log_file, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
        try:
            self.wait_ready(t0 + self.startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - t0
        return self

    def wait_ready(self, deadline: float) -> None:
        replicas = set()  # cluster=ray: ready once every replica has answered (x-dyngraph-replica), not just the first
        with httpx.Client(timeout=5.0) as client:
            while True:
                if self.process.poll() is not None:
                    self.log_file.flush()
                    line = last_line(self.log_path)
                    raise ServerExited(f"the server exited with code {self.process.returncode} before it was ready: "
                                       f"{line} (log: {self.log_path})", self.process.returncode, line)
                try:
                    health = client.get(self.url + "/health")
                    replicas.add(health.headers.get("x-dyngraph-replica"))
                    if health.status_code == 200 and len(replicas - {None}) >= self.replicas:
                        # the id requests must name, whatever server.model_id the launch set
                        self.model_id = client.get(self.url + "/v1/models").json()["data"][0]["id"]
                        return
                except httpx.HTTPError:
                    pass
                if time.perf_counter() > deadline:
                    raise BenchError(f"the server was not ready after {self.startup_timeout_s:.0f} s "
                                     f"(server.startup_timeout_s; log: {self.log_path})")
                time.sleep(0.25)

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # lets in-flight requests finish
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not self.log_file.closed:
            self.log_file.close()

    def stats(self) -> dict:
        return self.call("GET", "/stats")

    def reset_stats(self) -> dict:
        """Reset the peaks; the server's stats just after (its cumulative counters as they stand)."""
        return self.call("POST", "/stats/reset")

    def call(self, method: str, route: str) -> dict:
        try:
            response = httpx.request(method, self.url + route, timeout=30.0)
            response.raise_for_status()
            return response.json() if response.content else {}
        except (httpx.HTTPError, ValueError) as e:
            if self.process.poll() is not None:
                raise BenchError(f"the server exited with code {self.process.returncode}: {last_line(self.log_path)} "
                                 f"(log: {self.log_path})") from None
            raise BenchError(f"{method} {route} failed: {e} (log: {self.log_path})") from None


def server_env(mode: str) -> dict[str, str]:
    env = dict(os.environ)
    # the mode must not depend on what the caller's shell exports: set the switch either way
    env["ENABLE_DYNAMIC_GRAPH"] = "True" if mode == "dynamic" else "False"
    # NVML numbers GPUs in PCI order; with the same order in the server, cuda:N maps onto NVML
    env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1].strip() if lines else "the log is empty"
