"""`python -m pipeline bench` and `python -m pipeline compare`: the workload generator, the NVML
code paths (against a stand-in NVML library), the report, the comparison, and a small CPU
benchmark of the tiny model through the real server, compared with the committed CI baseline.
Speed is never asserted: only what a run must contain and what does not depend on the machine."""
from __future__ import annotations

import copy
import fnmatch
import io
import json
import re
import subprocess
import sys
import wave
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from bench.client import RequestResult
from bench.host import open_nvml, slug
from bench.run import ModeResult, RunResult
from bench.compare import CompareError, load_report, run_compare, tolerance_for
from contract.config import BenchApp, CompareConfig, RequestGroup
from cli.command import register_configs
from bench.gpu_monitor import EnergyReading, MemoryPeaks, Nvml, NvmlUnavailable, Sampler, energy_between
from bench.metrics import machine_class, stats
from bench.plots import decode_title, plot_decode
from bench.report import SCHEMA_VERSION, build_report, write_report
from bench.workload import SAMPLE_RATE, WorkloadError, active_groups, build_workload, fingerprint

from .conftest import CONF_DIR, ROOT, run_cli

BASELINE = ROOT / "bench_results" / "ci-baseline.json"
# what does not depend on the machine's speed: the CI comparison holds on a machine of the baseline's class too
PORTABLE_KINDS = "compare.kinds=[exits,work,quality,memory,errors]"


def compose_bench(overrides: list[str] | None = None) -> BenchApp:
    """The bench app config exactly as `python -m pipeline bench OVERRIDES` would see it."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name="bench", overrides=overrides or [])
    return OmegaConf.to_object(cfg)


# --- workload -------------------------------------------------------------------------------


def test_workload_is_deterministic():
    cfg = compose_bench().bench
    a, b = build_workload(cfg), build_workload(cfg)
    assert [(r.group, r.prompt, r.image_png, r.audio_wav) for r in a] == [(r.group, r.prompt, r.image_png, r.audio_wav) for r in b]
    assert fingerprint(a) == fingerprint(b)
    assert len(a) == sum(g.count for g in active_groups(cfg).values()) == sum(g.count for g in cfg.groups.values() if g.source == "prompts")
    assert {r.group: r.modalities for r in a} == {"short": ("text",), "long": ("text",), "image": ("text", "image"),
                                                   "audio": ("text", "audio")}
    assert sorted(r.index for r in a) == list(range(len(a)))
    assert [r.group for r in a[:8]] != sorted(r.group for r in a[:8])  # interleaved, not group after group
    other = compose_bench(["bench.seed=1"]).bench
    assert fingerprint(build_workload(other)) != fingerprint(a)  # the media derive from the seed


def test_workload_media_decode():
    requests = build_workload(compose_bench().bench)
    image = next(r for r in requests if r.image_png)
    assert Image.open(io.BytesIO(image.image_png)).size == (448, 448)
    for r in (r for r in requests if r.audio_wav):
        with wave.open(io.BytesIO(r.audio_wav)) as w:
            assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, SAMPLE_RATE)
            assert w.getnframes() / SAMPLE_RATE in (2.0, 4.0, 6.0)
            pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
            assert 0 < np.abs(pcm).max() < 32767  # a real signal, not clipped
    parts = [p["type"] for p in image.body("m", 0.0, 0)["messages"][0]["content"]]
    assert parts == ["image_url", "text"]
    body = next(r for r in requests if r.audio_wav).body("autoglm-phone-9b", 0.0, 0)
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["messages"][0]["content"][0]["input_audio"]["format"] == "wav"
    text = next(r for r in requests if r.text_only).body("m", 0.0, 0)
    assert isinstance(text["messages"][0]["content"], str)


def test_workload_refuses_bad_groups():
    cfg = compose_bench().bench
    cfg.groups = {"odd": RequestGroup(modalities=["image"])}
    with pytest.raises(WorkloadError, match=r"bench.groups.odd.modalities=\['image'\] must hold 'text'"):
        build_workload(cfg)


def held_out_corpus(folder: Path) -> Path:
    """scripts/build_corpus.py --code on twelve small made-up modules: a third of them held out, a BPE of 300 ids."""
    source = folder / "src"
    source.mkdir()
    for k in range(12):
        body = "".join(f"def step_{k}_{j}(x, y={j}):\n    \"\"\"Return x scaled by {j} and shifted by y.\n\n"
                       f"    The {j}th step of module {k}: the caller checks\n    that x is finite, and the result\n"
                       f"    is never negative.\n    \"\"\"\n    total = x * {j} + y\n    return max(0, total)\n\n\n" for j in range(8))
        (source / f"mod{k}.py").write_text(f'"""Module {k}: a few steps."""\nimport math\n\n\n' + body)
    corpus = folder / "corpus"
    subprocess.run([sys.executable, "scripts/build_corpus.py", str(corpus), "--code", "--source", str(source), "--max-mb", "0.1",
                    "--vocab-size", "300", "--heldout-fraction", "0.34"], cwd=ROOT, check=True, capture_output=True)
    return corpus


def test_corpus_groups_come_from_the_held_out_part(tmp_path):
    """bench.corpus: held-out files cut at a line boundary within the budget, held-out docstring questions,
    seeded; without it the default mix is unchanged, and a model without a tokenizer of its own is refused."""
    from bench.run import corpus_tokenizer
    from bench.server import BenchError
    from model.tokenizer import ChatTokenizer

    corpus = held_out_corpus(tmp_path)
    overrides = [f"bench.corpus={corpus}", "bench.groups.code.count=3", "bench.groups.docstrings.count=4", "bench.groups.code.max_prompt_tokens=200"]
    cfg = compose_bench(overrides).bench
    tokenizer, context = ChatTokenizer.from_dir(corpus), 256
    requests = build_workload(cfg, tokenizer, context)
    assert [r.prompt for r in requests] == [r.prompt for r in build_workload(cfg, tokenizer, context)]
    code = [r for r in requests if r.group == "code"]
    questions = [r for r in requests if r.group == "docstrings"]
    assert len(code) == 3 and len(questions) == 4 and len(requests) == 40 + 7
    held = {p.read_text() for p in (corpus / "heldout").glob("*-py-*.txt")}
    train = (corpus / "train" / "chats.jsonl").read_text()
    for r in code:
        instruction, prefix = r.prompt.split("\n", 1)
        assert instruction == "Continue this Python file:" and prefix.endswith("\n")
        source = next(text for text in held if text.startswith(prefix))
        assert len(prefix) < len(source)  # something left to continue
        n = len(tokenizer.apply_chat_template([{"role": "user", "content": r.prompt}]))
        assert 200 // 2 - 40 <= n <= min(200, context - r.max_tokens)  # half to all of the budget, cut at a line
    for r in questions:
        assert r.prompt in (corpus / "heldout" / "chats.jsonl").read_text() and json.dumps(r.prompt) not in train
    other = build_workload(compose_bench([*overrides, "bench.seed=1"]).bench, tokenizer, context)
    assert {r.prompt for r in other if r.group == "code"} != {r.prompt for r in code}  # other cuts
    assert "code" not in {r.group for r in build_workload(compose_bench().bench)}  # no corpus: the mix as it was
    with pytest.raises(WorkloadError, match="not a scripts/build_corpus.py --code folder"):
        build_workload(compose_bench(["bench.corpus=/nonexistent"]).bench, tokenizer, context)
    with pytest.raises(BenchError, match="has no model.checkpoint; bench.corpus=null leaves them out"):
        corpus_tokenizer(compose_bench([f"bench.corpus={corpus}"]))


def test_stats_and_slug():
    s = stats([float(x) for x in range(1, 101)])
    assert (s["n"], s["mean"], s["p50"], s["min"], s["max"]) == (100, 50.5, 50.5, 1.0, 100.0)
    assert s["p90"] == pytest.approx(90.1) and s["p99"] == pytest.approx(99.01)
    assert stats([None, None]) is None
    assert slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert slug("Intel(R) Xeon(R) CPU @ 2.20GHz") == "intel-xeon"


@pytest.mark.parametrize("paths", ["local", "gpu-host"])
def test_reports_and_environments_stay_out_of_git_status(paths):
    """A run's reports land where git ignores them (the ones kept are committed under bench_results/), and so does a virtual environment."""
    run = Path(compose_bench([f"paths={paths}"]).output_dir) / "2026-01-01-cpu-tiny-onnx" / "report.json"
    assert not run.is_absolute() and run.parts[0] != "bench_results"
    for path in (run, Path(".venv/bin/python"), Path("venv/bin/python")):
        assert subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT).returncode == 0, f"git does not ignore {path}"


# --- NVML, against a stand-in library -------------------------------------------------------


class FakeNvml:
    """Just enough of nvidia-ml-py: four GPUs, energy counters that advance on every read."""

    def __init__(self, energy_supported=True, processes=True, fail_init=False):
        self.energy_supported, self.processes, self.fail_init = energy_supported, processes, fail_init
        self.energy = {i: 1_000_000 * (i + 1) for i in range(4)}
        self.used = {i: (i + 1) << 30 for i in range(4)}
        self.server_pid = 4242
        self.calls: list[str] = []

    def nvmlInit(self):
        self.calls.append("init")
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlShutdown(self):
        self.calls.append("shutdown")

    def nvmlDeviceGetCount(self):
        return 4

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return int(uuid.removeprefix("GPU-"))

    def nvmlDeviceGetIndex(self, h):
        return h

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUUID(self, h):
        return f"GPU-{h}"

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=self.used[h], total=80 << 30)

    def nvmlSystemGetDriverVersion(self):
        return "580.1"

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if not self.energy_supported:
            raise RuntimeError("Not Supported")
        self.energy[h] += 2500  # 2.5 J between two reads
        return self.energy[h]

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        if not self.processes:
            return []  # what a container's PID namespace looks like
        return [SimpleNamespace(pid=1, usedGpuMemory=1 << 20), SimpleNamespace(pid=self.server_pid, usedGpuMemory=(h + 1) << 29)]


def test_nvml_maps_visible_devices():
    fake = FakeNvml()
    nvml = Nvml.open({"CUDA_VISIBLE_DEVICES": "2,3"}, pynvml=fake)
    assert [(g.label, g.nvml_index, g.name) for g in nvml.gpus] == [("cuda:0", 2, "NVIDIA H100 80GB HBM3"), ("cuda:1", 3, "NVIDIA H100 80GB HBM3")]
    assert nvml.memory_used(["cuda:0"]) == {"cuda:0": 3 << 30}
    assert nvml.process_memory(["cuda:0", "cuda:1"], fake.server_pid) == {"cuda:0": 3 << 29, "cuda:1": 4 << 29}
    assert [g.nvml_index for g in Nvml.open({"CUDA_VISIBLE_DEVICES": "GPU-1"}, pynvml=fake).gpus] == [1]
    assert len(Nvml.open({}, pynvml=fake).gpus) == 4
    with pytest.raises(NvmlUnavailable, match="MIG"):
        Nvml.open({"CUDA_VISIBLE_DEVICES": "MIG-0c6e1d4f"}, pynvml=fake)
    with pytest.raises(NvmlUnavailable, match="did not initialise"):
        Nvml.open({}, pynvml=FakeNvml(fail_init=True))


def test_energy_from_counters():
    nvml = Nvml.open({}, pynvml=FakeNvml())
    labels = ["cuda:0", "cuda:1"]
    reading = energy_between(nvml.energy_mj(labels), nvml.energy_mj(labels))
    assert reading.per_device_j == {"cuda:0": 2.5, "cuda:1": 2.5} and reading.joules == 5.0 and reading.reason is None
    old = Nvml.open({}, pynvml=FakeNvml(energy_supported=False))  # pre-Volta: no counter
    reading = energy_between(old.energy_mj(labels), old.energy_mj(labels))
    assert reading.joules is None and "no total-energy counter on cuda:0, cuda:1" in reading.reason


def test_sampler_peaks_and_hidden_process():
    fake = FakeNvml(processes=False)
    nvml = Nvml.open({}, pynvml=fake)
    peaks = Sampler(fake.server_pid, 0.01, nvml, ["cuda:0"]).start().stop()
    assert peaks.samples >= 2 and peaks.device_used == {"cuda:0": 1 << 30}
    assert peaks.process_used == {"cuda:0": None}  # not listed: the report falls back to the device's figure
    import os

    own = Sampler(os.getpid(), 0.01).start().stop()  # host memory of a live process, no GPU
    assert own.host_rss > 0 and own.device_used == {}


def test_cpu_placement_never_touches_nvml(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("NVML opened for a CPU placement")

    monkeypatch.setattr(Nvml, "open", refuse)
    assert open_nvml(compose_bench(["server.runtime=cpu"])) is None


# --- the report, from a made-up run ---------------------------------------------------------

DYNAMIC_PATHS = {"short": "exit6-text", "long": "exit18-text", "image": "exit12-text+image", "audio": "exit6-text+audio"}


def fake_modes(app: BenchApp, manifest, requests, gpu: bool, slow: float = 1.0) -> dict[str, ModeResult]:
    """What two servers might have measured: dynamic at half the static time, memory and energy,
    its times stretched by `slow`."""
    labels = ["cuda:0"] if gpu else []
    modes = {}
    for mode in ("static", "dynamic"):
        size = 1.0 if mode == "static" else 0.5  # memory and energy
        scale = size * (1.0 if mode == "static" else slow)  # times
        runs = []
        for c in app.bench.concurrency:
            results = []
            for r in requests:
                path = "static" if mode == "static" else DYNAMIC_PATHS[r.group]
                record = manifest_path(manifest, path)
                ttft = scale * (0.05 + 0.01 * r.index) * c
                tokens = ["a"] * 8 if mode == "static" else ["a"] * 6 + ["b"] * 2  # dynamic: 3/4 of full depth's greedy tokens
                results.append(RequestResult(r.index, r.group, list(r.modalities), True, status=200, path=path, exit_layer=record.exit_layer,
                                             devices={e: labels[0] if gpu else "cpu" for e in record.step}, engines=record.encode + record.step,
                                             prompt_tokens=20 + r.index, completion_tokens=8, ttft_s=ttft, latency_s=ttft + 7 * 0.02 * scale,
                                             tpot_s=0.02 * scale, start_s=0.1 * r.index, tokens=tokens))
            memory = MemoryPeaks(host_rss=int(600e6 * size), device_used={"cuda:0": int(20e9 * size) + (1 << 30)} if gpu else {},
                                 process_used={"cuda:0": int(20e9 * size)} if gpu else {}, samples=10)
            energy = EnergyReading({"cuda:0": 300.0 * size}, 300.0 * size) if gpu else EnergyReading({}, None, "the server runs on the CPU: no GPU energy counter")
            device = "cuda:0" if gpu else "cpu"
            stats_ = {"mode": mode, "engines_loaded": ["vision", "audio", "embed", "segment.0", "lm_head"] if mode == "static" else ["embed", "segment.0", "lm_head"],
                      "devices": {device: {"torch_allocated_bytes": 0, "torch_peak_allocated_bytes": int(4e9 * size), "nvml_used_bytes": None}}}
            runs.append(RunResult(c, None, 2.0 * scale * c, results, memory, energy, stats_))
        paths = {}
        for run in runs:
            for r in run.requests:
                paths.setdefault(r.path, {"exit_layer": r.exit_layer, "engines": r.engines, "devices": r.devices})
        modes[mode] = ModeResult(mode, ["python", "-m", "runtime.serve", f"runtime.mode={mode}"], 3.0, labels,
                                 {"cuda:0": 1 << 30} if gpu else {}, paths, runs, f"server-{mode}.log")
    return modes


def manifest_path(manifest, name):
    return next(p for p in manifest.paths if p.name == name)


def fake_environment(gpu: bool, name: str, cores: int = 2) -> dict:
    device = {"kind": "cuda" if gpu else "cpu", "name": name, "slug": slug(name), "driver": "580.1" if gpu else None, "placement": "one_gpu" if gpu else "cpu",
              "gpus": [{"label": "cuda:0", "nvml_index": 0, "name": name, "uuid": "GPU-0", "memory_total": 80 << 30}] if gpu else []}
    return {"device": device, "machine_class": machine_class(device["kind"], name, device["placement"], 1 if gpu else 0, cores),
            "cpu": {"model": "Test CPU", "cores": cores}, "python": "3.11", "platform": "linux", "libraries": {"torch": torch.__version__},
            "git": {"commit": None, "dirty": None}}


def fake_report(manifest, gpu: bool = True, name: str = "NVIDIA H100 80GB HBM3", slow: float = 1.0, peer: dict | None = None,
                cores: int = 2) -> dict:
    app = compose_bench(["bench=ci"])
    requests = build_workload(app.bench)
    text = [r for r in requests if r.text_only][:2]
    yardsticks = {
        "bandwidth": {("cuda:0" if gpu else "cpu"): {"device": "cuda:0", "bytes_per_s": 2.0e12 if gpu else 1.0e10, "copy_bytes": 1 << 30, "iters": 20, "method": "test"}},
        "transformers": {"implementation": "transformers (test)", "attn_implementation": "sdpa", "device": "cuda:0", "dtype": "fp32",
                         "requests": [{"index": r.index, "group": r.group, "prompt_tokens": 20 + r.index, "new_tokens": 8, "ttft_s": 0.1, "tpot_s": 0.06}
                                      for r in text], "tpot_s": 0.06},
        "peer": peer,
    }
    modes = fake_modes(app, manifest, requests, gpu, slow)
    return build_report(app, manifest, requests, fingerprint(requests), modes, fake_environment(gpu, name, cores), yardsticks, "test-report")


@pytest.fixture(scope="module")
def tiny_manifest(tiny_engines_dir):
    from contract.manifest import Manifest

    return Manifest.load(tiny_engines_dir)


def test_step_weight_bytes(tiny_manifest):
    from bench.baseline import step_weight_bytes

    # the bytes each engine stores, less the embedding table but the one row a step gathers
    m, per = tiny_manifest, 4  # fp32
    table, row = m.engines["embed"].parameters, m.model["config"]["text"]["dim"]
    gathered = (table - row) * per
    shallow = step_weight_bytes(m, manifest_path(m, "exit6-text"))
    assert shallow == sum(m.engines[n].bytes for n in ("embed", "segment.0", "lm_head")) - gathered
    assert shallow >= (row + m.engines["segment.0"].parameters + m.engines["lm_head"].parameters) * per  # files hold every weight
    static = step_weight_bytes(m, manifest_path(m, "static"))
    assert static == sum(m.engines[n].bytes for n in manifest_path(m, "static").step) - gathered
    # the static step runs exactly the deepest multimodal path's step engines
    assert static == step_weight_bytes(m, manifest_path(m, "exit24-text+image+audio"))


def test_report_renders(tiny_manifest, tmp_path):
    report = fake_report(tiny_manifest)
    files = write_report(report, tmp_path)
    assert sorted(f.name for f in files) == ["decode.png", "energy.png", "exits.png", "latency.png", "memory.png", "report.json", "report.md"]
    for png in tmp_path.glob("*.png"):
        assert Image.open(png).size[0] > 400
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["schema_version"] == SCHEMA_VERSION and saved["kind"] == "dyngraph-bench-report"
    m = saved["metrics"]
    assert m["ratio.mean_latency"]["value"] == pytest.approx(0.5) and m["ratio.mean_latency"]["scope"] == "machine_class"
    assert m["ratio.energy_per_request"]["value"] == pytest.approx(0.5)
    assert m["dynamic.energy_per_request_j"]["value"] == pytest.approx(150.0 / 6)  # 150 J over 6 requests per run
    assert m["dynamic.peak_memory_bytes"]["value"] == int(10e9)  # NVML's figure for the server process
    assert m["dynamic.exit_share.6"]["value"] == pytest.approx(4 / 6) and m["dynamic.exit_share.24"]["value"] == 0
    assert m["ratio.transformers_over_dynamic_tpot"]["value"] == pytest.approx(0.06 / 0.01)
    md = (tmp_path / "report.md").read_text()
    assert "| Mean latency |" in md and "| Peak GPU memory |" in md and "| Energy per request |" in md and "| Early exit" in md
    assert "| 0.50 | -50% |" in md  # dynamic/static of the mean latency
    assert "![energy.png](energy.png)" in md and "transformers `generate`" in md and "## Roofline" in md
    assert "| machine class | cuda: 1 x NVIDIA H100 80GB HBM3, placement one_gpu (`compare` checks timings only against this class) |" in md


def test_decode_plot_names_only_what_ran(tiny_manifest):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plot_decode(fake_report(tiny_manifest), plt)  # the peer did not run
    assert fig.axes[0].get_title() == "Decode at batch 1: dyngraph, transformers and the roofline"
    plt.close(fig)
    assert decode_title([{"kind": "dynamic"}, {"kind": "static"}, {"kind": "peer"}], roofline=False) == "Decode at batch 1: dyngraph and ORT GenAI"


def test_cpu_report_says_energy_is_unavailable(tiny_manifest, tmp_path):
    report = fake_report(tiny_manifest, gpu=False, name="AMD EPYC")
    files = write_report(report, tmp_path)
    assert "energy.png" not in [f.name for f in files]
    assert report["metrics"]["dynamic.energy_per_request_j"]["value"] is None
    assert report["metrics"]["dynamic.peak_memory_bytes"]["value"] == int(300e6)  # the server's RSS
    md = (tmp_path / "report.md").read_text()
    assert "Energy: unavailable, the server runs on the CPU" in md and "| Peak memory (server RSS) |" in md


# --- compare --------------------------------------------------------------------------------


def write(report: dict, path: Path) -> str:
    path.write_text(json.dumps(report))
    return str(path)


def configured(base: str, new: str) -> CompareConfig:
    """compare's settings as `python -m pipeline compare BASE NEW` has them (conf/bench.yaml)."""
    cfg = compose_bench().compare
    cfg.base, cfg.new = base, new
    return cfg


def test_compare_detects_regressions_and_applies_tolerances(tiny_manifest, tmp_path):
    base = fake_report(tiny_manifest)
    same = write(base, tmp_path / "same.json")
    out = io.StringIO()
    assert run_compare(CompareConfig(base=same, new=same), stream=out) == 0
    assert "no regression" in out.getvalue()

    slower = write(fake_report(tiny_manifest, slow=1.3), tmp_path / "slower.json")  # dynamic 30% slower, static unchanged
    out = io.StringIO()
    cfg = compose_bench().compare
    cfg.base, cfg.new = same, slower
    assert run_compare(cfg, stream=out) == 1
    text = out.getvalue()
    assert "ratio.mean_latency" in text and "REGRESSION" in text and "regression(s) past tolerance" in text
    # looser tolerances for the time metrics let the same change through
    assert run_compare(cfg, {"ratio.*": 0.5, "*_s": 0.5, "*per_s": 0.5, "*energy*": 0.5, "roofline.*": 0.5}, stream=io.StringIO()) == 0
    # and the machine-independent kinds never saw it
    cfg.kinds = ["exits", "work", "memory", "errors"]
    assert run_compare(cfg, stream=io.StringIO()) == 0

    faster = copy.deepcopy(base)
    faster["metrics"]["dynamic.mean_latency_s"]["value"] *= 0.5
    out = io.StringIO()
    assert run_compare(CompareConfig(base=same, new=write(faster, tmp_path / "faster.json")), stream=out) == 0
    assert "better" in out.getvalue()

    moved = copy.deepcopy(base)  # the policy sends more requests deep: not faster or slower, different
    moved["metrics"]["dynamic.exit_share.6"]["value"] -= 0.2
    out = io.StringIO()
    assert run_compare(CompareConfig(base=same, new=write(moved, tmp_path / "moved.json"), kinds=["exits"]), stream=out) == 1
    assert "dynamic.exit_share.6" in out.getvalue()


def test_tolerance_patterns():
    tolerances = {"*": 0.1, "ratio.*": 0.2, "*peak_memory*": 0.3, "ratio.mean_latency": 0.05}
    assert tolerance_for("ratio.mean_latency", tolerances) == 0.05  # exact name
    assert tolerance_for("ratio.peak_memory", tolerances) == 0.3  # the longest matching pattern
    assert tolerance_for("ratio.mean_ttft", tolerances) == 0.2
    assert tolerance_for("static.mean_latency_s", tolerances) == 0.1
    assert tolerance_for("anything", {}) == 0.1


def test_compare_across_machine_classes_skips_timings_in_one_line(tiny_manifest, tmp_path):
    base = write(fake_report(tiny_manifest), tmp_path / "h100.json")
    other = fake_report(tiny_manifest, name="NVIDIA H200")
    for m in other["metrics"].values():  # another GPU: every time and joule, and every ratio of them, moves
        if m["scope"] == "machine_class" and m["value"] is not None:
            m["value"] *= 2 if m["better"] == "lower" else 0.5
    out = io.StringIO()
    assert run_compare(configured(base, write(other, tmp_path / "h200.json")), stream=out) == 0
    lines = out.getvalue().splitlines()
    timings = [name for name, m in other["metrics"].items() if m["scope"] == "machine_class"]
    assert {"ratio.mean_latency", "ratio.transformers_over_dynamic_tpot", "roofline.full_depth_fraction", "dynamic.energy_per_request_j"} <= set(timings)
    said = [line for line in lines if "machine class" in line]
    assert len(said) == 1 and said[0].startswith(f"skipped {len(timings)}: another machine class (base cuda: 1 x NVIDIA H100 80GB HBM3, "
                                                 "placement one_gpu; new cuda: 1 x NVIDIA H200, placement one_gpu)")
    compared = {line.split()[0] for line in lines}
    assert not compared & set(timings)
    assert {"dynamic.exit_share.6", "dynamic.weight_bytes_per_token", "dynamic.weights_loaded_bytes", "dynamic.failed_requests",
            "dynamic.token_agreement", "dynamic.peak_memory_bytes"} <= compared  # what ran, and memory on the same device kind
    # a regression of what ran still fails across machine classes
    other["metrics"]["dynamic.weight_bytes_per_token"]["value"] *= 1.2
    out = io.StringIO()
    assert run_compare(configured(base, write(other, tmp_path / "h200-deeper.json")), stream=out) == 1
    assert "1 regression(s) past tolerance: dynamic.weight_bytes_per_token" in out.getvalue()
    # a CPU report's memory is the host's: not comparable with a GPU's bytes
    cpu = write(fake_report(tiny_manifest, gpu=False, name="AMD EPYC"), tmp_path / "cpu.json")
    out = io.StringIO()
    run_compare(configured(base, cpu), stream=out)
    assert "base measured cuda memory, new cpu memory" in out.getvalue()


def test_a_cpu_machine_class_is_its_model_and_its_cores(tiny_manifest, tmp_path):
    base = write(fake_report(tiny_manifest, gpu=False, name="AMD EPYC"), tmp_path / "epyc-2.json")
    slower = fake_report(tiny_manifest, gpu=False, name="AMD EPYC", slow=1.3)
    out = io.StringIO()
    assert run_compare(configured(base, write(slower, tmp_path / "epyc-2-slower.json")), stream=out) == 1
    assert "machine class" not in out.getvalue() and "ratio.mean_latency" in out.getvalue()  # the same class: timings compared
    more_cores = fake_report(tiny_manifest, gpu=False, name="AMD EPYC", slow=1.3, cores=16)
    out = io.StringIO()
    assert run_compare(configured(base, write(more_cores, tmp_path / "epyc-16.json")), stream=out) == 0
    assert "another machine class (base cpu: AMD EPYC, 2 cores, placement cpu; new cpu: AMD EPYC, 16 cores, placement cpu)" in out.getvalue()


def test_compare_checks_tokens_equal_to_full_depth(tiny_manifest, tmp_path):
    report = fake_report(tiny_manifest)
    m = report["metrics"]
    assert m["dynamic.token_agreement"] == {"value": 0.75, "unit": "share", "kind": "quality", "scope": "any", "better": "higher", "tolerance": "absolute"}
    assert m["static.token_agreement"]["value"] == 1.0 == report["quality"]["modes"]["static"]["token_agreement"]
    base = write(report, tmp_path / "base.json")
    astray = copy.deepcopy(report)
    astray["metrics"]["dynamic.token_agreement"]["value"] = 0.69  # 6 points: past the tolerance of 5
    out = io.StringIO()
    assert run_compare(configured(base, write(astray, tmp_path / "astray.json")), stream=out) == 1
    assert "1 regression(s) past tolerance: dynamic.token_agreement" in out.getvalue()


def test_every_metric_has_its_own_tolerance(tiny_manifest):
    """The catch-all "*" applies to no metric the bench writes: each kind's tolerance is stated for it."""
    tolerances = compose_bench().compare.tolerances
    specific = {k: v for k, v in tolerances.items() if k != "*"}
    peer = {"device": "cuda:0", "dtype": "fp32", "provider": "cuda", "implementation": "test", "architecture": "test", "decode_tokens": 8,
            "prompt_lengths": {}, "depths": [{"layers": 6, "build_s": 1.0, "build_bytes": 1, "deleted": True, "step_weight_bytes": 1 << 20,
                                              "runs": [{"cuda_graph": True, "prefill": [], "decode_step_s": {"median": 0.001}}]}]}
    metrics = fake_report(tiny_manifest, peer=peer)["metrics"]
    assert "peer.l6.decode_s" in metrics and "ratio.over_peer.first_exit" in metrics
    assert [name for name in metrics if not any(fnmatch.fnmatchcase(name, pattern) for pattern in specific)] == []
    assert tolerance_for("ratio.mean_latency", tolerances) == tolerances["ratio.*"]
    assert tolerance_for("ratio.weight_bytes_per_token", tolerances) == tolerances["*weight_bytes*"]


def test_compare_cli_exit_codes(tiny_manifest, tmp_path):
    base = fake_report(tiny_manifest)
    good = write(base, tmp_path / "base.json")
    worse = copy.deepcopy(base)
    worse["metrics"]["ratio.peak_memory"]["value"] *= 1.5
    bad = write(worse, tmp_path / "worse.json")
    result = run_cli("pipeline", "compare", good, bad)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "ratio.peak_memory" in result.stdout and "REGRESSION" in result.stdout
    result = run_cli("pipeline", "compare", good, bad, "--tolerance", "ratio.peak_memory=0.6")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("{not json", "is not a JSON file"),
    ('{"hello": 1}', "is not a dyngraph bench report"),
    ('{"kind": "dyngraph-bench-report", "schema_version": 99, "metrics": {}}', f"has report schema version 99, this dyngraph reads {SCHEMA_VERSION}"),
])
def test_compare_bad_input(tmp_path, content, message):
    path = tmp_path / "report.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(CompareError, match=message):
        load_report(path)


def test_compare_cli_bad_input(tmp_path):
    result = run_cli("pipeline", "compare", str(tmp_path / "missing.json"), str(tmp_path / "other.json"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"[ERROR] compare failed: {tmp_path / 'missing.json'}: no such file"]


# --- save_glm_checkpoint --------------------------------------------------------------------


def test_save_glm_checkpoint_round_trip(tiny_config, tiny_model, tmp_path):
    import dataclasses

    import transformers

    from model.autoglm import build_model
    from model.checkpoint import save_glm_checkpoint

    save_glm_checkpoint(tiny_model, tmp_path)
    again = build_model(dataclasses.replace(tiny_config, checkpoint=str(tmp_path), seed=7))  # other random parts, same decoder
    ours = dict(tiny_model.named_parameters())
    for name in again.checkpoint_tensors:
        torch.testing.assert_close(dict(again.named_parameters())[name], ours[name], rtol=0, atol=0)
    hf = transformers.GlmForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, tiny_config.text.vocab_size, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, tiny_model(ids), atol=1e-5, rtol=1e-5)


# --- the real thing: a CPU benchmark through the server ---------------------------------------


def test_bench_refuses_missing_engines(tmp_path):
    result = run_cli("pipeline", "bench", "bench=ci", f"engines_dir={tmp_path}", f"output_dir={tmp_path / 'out'}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "bench failed: no manifest at" in lines[0] and "export first: python -m pipeline export model=tiny" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("preset, corpus, thresholds", [("reference-gpu-bench", "/data/corpus-code", 4), ("reference-cpu-bench", "/tmp/dyngraph-code", 5)])
def test_reference_bench_presets_turn_on_the_corpus_and_the_curve(preset, corpus, thresholds):
    from bench.curve import check_curve

    app = compose_bench([f"+preset={preset}"])
    assert app.bench.corpus == corpus and app.model.checkpoint and "runtime.policy.name=confidence" in app.server.args
    assert {g.source for g in app.bench.groups.values()} == {"prompts", "code", "docstrings"}
    curve = app.bench.threshold_curve
    assert len(curve.thresholds) == thresholds and curve.calibrated and set(curve.groups) == {"code", "docstrings"}
    check_curve(app)
    assert compose_bench().bench.threshold_curve.thresholds == [] and compose_bench().bench.corpus is None  # off by default


@pytest.mark.parametrize("overrides, message", [
    (["bench.temperature=0.7"], "needs greedy outputs to compare (bench.temperature=0, not 0.7)"),
    (["bench.threshold_curve.thresholds=[0.5,1.5]"], "1.5 is not a probability"),
    (["bench.threshold_curve.groups=[code]"], "names 'code', not a group of bench=ci"),
])
def test_threshold_curve_refuses_bad_settings(overrides, message):
    from bench.curve import check_curve
    from bench.server import BenchError

    app = compose_bench(["bench=ci", "bench.threshold_curve.thresholds=[0.5]", *overrides])
    with pytest.raises(BenchError, match=re.escape(message)):
        check_curve(app)


def test_threshold_curve_on_the_cpu(tiny_engines_dir, tmp_path):
    """bench.threshold_curve on the tiny model (no calibrated thresholds): a static server and one
    dynamic server per threshold, two requests of four tokens each; top-1 >= 0 exits at the first
    exit, >= 1.0 never, and only the latter's tokens are all full depth's."""
    small = ["bench.groups.short.count=1", "bench.groups.long.count=1", "bench.groups.image.count=0", "bench.groups.audio.count=0"]
    result = run_cli("pipeline", "bench", "bench=ci", f"engines_dir={tiny_engines_dir.parent.parent}", f"output_dir={tmp_path}", "run_name=curve",
                     "progress=false", "bench.modes=[static]", "bench.concurrency=[1]", "bench.transformers.enabled=false",
                     "bench.roofline.enabled=false", *small, "bench.threshold_curve.thresholds=[1.0,0.0]", "bench.threshold_curve.requests=2",
                     "bench.threshold_curve.max_tokens=4", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "curve"
    assert {"quality_latency.png", "server-curve-static.log", "server-curve-0.log", "server-curve-1.log"} <= {p.name for p in out.iterdir()}
    with Image.open(out / "quality_latency.png") as png:
        assert png.size[0] > 400
    curve = json.loads((out / "report.json").read_text())["threshold_curve"]
    points = {p["label"]: p for p in curve["points"]}
    assert list(points) == ["static", "0", "1"] and curve["requests"] == 2 and curve["max_tokens"] == 4
    assert "no calibrated thresholds" in curve["calibrated_skipped"]
    assert points["static"]["token_agreement"] == 1.0 and points["static"]["latency_ratio"] == 1.0
    assert points["1"]["token_agreement"] == 1.0 and points["1"]["early_exit_share"] == 0.0
    assert points["1"]["settings"] == ["runtime.policy.name=confidence", "runtime.policy.confidence=1.0"]
    assert points["0"]["early_exit_share"] == 1.0 and points["0"]["exit_histogram"]["6"] == 2
    assert points["0"]["records"] != points["1"]["records"] and all(p["failed"] == 0 for p in points.values())
    assert curve["at_quality_floor"]["label"] == "1"
    md = (out / "report.md").read_text()
    assert "## Quality against latency over confidence thresholds" in md and "| top-1 ≥ 1 | 0% |" in md and "| top-1 ≥ 0 | 100% |" in md
    assert "At ≥ 95% of tokens equal to full-depth greedy, the fastest point of the curve is top-1 ≥ 1: latency " in md


def test_ci_bench_against_baseline(tiny_engines_dir, tmp_path):
    """bench=ci on the tiny model through the real server, then the real compare CLI against the
    committed baseline on what does not depend on the machine's speed, and a regression of it."""
    engines_root = tiny_engines_dir.parent.parent
    result = run_cli("pipeline", "bench", "bench=ci", f"engines_dir={engines_root}", f"output_dir={tmp_path}", "run_name=ci", "progress=false",
                     timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "ci"
    assert {"report.json", "report.md", "latency.png", "memory.png", "exits.png", "server-static.log", "server-dynamic.log"} <= {p.name for p in out.iterdir()}
    assert not (out / "energy.png").exists()  # energy is unavailable on the CPU, and not invented
    report = json.loads((out / "report.json").read_text())
    assert report["modes"]["static"]["summary"]["exit_histogram"] == {"6": 0, "12": 0, "18": 0, "24": 12}
    assert report["headline"]["dynamic"]["energy_per_request_j"] is None
    assert report["transformers"]["prompt_ids_match"] == "4/4"
    assert report["quality"]["modes"]["dynamic"]["per_group"]["long"] == 1.0  # the dynamic graph at full depth: static's greedy tokens
    assert report["workload"]["fingerprint"] == load_report(BASELINE)["workload"]["fingerprint"]
    compare = run_cli("pipeline", "compare", str(BASELINE), str(out / "report.json"), PORTABLE_KINDS)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    assert "dynamic.token_agreement" in compare.stdout and "dynamic.exit_share.6" in compare.stdout
    report["metrics"]["dynamic.exit_share.6"]["value"] -= 1 / 6  # two of the twelve dynamic requests sent deeper
    compare = run_cli("pipeline", "compare", str(BASELINE), write(report, tmp_path / "deeper.json"))
    assert compare.returncode == 1 and "dynamic.exit_share.6" in compare.stdout.split("past tolerance:")[1], compare.stdout
