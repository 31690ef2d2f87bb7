"""Serving under a memory budget (runtime.offload.gpu_memory_budget_gb) on the tiny export, on the CPU:
requests on deep paths under a budget that holds one engine at a time, a load the budget cannot make
room for (a 503 naming the setting), and the bench's budget sweep (bench.memory_budgets_gb)."""
from __future__ import annotations

import json

import pytest

from model.tokenizer import ChatTokenizer
from contract.manifest import Manifest
from runtime.config import OffloadConfig, PolicyConfig
from runtime.engines import BudgetExceeded, EngineSet
from runtime.requests import Failed, Finished
from tests.conftest import run_cli
from tests.test_runtime import Running, make_engine, request

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTING = "runtime.offload.gpu_memory_budget_gb="


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return ChatTokenizer.builtin()


def serve(engines: EngineSet, tok: ChatTokenizer) -> Running:
    budget = sum(engines.budget_bytes.values())
    engine = make_engine(engines, tok, offload=OffloadConfig(enabled=True, gpu_memory_budget_gb=budget / 2**30),
                         policy=PolicyConfig(request_override=True), max_batch_size=2)
    engine.warm_up()
    return Running(engine)


def test_two_deep_paths_under_a_budget_of_one_engine_reload_and_keep_their_tokens(tiny_engines_dir, tok):
    """A budget just above the largest engine holds one segment at a time: two concurrent requests on
    different deep paths evict each other's engines (those in use too: nothing else can go) and
    reload them every step, and still generate the unlimited budget's tokens."""
    largest = max(Manifest.load(tiny_engines_dir).engines.values(), key=lambda e: e.bytes).bytes
    requests = [request(tok, "deep request", 4, exit_layer=24), request(tok, "another one", 4, exit_layer=18)]
    outputs = {}
    for budget in (0, largest + 4096):
        engines = EngineSet(tiny_engines_dir, budget_bytes={"cpu": budget} if budget else None)
        running = serve(engines, tok)
        try:
            events = running.run(*requests)
        finally:
            running.close()
        assert all(isinstance(ev[-1], Finished) for ev in events), [ev[-1] for ev in events]
        outputs[budget] = [ev[-1].token_ids for ev in events]
        if budget:
            assert engines.resident_bytes("cpu") <= budget
            assert engines.loads["segment.2"][0] >= 2 and engines.loads["segment.0"][0] >= 2  # reloaded, again and again
    assert outputs[0] == outputs[largest + 4096]


def test_an_engine_the_budget_cannot_make_resident_is_a_503_naming_the_budget(tiny_engines_dir, tok, monkeypatch):
    """The device refusing a load under the budget (what a run holding an evicted engine, or the KV
    caches, can leave on a GPU) fails that request with a 503 naming the setting; the server serves on."""
    engines = EngineSet(tiny_engines_dir, budget_bytes={"cpu": 32 << 20})
    load = engines.load

    def refuse(record, device, host=None):
        if record.name == "segment.3":
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer")
        return load(record, device, host)

    monkeypatch.setattr(engines, "load", refuse)
    running = serve(engines, tok)
    try:
        (deep,), (shallow,) = ([ev[-1]] for ev in running.run(request(tok, "deep", 3, exit_layer=24), request(tok, "shallow", 3, exit_layer=6)))
        (after,), = ([ev[-1]] for ev in running.run(request(tok, "still serving", 3, exit_layer=12)))
    finally:
        running.close()
    assert isinstance(deep, Failed) and deep.status == 503, deep
    assert "BudgetExceeded" in deep.message and SETTING + "0.03125 (32.0 MiB on cpu)" in deep.message and "segment.3" in deep.message
    assert isinstance(shallow, Finished) and isinstance(after, Finished)


def test_an_engine_larger_than_the_whole_budget_names_the_setting(tiny_engines_dir):
    engines = EngineSet(tiny_engines_dir, budget_bytes={"cpu": 4096})
    with pytest.raises(BudgetExceeded, match=r"engine segment\.0 needs 3\.5 MiB, more than the whole runtime\.offload\.gpu_memory_budget_gb="):
        engines.session("segment.0")


# --- the bench's budget sweep ---------------------------------------------------------------------


def test_bench_budget_sweep_reports_each_budget_and_refuses_one_below_the_largest_engine(engines_root, tiny_export, tmp_path):
    """Budgets of the tiny export (27 MB of engines, segments of 3.5 MiB): 0.03 GiB holds every engine, 0.008
    GiB the resident ones and one segment more (deep paths reload), 0.003 GiB not even one segment (refused)."""
    result = run_cli("pipeline", "bench", "bench=ci", f"engines_dir={engines_root}", f"output_dir={tmp_path}", "run_name=budgets",
                     "bench.memory_budgets_gb=[0.03,0.008,0.003]", "bench.concurrency=[2]", "progress=false", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "budgets"
    report = json.loads((folder / "budgets.json").read_text())
    assert report["budgets_gb"] == [0.0, 0.03, 0.008, 0.003] and report["quantizations"] == ["unquantized"]
    rows = {r["budget_gb"]: r for r in report["rows"]}
    assert set(rows) == {0.0, 0.03, 0.008, 0.003}
    refused = rows[0.003]
    assert refused["refused"] and "runtime.offload.gpu_memory_budget_gb=0.003 (3.1 MiB on cpu) is smaller than engine segment." in refused["refused"]
    assert "(3.5 MiB)" in refused["refused"]
    for budget in (0.0, 0.03, 0.008):
        row = rows[budget]
        assert row["refused"] is None and row["failed"] == 0 and row["requests"] == 6
        assert row["tokens_equal"] == 1.0 and row["tokens_compared"] > 0  # greedy: a budget changes when engines load, not what they compute
        assert row["peak_memory_bytes"] > 0 and row["latency_mean_s"] > 0 and row["latency_p99_s"] >= row["latency_mean_s"]
    # warmed up, nothing reloads without a limit or under one that holds every engine; a tight one reloads and evicts
    assert rows[0.0]["engine_loads_per_request"] == rows[0.03]["engine_loads_per_request"] == 0
    assert rows[0.008]["engine_loads_per_request"] > 0.5 and rows[0.008]["budget_evictions_per_request"] > 0.5
    assert rows[0.008]["peak_memory_bytes"] < rows[0.0]["peak_memory_bytes"] * 1.5
    md = (folder / "budgets.md").read_text()
    assert "| unquantized | 0.003 GB | – | refused: " in md and "| unquantized | no limit | 2 |" in md
    for name in ("budget_latency.png", "server-unquantized-unlimited.log", "server-unquantized-0.008gb.log", "server-unquantized-0.003gb.log"):
        assert (folder / name).stat().st_size > 0


def test_bench_budget_sweep_refuses_a_negative_budget(engines_root, tiny_export, tmp_path):
    result = run_cli("pipeline", "bench", "bench=ci", f"engines_dir={engines_root}", f"output_dir={tmp_path}",
                     "bench.memory_budgets_gb=[-1]")
    assert result.returncode == 2 and "budgets are GiB per device, 0 or more" in result.stderr and "Traceback" not in result.stderr
