"""ONNX Runtime's profiler on our engines (scripts/decode_profile.py --ort-profile) and on ORT GenAI's
graph of the same dims (scripts/peer_profile.py), summarised by bench/ort_profile.py, for real on the
tiny model on the CPU. The peer half needs onnxruntime_genai's model builder and is skipped without it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

from contract.manifest import Manifest

from .conftest import one_error_line

ROOT = Path(__file__).resolve().parent.parent
PROMPT, STEPS = 32, 3

needs_genai = pytest.mark.skipif(find_spec("onnxruntime_genai") is None,
                                 reason="onnxruntime_genai is not installed (pip install -e '.[peer]')")


def script(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """A script of scripts/ as the GPU host runs them: from the repository root, with it on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def ours(tiny_engines_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ort-profile")
    result = script("scripts/decode_profile.py", str(tiny_engines_dir), "--device", "cpu", "--ort-profile", str(out),
                    "--prompt", str(PROMPT), "--profile-steps", str(STEPS))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, json.loads((out / "ours.json").read_text())


def test_our_engines_profiled_per_phase(ours, tiny_engines_dir):
    out, summary = ours
    manifest = Manifest.load(tiny_engines_dir)
    exits = manifest.model["config"]["text"]["exit_layers"]
    phases = {p["name"]: p for p in summary["phases"]}
    assert list(phases) == [f"prefill_{PROMPT}_first_call", f"prefill_{PROMPT}", f"decode_exit{exits[-1]}", f"decode_exit{exits[0]}"]
    assert not summary["on_cuda"] and not summary["launch_blocking"]
    for name, exit_layer in ((f"prefill_{PROMPT}", exits[-1]), (f"decode_exit{exits[-1]}", exits[-1]), (f"decode_exit{exits[0]}", exits[0])):
        p = phases[name]
        step = manifest.path(exit_layer, ["text"]).step
        # every run of the phase's window, and only those, is found in the traces by its wall-clock time
        assert list(p["engines"]) == step and all(e["runs"] == pytest.approx(1.0) for e in p["engines"].values()), p["engines"]
        assert p["runs_per_step"] == pytest.approx(len(step)) and p["layers"] == exit_layer and p["wall_ms_per_step"] > 0
        assert p["nodes_per_step"] == pytest.approx(sum(e["nodes"] for e in p["engines"].values()))
        assert p["nodes_per_step"] == pytest.approx(sum(r["nodes_per_step"] for r in p["ops"].values()))
        assert p["ops"]["GroupQueryAttention"]["nodes_per_layer"] == pytest.approx(1.0)  # one per decoder layer, every segment
        assert p["nodes_per_layer"] * p["layers"] + p["nodes_outside_layers_per_step"] == pytest.approx(p["nodes_per_step"])
        assert 0 < p["node_us_per_step"] <= p["run_us_per_step"]
    # a prefill and a decode step run the same nodes
    assert phases[f"prefill_{PROMPT}"]["nodes_per_step"] == phases[f"decode_exit{exits[-1]}"]["nodes_per_step"]
    assert phases[f"decode_exit{exits[0]}"]["nodes_per_layer"] == pytest.approx(phases[f"decode_exit{exits[-1]}"]["nodes_per_layer"])
    assert {Path(t["path"]).parent for t in summary["traces"]} == {out / "traces"}
    md = (out / "ours.md").read_text()
    assert f"## decode_exit{exits[0]}: {STEPS} step(s), {exits[0]} layers" in md and "| GroupQueryAttention |" in md


def test_peer_profile_refuses_a_directory_without_a_build(tmp_path):
    one_error_line(script("scripts/peer_profile.py", str(tmp_path), "--device", "cpu", "--out", str(tmp_path / "out")),
                   "holds no genai_config.json")


@needs_genai
def test_peer_graph_profiled_beside_ours(ours, tiny_engines_dir, tmp_path):
    """ORT GenAI's builder output at the full depth of the tiny model's dims, beside our engines."""
    out, summary = ours
    layers = Manifest.load(tiny_engines_dir).model["config"]["text"]["n_layers"]
    built = script("-m", "bench.peer", "build", str(tiny_engines_dir), str(layers), str(tmp_path / "peer"), "cpu")
    assert built.returncode == 0, built.stderr[-3000:]
    result = script("scripts/peer_profile.py", str(tmp_path / "peer" / "model"), "--device", "cpu", "--out", str(tmp_path / "out"),
                    "--prompt", str(PROMPT), "--steps", str(STEPS), "--beside", str(out / "ours.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    peer = json.loads((tmp_path / "out" / f"peer-{layers}.json").read_text())
    phases = {p["name"]: p for p in peer["phases"]}
    assert list(phases) == [f"prefill_{PROMPT}_first_call", f"prefill_{PROMPT}", f"decode_exit{layers}"]
    for p in phases.values():
        assert list(p["engines"]) == ["model"] and p["runs_per_step"] == pytest.approx(1.0) and p["layers"] == layers
        assert p["ops"]["GroupQueryAttention"]["nodes_per_layer"] == pytest.approx(1.0)
        assert p["nodes_outside_layers_per_step"] > 0  # embedding, attention-mask arithmetic, final norm, LM head
    beside = (tmp_path / "out" / f"beside-{layers}.md").read_text()
    for name in (f"decode_exit{layers}", f"prefill_{PROMPT}_first_call", f"prefill_{PROMPT}"):
        assert f"## {name} ({layers} layers) beside the peer's {name} ({layers} layers)" in beside
    ours_decode = {p["name"]: p for p in summary["phases"]}[f"decode_exit{layers}"]
    for op in {*ours_decode["ops"], *phases[f"decode_exit{layers}"]["ops"]}:  # every operator of either graph has its row
        assert f"| {op} |" in beside
