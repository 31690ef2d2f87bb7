"""Shared fixtures: one real tiny export per test session, reused by every test that needs engines.

Set DYNGRAPH_TEST_ENGINES=DIR to keep that export between runs while developing (the cache makes
a re-run take seconds); by default it lives in pytest's temporary directory.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = str(ROOT / "conf")


def compose_export(overrides: list[str] | None = None):
    """The export app config exactly as `python -m pipeline export OVERRIDES` would see it."""
    from contract.config import ExportApp
    from cli.command import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name="export", overrides=overrides or [])
    app: ExportApp = OmegaConf.to_object(cfg)
    return app


@pytest.fixture(scope="session")
def tiny_config():
    return compose_export(["model=tiny"]).model


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    from model.autoglm import build_model

    torch.manual_seed(0)
    return build_model(tiny_config)


@pytest.fixture(scope="module")
def one_torch_thread():
    """As runtime.serve runs (and beside a server): torch's intra-op threads would fight ONNX
    Runtime's for the two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def engines_root(tmp_path_factory) -> Path:
    return Path(os.environ.get("DYNGRAPH_TEST_ENGINES") or tmp_path_factory.mktemp("engines"))


@pytest.fixture(scope="session")
def tiny_export(engines_root):
    """The tiny model exported with the ONNX backend (fp32, CPU): an ExportResult."""
    from rich.console import Console

    from pipeline.export import run_export

    app = compose_export(["model=tiny", "export.progress=false"])
    return run_export(app.model, app.export, engines_root, console=Console(stderr=True, quiet=True))


@pytest.fixture(scope="session")
def tiny_engines_dir(tiny_export) -> Path:
    """<engines_root>/tiny/onnx, holding manifest.json."""
    return tiny_export.directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a dyngraph entry point as a user would: `python -m MODULE ARGS`."""
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def one_error_line(result: subprocess.CompletedProcess, *needles: str) -> str:
    """A refusal as the entry points give one: exit status 2 and one line on stderr that names what was wrong."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
