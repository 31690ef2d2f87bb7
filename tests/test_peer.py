"""The peer in the bench: ORT GenAI on a Llama of the same decoder dims (bench/peer.py) and the
batch-1 decode table of the report (bench/report.py).

The real test builds, times and deletes the peer at the tiny model's dims on the CPU; it needs
`onnxruntime_genai` (pip install -e '.[peer]') and is skipped without it.
"""
from __future__ import annotations

import json
import tempfile
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from rich.console import Console

from model.tokenizer import ChatTokenizer
from bench import peer as peer_module
from bench.baseline import copy_bandwidth
from contract.config import RooflineSettings
from bench.peer import PeerSkipped, check_settings, installed_package, llama_parameters, plan_dirs, run_peer
from bench.report import build_report, write_report
from bench.workload import build_workload, fingerprint

from .conftest import run_cli
from .test_bench import compose_bench, fake_environment, fake_modes, fake_report

needs_genai = pytest.mark.skipif(find_spec("onnxruntime_genai") is None,
                                 reason="onnxruntime_genai is not installed (pip install -e '.[peer]')")


def genai_cuda_installed() -> bool:
    from importlib import metadata

    try:
        metadata.version("onnxruntime-genai-cuda")
        return True
    except metadata.PackageNotFoundError:
        return False


@pytest.fixture(scope="module")
def tiny_manifest(tiny_engines_dir):
    from contract.manifest import Manifest

    return Manifest.load(tiny_engines_dir)


# --- settings and the package -------------------------------------------------------------


def test_settings_are_checked():
    app = compose_bench(["bench.peer.layers=[6,25]"])
    with pytest.raises(ValueError, match=r"bench.peer.layers=\[6, 25\] must list depths in 1..24"):
        check_settings(app.model.text, app.bench.peer)
    assert peer_module.peer_layers(app.model.text, compose_bench([]).bench.peer) == [6, 24]  # null: first exit, full depth
    assert not compose_bench(["bench=ci"]).bench.peer.enabled


def test_bench_refuses_bad_peer_settings(tmp_path):
    result = run_cli("pipeline", "bench", "bench.peer.decode_tokens=1", f"engines_dir={tmp_path}", f"output_dir={tmp_path / 'out'}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "bench.peer.decode_tokens=1 must be at least 2" in lines[0]


def test_without_the_package_the_reason_is_given(monkeypatch):
    monkeypatch.setattr(peer_module, "find_spec", lambda name: None)
    with pytest.raises(PeerSkipped, match=r"onnxruntime_genai is not installed: pip install -e '.\[peer\]'"):
        installed_package("cpu")


def test_disk_plan(tmp_path):
    cfg = compose_bench([f"bench.peer.workdir={tmp_path}"]).bench.peer
    assert plan_dirs(cfg, 1 << 20) == (tmp_path, tmp_path)
    with pytest.raises(PeerSkipped, match=rf"need .* GiB in {tmp_path}, which has .* GiB free: set bench.peer.workdir"):
        plan_dirs(cfg, 1 << 60)


@needs_genai
def test_a_cpu_build_is_refused_for_a_gpu_run():
    if genai_cuda_installed():
        pytest.skip("onnxruntime-genai-cuda is installed here")
    with pytest.raises(PeerSkipped, match=r"no CUDA provider: pip install -e '.\[peer-cuda\]'"):
        installed_package("cuda:0")


# --- the report table, from a fabricated peer record -----------------------------------------


def fabricated_peer() -> dict:
    """A peer record in run_peer's format with made-up times: for the table's formatting only."""
    app = compose_bench(["bench=ci"])
    lengths = peer_module.prompt_lengths(build_workload(app.bench), ChatTokenizer.builtin())
    prefill = [{"prompt_tokens": n, "ttft_s": n * 1e-5} for n in sorted({n for g in lengths.values() for n in g})]

    def depth(layers: int, graph_ms: float | None, plain_ms: float) -> dict:
        runs = [{"provider": "cuda", "cuda_graph": graph, "decode_step_s": {"median": ms / 1e3}, "prefill": prefill} if ms else
                {"provider": "cuda", "cuda_graph": graph, "skipped": "timing ORT GenAI (CUDA graphs) failed with exit code 1: capture"}
                for graph, ms in ((True, graph_ms), (False, plain_ms))]
        return {"layers": layers, "step_weight_bytes": peer_module.step_weight_bytes(app.model.text, layers, "fp32"), "build_s": 10.0,
                "build_bytes": 1 << 30, "deleted": True, "runs": runs}

    return {"implementation": "onnxruntime-genai (fabricated)", "device": "cuda:0", "provider": "cuda", "dtype": "fp32", "decode_tokens": 8,
            "architecture": "Llama", "prompt_lengths": lengths, "depths": [depth(6, 1.0, 1.2), depth(24, None, 4.8)]}


def test_decode_table_formatting(tiny_manifest, tmp_path):
    report = fake_report(tiny_manifest, peer=fabricated_peer())
    files = {f.name for f in write_report(report, tmp_path)}
    assert "decode.png" in files
    table = json.loads((tmp_path / "report.json").read_text())["decode_batch1"]
    labels = [(r["label"], r["layers"]) for r in table["rows"]]
    # ordered by depth, ours before the peer, transformers last; the fake run sends no request down exit24-text
    assert labels == [("dyngraph dynamic, `exit6-text`", 6), ("ORT GenAI, 6 layers", 6), ("dyngraph dynamic, `exit24-text`", 24),
                      ("dyngraph static, `static`", 24), ("ORT GenAI, 24 layers", 24), ("transformers `generate`", 24)]
    rows = {r["label"]: r for r in table["rows"]}
    ours6, peer6 = rows["dyngraph dynamic, `exit6-text`"], rows["ORT GenAI, 6 layers"]
    assert ours6["tpot_s"] == pytest.approx(0.01) and peer6["tpot_s"] == pytest.approx(1e-3)
    assert peer6["fraction"] == pytest.approx(peer6["roofline_s"] / peer6["tpot_s"])
    assert peer6["roofline_s"] == pytest.approx(peer6["weight_bytes"] / 2.0e12)  # the fake bandwidth of cuda:0
    assert rows["dyngraph dynamic, `exit24-text`"]["tpot_s"] is None
    assert table["over_peer"] == {"first_exit": pytest.approx(10.0), "full_depth": None}
    assert report["metrics"]["ratio.over_peer.first_exit"]["value"] == pytest.approx(10.0)
    # the graph run at 24 layers failed: the run without graphs is the figure, and the failure is said
    assert report["metrics"]["peer.l24.decode_s"]["value"] == pytest.approx(4.8e-3)
    assert rows["ORT GenAI, 24 layers"]["note"] == "CUDA graphs: timing ORT GenAI (CUDA graphs) failed with exit code 1: capture"
    md = (tmp_path / "report.md").read_text()
    assert "## Decode at batch 1 beside the peer and the roofline" in md
    assert "| ORT GenAI, 6 layers | 6 | 1.00 ms (1.20 ms without CUDA graphs) |" in md
    assert "| ORT GenAI, 24 layers | 24 | 4.80 ms |" in md and "| CUDA graphs: timing ORT GenAI (CUDA graphs) failed" in md
    assert "| dyngraph dynamic, `exit24-text` | 24 | n/a |" in md and "no request took this path at concurrency 1" in md
    assert "TTFT `short` (" in md and "TTFT `long` (" in md
    assert "| first-exit text decode at batch 1 over ORT GenAI's at that depth | <= 1 | 10.00 | no |" in md


def test_skipped_peer_in_the_report(tiny_manifest, tmp_path):
    report = fake_report(tiny_manifest, peer={"skipped": "onnxruntime_genai is not installed: pip install -e '.[peer]'"})
    write_report(report, tmp_path)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["peer"] == {"skipped": "onnxruntime_genai is not installed: pip install -e '.[peer]'"}
    assert saved["decode_batch1"]["peer_skipped"] == saved["peer"]["skipped"]
    assert not any(r["kind"] == "peer" for r in saved["decode_batch1"]["rows"])
    assert "- ORT GenAI: not run: onnxruntime_genai is not installed: pip install -e '.[peer]'." in (tmp_path / "report.md").read_text()


# --- the real peer on the CPU ------------------------------------------------------------------


@needs_genai
def test_peer_on_tiny_llama(tiny_manifest, tmp_path):
    """Build, time and delete ORT GenAI at 6 and 24 layers of the tiny model's dims, for real."""
    work, logs = tmp_path / "work", tmp_path / "logs"
    work.mkdir(), logs.mkdir()
    app = compose_bench(["bench=ci", "bench.peer.enabled=true", "bench.peer.decode_tokens=8", f"bench.peer.workdir={work}", "progress=false"])
    requests = build_workload(app.bench)
    peer = run_peer(app, tiny_manifest, peer_module.prompt_lengths(requests, ChatTokenizer.builtin()), "cpu", logs,
                    Console(stderr=True, quiet=True))
    lengths = sorted({n for g in peer["prompt_lengths"].values() for n in g})
    assert set(peer["prompt_lengths"]) == {"short", "long"} and peer["provider"] == "cpu" and peer["dtype"] == "fp32"
    assert [d["layers"] for d in peer["depths"]] == [6, 24] and not any("skipped" in d for d in peer["depths"])
    for depth in peer["depths"]:
        assert depth["parameters"] == llama_parameters(app.model.text, depth["layers"])
        assert depth["deleted"] and depth["build_bytes"] > depth["parameters"] * 4  # fp32 weights
        assert all((logs / name).stat().st_size > 0 for name in depth["logs"])
        (run,) = depth["runs"]  # one run on the CPU: no CUDA graphs there
        assert run["cuda_graph"] is False and run["decode_step_s"]["n"] == 8 * len(lengths)
        assert 0 < run["decode_step_s"]["p10"] <= run["decode_step_s"]["median"] <= run["decode_step_s"]["p90"]
        assert [p["prompt_tokens"] for p in run["prefill"]] == lengths
        # each length's figures come from its second generator; the first one's time to first token is kept apart
        assert all(0 < p["prefill_s"] <= p["ttft_s"] and p["first_call_ttft_s"] > 0 for p in run["prefill"])
    assert list(work.iterdir()) == []  # checkpoints and builds are gone
    deep, shallow = (d["runs"][0]["decode_step_s"]["median"] for d in peer["depths"][::-1])
    assert deep > shallow  # four times the layers

    # in the report, beside server runs that are made up here (only the peer's figures are real)
    bandwidth = copy_bandwidth("cpu", RooflineSettings(copy_mib=64, iters=3))
    yardsticks = {"bandwidth": {"cpu": bandwidth.__dict__}, "transformers": {"skipped": "not run in this test"}, "peer": peer}
    modes = fake_modes(app, tiny_manifest, requests, gpu=False)
    report = build_report(app, tiny_manifest, requests, fingerprint(requests), modes, fake_environment(False, "cpu"), yardsticks, "peer-test")
    out = Path(tempfile.mkdtemp(dir=tmp_path))
    write_report(report, out)
    rows = [r for r in json.loads((out / "report.json").read_text())["decode_batch1"]["rows"] if r["kind"] == "peer"]
    assert [r["layers"] for r in rows] == [6, 24]
    for r in rows:
        assert r["tpot_s"] > 0 and r["roofline_s"] > 0 and r["fraction"] > 0 and all(v > 0 for v in r["ttft_s"].values())
    md = (out / "report.md").read_text()
    assert "| ORT GenAI, 24 layers | 24 |" in md and " (first call " in md
    assert "on a fresh generator after one at the same prompt length" in md



@pytest.mark.gpu
@pytest.mark.skipif(not (genai_cuda_installed() and torch.cuda.is_available()),
                    reason="needs a CUDA GPU and onnxruntime-genai-cuda (pip install -e '.[peer-cuda]')")
def test_peer_on_cuda_with_and_without_graphs(tiny_manifest, tmp_path):
    """The tiny model's dims on cuda:0 (the engines' fp32): one run with ORT's CUDA graphs, one without."""
    work, logs = tmp_path / "work", tmp_path / "logs"
    work.mkdir(), logs.mkdir()
    app = compose_bench(["bench=ci", "bench.peer.enabled=true", "bench.peer.layers=[6]", "bench.peer.decode_tokens=16",
                         f"bench.peer.workdir={work}", "progress=false"])
    peer = run_peer(app, tiny_manifest, peer_module.prompt_lengths(build_workload(app.bench), ChatTokenizer.builtin()), "cuda:0", logs,
                    Console(stderr=True, quiet=True))
    (depth,) = peer["depths"]
    assert "skipped" not in depth, depth.get("skipped")
    assert [(r["provider"], r["cuda_graph"]) for r in depth["runs"]] == [("cuda", True), ("cuda", False)]
    assert all("skipped" not in r and r["decode_step_s"]["median"] > 0 for r in depth["runs"]), depth["runs"]
    assert depth["deleted"] and list(work.iterdir()) == []
