"""`python -m pipeline bench bench=soak` in its CI size on the tiny export: the real server, the
real clients, four streams for 20 s after 5 s of warm-up (about 45 s in all on two cores)."""
from __future__ import annotations

import json

import pytest

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cli.command import register_configs
from bench.gpu_monitor import MemoryPeaks
from bench.soak import Outcome, Sample, build_report

from .conftest import CONF_DIR, run_cli


@pytest.mark.heavy
def test_the_ci_soak_passes_and_reports_statuses_memory_and_latency(tiny_engines_dir, tmp_path):
    result = run_cli("pipeline", "bench", "bench=soak", f"engines_dir={tiny_engines_dir.parent.parent}", f"output_dir={tmp_path}",
                     "bench.soak.streams=4", "bench.soak.duration_s=20", "bench.soak.warmup_s=5", "progress=false", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = next(tmp_path.glob("*-tiny-onnx-soak"))
    report = json.loads((folder / "soak.json").read_text())
    assert report["passed"] and report["failures"] == []
    kinds = report["statuses_by_kind"]
    assert set(kinds["good"]) == {"200"} and kinds["good"]["200"] >= 20
    assert set(kinds["disconnect"]) == {"200"} and set(kinds["malformed"]) <= {"400", "404"} and set(kinds["over_limit"]) <= {"400", "413"}
    assert sum(kinds["malformed"].values()) >= 2 and sum(kinds["over_limit"].values()) >= 2
    counted = report["server_counted_statuses"]
    assert not [s for s in counted if s.startswith("5")] and counted["499"] >= kinds["disconnect"]["200"]  # the server saw them leave
    assert [s["at"] for s in report["samples"]] == ["start", "middle", "end"]
    assert all(s["rss_bytes"] > 100 * 2**20 and s["open_fds"] > 0 for s in report["samples"])
    assert report["growth"]["rss"] <= report["tolerances"]["max_rss_growth"]
    good = report["latency"]["good"]
    assert good["n"] == kinds["good"]["200"] and 0 < good["p50_s"] <= good["p99_s"]
    assert report["health_at_end"]["body"] == {"status": "ok"} and report["exit_code"] == 0
    assert "| good | 200: " in (folder / "soak.md").read_text() and "Application startup complete" in (folder / "server.log").read_text()
    assert "soak: passed" in result.stderr


def samples(rss: tuple[int, int], fds: tuple[int, int]) -> list[Sample]:
    return [Sample("start", 0.0, rss[0], fds[0]), Sample("middle", 5.0, rss[0], fds[0]), Sample("end", 10.0, rss[1], fds[1])]


@pytest.mark.parametrize("outcomes, rss, fds, failure", [
    ([Outcome("soak", "good", "text-0", 500, ok=False, error="boom")], (100, 100), (10, 10), "1 server errors"),
    ([Outcome("soak", "good", "text-0", 200, ok=False, error="error inside the stream: generation failed")], (100, 100), (10, 10),
     "1 server errors"),
    ([Outcome("soak", "malformed", "NaN", 200, ok=False)], (100, 100), (10, 10), "another answer than their kind should"),
    ([], (100, 111), (10, 10), "RSS grew by 11.0%"),
    ([], (100, 100), (10, 27), "open file descriptors grew by 17"),
])
def test_the_soak_fails_on_server_errors_wrong_answers_and_growth(outcomes, rss, fds, failure):
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        app = OmegaConf.to_object(compose(config_name="bench", overrides=["bench=soak"]))
    report = build_report(app, app.bench.soak, outcomes, samples(rss, fds), MemoryPeaks(), soak_s=10.0, health_status=200,
                          health={"status": "ok"}, counted={"200": 1.0}, exit_code=0, nvml=None, labels=[])
    assert not report["passed"] and any(failure in f for f in report["failures"]), report["failures"]
