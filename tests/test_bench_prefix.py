"""bench=prefix (bench/prefix.py): multi-turn chats sharing a system prompt through a server with
the prefix cache off and one with it on, on the tiny model over HTTP; the report's files and fields."""
from __future__ import annotations

import json
import statistics

import pytest

from bench.prefix import peer_per_turn, plot, render_markdown, turn_lengths

from .conftest import one_error_line, run_cli


def test_bench_prefix_reports_cache_off_and_on(tiny_engines_dir, tmp_path):
    engines_root = tiny_engines_dir.parent.parent
    result = run_cli("pipeline", "bench", "bench=prefix", f"engines_dir={engines_root}", f"output_dir={tmp_path}", "run_name=prefix",
                     "progress=false", "bench.prefix.system_tokens=100", "bench.prefix.chats=2", "bench.prefix.turns=2",
                     "bench.prefix.max_tokens=4", "bench.concurrency=[2]", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "prefix"
    assert {"prefix.json", "prefix.md", "prefix.png", "server-cache-off.log", "server-cache-on.log"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "prefix.json").read_text())
    # the built-in tokenizer is byte-level: the cut lands exactly; the template adds [gMASK]<sop><|system|>\n
    assert report["system_tokens"] == 100 and report["shared_prefix_tokens"] == 104 and report["layers"] == 24
    runs = {(r["prefix_cache"], r["concurrency"]): r for r in report["runs"]}
    assert set(runs) == {(False, 2), (True, 2)}
    for run in runs.values():
        assert [t["turn"] for t in run["turns"]] == [1, 2] and len(run["requests"]) == 4
        assert run["prompt_tokens"] == sum(r["prompt_tokens"] for r in run["requests"]) and run["completion_tokens"] == 4 * 4
        assert run["cached_tokens"] == sum(r["cached_tokens"] for r in run["requests"]) and 0 <= run["cached_share"] <= 1
        assert all(isinstance(r["cached_tokens"], int) for r in run["requests"])
        assert run["ttft_s"]["first_turn"]["n"] == 2 and run["ttft_s"]["later_turns"]["n"] == 2 and run["tpot_s"]["mean"] > 0
        first, later = ({r["chat"]: r["prompt_tokens"] for r in run["requests"] if r["turn"] == t} for t in (1, 2))
        assert all(later[c] > first[c] for c in first)  # the second turn carries the first, its answer and a new user turn
    assert runs[(False, 2)]["cached_tokens"] == 0  # nothing comes from a cache that is off
    (c,) = report["comparisons"]
    assert c["concurrency"] == 2 and c["identical"] and c["prompts_equal"] and c["first_mismatch"] is None
    assert c["tokens_equal"] == c["tokens_compared"] == runs[(True, 2)]["completion_tokens"]
    assert len(c["ttft_ratio"]["per_turn"]) == 2 and all(r > 0 for r in c["ttft_ratio"]["per_turn"])
    assert "skipped" in report["peer"] or report["peer_per_turn"]["layers"] == 24
    md = (out / "prefix.md").read_text()
    assert "| on | 2 |" in md and "| off | 2 |" in md and "16 of 16 tokens equal between cache on and off" in md

    # the peer's column, from a peer record in run_peer's form with made-up times: for the formatting only
    lengths = turn_lengths(report["runs"])
    report["peer"] = {"implementation": "ORT GenAI (made up)", "prompt_lengths": lengths,
                      "depths": [{"layers": 24, "runs": [{"cuda_graph": False, "prefill": [
                          {"prompt_tokens": n, "ttft_s": n / 1e4} for n in sorted({n for g in lengths.values() for n in g})]}]}]}
    report["peer_per_turn"] = peer_per_turn(report["peer"], 24)
    assert report["peer_per_turn"]["ttft_s"] == [statistics.fmean(n / 1e4 for n in lengths[f"turn {t}"]) for t in (1, 2)]
    md = render_markdown(report)
    assert f"{1e3 * report['peer_per_turn']['ttft_s'][1]:.1f} |" in md.split("| 2 | 2 |")[1].splitlines()[0]  # concurrency 2, turn 2
    assert "- ORT GenAI: ORT GenAI (made up), 24 layers: each prompt" in md
    plot(report, tmp_path / "with-peer.png")
    assert peer_per_turn(report["peer"], 6) == {"skipped": "the peer has no figure at 6 layers (bench.peer.layers=[24])"}


@pytest.mark.parametrize("overrides, message", [
    (["bench.prefix.exit_layer=7"], "bench.prefix.exit_layer=7 is not one of the engines' exits [6, 12, 18, 24]"),
    (["bench.prefix.system_tokens=3000"], "past the engines' context of 2048"),
])
def test_bench_prefix_refuses_bad_settings(tiny_engines_dir, tmp_path, overrides, message):
    result = run_cli("pipeline", "bench", "bench=prefix", f"engines_dir={tiny_engines_dir.parent.parent}", f"output_dir={tmp_path}", *overrides)
    one_error_line(result, message)
