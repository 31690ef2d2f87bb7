"""Serving under a memory budget (runtime.offload.gpu_memory_budget_gb) on the tiny export, on the CPU:
requests on deep paths under a budget that holds one engine at a time, a load the budget cannot make
room for (a 503 naming the setting), and the bench's budget sweep (bench.memory_budgets_gb)."""
from __future__ import annotations

import asyncio
import json
import re

import pytest

from model.tokenizer import ChatTokenizer
from contract.manifest import Manifest
from runtime.config import OffloadConfig, PolicyConfig
from runtime.engines import BudgetExceeded, EngineSet
from runtime.requests import Failed, Finished
from tests.conftest import run_cli
from tests.servers import MODEL, Server
from tests.test_quantize import int8_export  # noqa: F401 (a fixture: the int8 export the sweep serves)
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

SERVERS = ("++bench.memory_budget_servers={unquantized:{references:[static,resident],budgets_gb:[0.03,0.008,0.003]},"
           "int8:{references:[],budgets_gb:[0.003]}}")
PHASES = "++bench.memory_budget_phases={text:[short,long],media:[image,audio]}"


def test_bench_budget_sweep_runs_each_kind_of_server_per_quantization_in_phases(engines_root, tiny_export, int8_export, tmp_path):
    """bench=ci in two phases (text, then media), through every kind of server. Unquantized (19.4 MiB of
    engines, segments of 3.5 MiB): static and resident references, 0.03 GiB that holds every engine (no
    server), 0.008 GiB that holds the resident engines and one segment more (deep paths reload), 0.003 GiB
    not even one segment (refused); int8 (7.9 MiB, its largest engine the 1.3 MiB vision encoder) with no
    reference, under 0.003 GiB (deep and media paths reload)."""
    result = run_cli("pipeline", "bench", "bench=ci", f"engines_dir={engines_root}", f"output_dir={tmp_path}", "run_name=budgets",
                     "bench.quantizations=[null,int8]", SERVERS, PHASES, "bench.concurrency=[2]", "progress=false", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "budgets"
    report = json.loads((folder / "budgets.json").read_text())
    assert report["quantizations"] == ["unquantized", "int8"]
    assert report["budgets_gb"] == {"unquantized": [0.0, 0.03, 0.008, 0.003], "int8": [0.0, 0.003]}
    # the references and no limit first, then the budgets as listed; 0.03 GiB runs no server
    assert report["servers"] == ["unquantized-static", "unquantized-unlimited", "int8-unlimited", "unquantized-resident",
                                 "unquantized-0.008gb", "unquantized-0.003gb", "int8-0.003gb"]
    assert report["phases"] == {"text": {"groups": ["long", "short"], "requests": 4}, "media": {"groups": ["audio", "image"], "requests": 2}}
    rows = {(r["quantization"], r["server"], r["budget_gb"], r["phase"]): r for r in report["rows"]}
    assert rows["unquantized", "on demand", 0.03, None]["holds_all"]
    refused = rows["unquantized", "on demand", 0.003, None]["refused"]
    assert "runtime.offload.gpu_memory_budget_gb=0.003 (3.1 MiB on cpu) is smaller than engine segment." in refused and "(3.5 MiB)" in refused
    served = {k: r for k, r in rows.items() if k[3] is not None}
    assert {k[:3] for k in served} == {("unquantized", "static", None), ("unquantized", "on demand", 0.0), ("unquantized", "resident", None),
                                       ("unquantized", "on demand", 0.008), ("int8", "on demand", 0.0), ("int8", "on demand", 0.003)}
    for (quantization, server, budget, phase), row in served.items():
        assert row["concurrency"] == 2 and row["requests"] == report["phases"][phase]["requests"] and row["failed"] == row["cut"] == 0
        assert row["peak_memory_bytes"] > 0 and row["latency_mean_s"] > 0 and row["latency_p99_s"] >= row["latency_mean_s"]
        if server != "static":  # greedy: a budget changes when engines load, and residency neither, not what they compute
            assert row["tokens_equal"] == 1.0 and row["tokens_compared"] > 0
        if quantization == "unquantized":
            assert row["peak_vs_static"] > 0 and row["latency_vs_static"] > 0 and row["latency_vs_resident"] > 0
        else:  # no int8 reference ran
            assert row["peak_vs_static"] is row["latency_vs_static"] is row["tokens_equal_full_depth"] is None
    for phase in ("text", "media"):
        static = served["unquantized", "static", None, phase]
        assert static["peak_vs_static"] == static["latency_vs_static"] == static["tokens_equal_full_depth"] == 1.0
        # warmed up, nothing loads without a limit, nor with every engine loaded at start
        for key in (("unquantized", "on demand", 0.0), ("int8", "on demand", 0.0), ("unquantized", "resident", None)):
            assert served[(*key, phase)]["engine_loads_per_request"] == 0
    total = report["engine_bytes"]["unquantized"]
    assert served["unquantized", "resident", None, "text"]["resident_engine_bytes"]["cpu"] == total
    # the first phase met a fresh server: text requests never loaded an encoder
    assert served["unquantized", "on demand", 0.0, "text"]["resident_engine_bytes"]["cpu"] < total
    for key in (("unquantized", "on demand", 0.008, "text"), ("int8", "on demand", 0.003, "text")):  # the long request reloads at every step
        assert served[key]["engine_loads_per_request"] > 0.5 and served[key]["budget_evictions_per_request"] > 0.5
    md = (folder / "budgets.md").read_text()
    assert "## text: 4 requests (long, short)" in md and "## media: 2 requests (audio, image)" in md
    assert "| unquantized | on demand, 0.008 GB | 2 |" in md
    assert "- unquantized, on demand, 0.003 GB: refused at start-up: " in md and "- unquantized, on demand, 0.03 GB: holds every engine" in md
    assert set(report["server_s"]) == set(report["servers"])  # start to stop, a refusal too
    for name in ("budget_latency.png", *(f"server-{s}.log" for s in report["servers"])):
        assert (folder / name).stat().st_size > 0


def test_the_gpu_budget_preset_sweeps_the_budgets_that_bite_each_export():
    """+preset=phone-9b-gpu-budget: its servers, and which of its budgets run a server, for phone-9b's
    engine bytes per export (bench_results/2026-12-03-nvidia-h200-phone-9b-ort-memory)."""
    from bench.budget import check_sweep, plan
    from tests.test_bench import compose_bench

    app = compose_bench(["+preset=phone-9b-gpu-budget"])
    assert app.server.runtime == "one_gpu" and app.bench.name == "budget" and app.bench.concurrency == [16]
    assert dict(app.bench.memory_budget_phases) == {"text-shallow": ["questions", "instructions"], "default-mix": ["short", "long", "image", "audio"]}
    servers = check_sweep(app, ["unquantized", "int8", "int4"])
    assert servers == {"unquantized": (["static", "resident"], [0.0, 12.0]), "int8": (["static"], [0.0, 8.0]), "int4": (["static"], [0.0, 8.0])}
    points, holds = plan(servers, {"unquantized": 18_130_140_850, "int8": 10_478_000_000, "int4": 6_397_000_000})
    assert [p.name for p in points] == ["unquantized-static", "int8-static", "int4-static", "unquantized-unlimited", "int8-unlimited",
                                        "int4-unlimited", "unquantized-resident", "unquantized-12gb", "int8-8gb"]
    assert [(h["quantization"], h["budget_gb"]) for h in holds] == [("int4", 8.0)]


@pytest.mark.parametrize("overrides, message", [
    (["bench.memory_budgets_gb=[1]", "++bench.memory_budget_servers={fp16:{budgets_gb:[1]}}"],
     "bench.memory_budget_servers names fp16, not a quantization (unquantized, int8, int4)"),
    (["bench.memory_budgets_gb=[1]", "bench.memory_budget_references=[static,offloaded]"], "offloaded is not one of static, resident"),
    (["bench.memory_budgets_gb=[1]", "++bench.memory_budget_phases={first:[short,vision]}"],
     "bench.memory_budget_phases.first=['short', 'vision'] must name groups of bench=ci that send requests (short, long, image, audio): not vision"),
    (["bench.memory_budgets_gb=[1]", "bench.memory_budget_run_limit_s=-1"], "bench.memory_budget_run_limit_s=-1 must be 0 (no limit) or more"),
])
def test_budget_sweep_refuses_bad_settings(overrides, message):
    from bench.budget import check_sweep
    from bench.server import BenchError
    from tests.test_bench import compose_bench

    app = compose_bench(["bench=ci", *overrides])
    with pytest.raises(BenchError, match=re.escape(message)):
        check_sweep(app, ["unquantized"])


def test_bench_budget_sweep_refuses_a_negative_budget(engines_root, tiny_export, tmp_path):
    result = run_cli("pipeline", "bench", "bench=ci", f"engines_dir={engines_root}", f"output_dir={tmp_path}",
                     "bench.memory_budgets_gb=[-1]")
    assert result.returncode == 2 and "budgets are GiB per device, 0 or more" in result.stderr and "Traceback" not in result.stderr


def test_a_run_past_its_time_limit_cuts_its_requests_and_the_server_serves_on(tiny_engines_dir, tmp_path):
    """drive's limit_s (bench.memory_budget_run_limit_s): a request in flight when the limit runs out is cut
    off (the server cancels it and frees its slot), one not sent by then is not sent; the next run is served.
    The limit is far shorter than the first request's answer (as many tokens as the context allows)."""
    from bench.client import drive
    from bench.workload import build_workload
    from tests.test_bench import compose_bench

    server = Server(tiny_engines_dir.parent.parent, tmp_path / "serve.log", "runtime.max_batch_size=1")
    try:
        cfg = compose_bench(["bench=ci"]).bench
        chosen = build_workload(cfg)[:3]
        long_answers = [r.body(MODEL, 0.0, 0, max_tokens=400) | {"ignore_eos": True} for r in chosen]
        cut = asyncio.run(drive(server.url, chosen, long_answers, "dynamic", 1, [0.0] * 3, 60, lambda _: None, limit_s=0.05))
        assert all(r.cut and not r.ok and "time limit of 0.05 s ran out" in r.error for r in cut), cut
        after = asyncio.run(drive(server.url, chosen, [r.body(MODEL, 0.0, 0, max_tokens=4) for r in chosen], "dynamic", 1, [0.0] * 3, 60,
                                  lambda _: None, limit_s=120))
        assert all(r.ok and not r.cut for r in after), after
    finally:
        server.stop()
