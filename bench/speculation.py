"""`python -m pipeline bench bench=speculation`: full depth with self-speculation against without.

One server per draft length in `bench.speculation.draft_tokens` and draft quantization in
`bench.speculation.draft_quantize` (null: the served export's engines draft; int8/int4: that
`export.quantize` export of the same model does), every request forced to full depth
(`runtime.policy.force_exit`) and speculating at every batch size (`runtime.speculation.max_batch`
= the largest concurrency level, so each level shows what speculation does there; the server's
default, 1, speculates only for a request decoding alone). At each concurrency level the workload's
text requests go once plain (`speculative: false`) and once per draft exit (`speculative: true`,
`draft_exit`), each generating `max_tokens` greedy tokens. Per configuration and level: time per
output token, output tokens per second, drafts accepted of those drafted, tokens per verification,
and the tokens equal to plain full depth's at concurrency 1 (bench/quality.py), with the ratio
to plain. Beside it, at concurrency 1, transformers' `assistant_early_exit` (Hugging Face's
self-speculation: the first layers and the final norm draft, sharing the weights but not the
cache) against its own plain greedy generate, on the same weights.

Reports go to `<output_dir>/<date>-<device>-<model>-<backend>[-<quantize>]-speculation/`:
speculation.json, speculation.md, speculation.png and the servers' logs.
"""
from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from bench.baseline import BaselineSkipped, same_weights
from bench.client import RequestResult, drive
from bench.quality import agreement
from bench.host import cpu_model, git_state, open_nvml, write_reports
from bench.run import check_request
from bench.server import BenchError, Server
from bench.workload import BenchRequest
from contract.config import BenchApp
from contract.engines import EXPORT_DTYPES
from contract.exits import Exits
from contract.manifest import Manifest
from pipeline.console import make_console


def configurations(cfg, exits: Exits) -> list[tuple[int, int | None]]:
    """(draft length, draft exit or None for plain) per server and request kind, plain first in each server."""
    draft_exits = [exits.first if e is None else e for e in cfg.draft_exits]
    return [(k, e) for k in cfg.draft_tokens for e in (None, *draft_exits)]


def run_speculation(app: BenchApp, server_overrides: list[str], console: Console | None = None) -> Path:
    """Run the comparison; return the report folder."""
    console = console or make_console()
    cfg = app.bench.speculation
    engines, manifest, workload = check_request(app)
    exits = Exits.of(manifest)
    bad = [e for e in cfg.draft_exits if e is not None and e not in exits.layers[:-1]]
    if bad or not cfg.draft_tokens or min(cfg.draft_tokens) < 1 or cfg.requests < 1 or cfg.max_tokens < 2:
        raise BenchError(f"bench.speculation: draft_exits={list(cfg.draft_exits)} must be exits short of the last "
                         f"({list(exits.layers[:-1])}), draft_tokens={list(cfg.draft_tokens)} at least 1 each, "
                         f"requests={cfg.requests} at least 1, max_tokens={cfg.max_tokens} at least 2")
    requests = take_in_turn(workload, cfg.groups, cfg.requests)
    levels = sorted(set(app.bench.concurrency))
    nvml = open_nvml(app)
    device = nvml.gpus[0].label if nvml is not None and nvml.gpus else cpu_model()
    if nvml is not None:
        nvml.close()
    log_dir = Path(tempfile.mkdtemp(prefix="dyngraph-speculation-"))
    console.print(f"[bold]speculation[/]: {len(requests)} text requests x {cfg.max_tokens} tokens x concurrency {levels}, "
                  f"draft lengths {list(cfg.draft_tokens)} at exits {[exits.first if e is None else e for e in cfg.draft_exits]}, "
                  f"full depth ({exits.full} layers); engines {engines}")
    draft_exits = [exits.first if e is None else e for e in cfg.draft_exits]
    runs: list[dict] = []
    for k, quantize in [(k, q) for q in cfg.draft_quantize for k in cfg.draft_tokens]:
        overrides = [f"runtime.policy.force_exit={exits.full}", "runtime.speculation.enabled=false",
                     f"runtime.speculation.draft_tokens={k}", f"runtime.speculation.adaptive={str(cfg.adaptive).lower()}",
                     f"runtime.speculation.max_batch={max(levels)}", f"runtime.speculation.draft_quantize={quantize or 'null'}"]
        server_log = log_dir / f"server-k{k}{'-' + quantize if quantize else ''}.log"
        with Server(app, "dynamic", server_overrides + overrides, server_log) as server:
            # unmeasured: every request once at the highest level (each prompt's prefill shapes, every batch size's
            # arenas), then one request per draft exit: the first configuration measured pays no warm-up of the others
            warm = [(r, r.body(server.model_id, 0.0, app.bench.seed, max_tokens=cfg.max_tokens) | {"ignore_eos": True}) for r in requests]
            warm += [(requests[0], warm[0][1] | {"speculative": True, "draft_exit": e}) for e in draft_exits]
            asyncio.run(drive(server.url, [r for r, _ in warm], [b for _, b in warm], "dynamic", max(levels), [0.0] * len(warm),
                              app.bench.request_timeout_s, lambda _: None))
            for concurrency in levels:
                for draft_exit in (None, *draft_exits):
                    bodies = [r.body(server.model_id, 0.0, app.bench.seed, max_tokens=cfg.max_tokens)
                              | {"ignore_eos": True, "speculative": draft_exit is not None}
                              | ({"draft_exit": draft_exit} if draft_exit is not None else {}) for r in requests]
                    t0 = time.perf_counter()
                    results = asyncio.run(drive(server.url, requests, bodies, "dynamic", concurrency, [0.0] * len(requests),
                                                app.bench.request_timeout_s, lambda _: None))
                    wall = time.perf_counter() - t0
                    failed = [r for r in results if not r.ok]
                    if failed:
                        raise BenchError(f"a request failed (k={k}, draft exit {draft_exit}, concurrency {concurrency}): "
                                         f"{failed[0].error} (log: {server_log})")
                    runs.append(summarize(k, quantize, draft_exit, concurrency, results, wall))
                    console.print(f"  {label(runs[-1])} c={concurrency}: "
                                  f"{runs[-1]['tpot_ms']:.2f} ms/token, {runs[-1]['tokens_per_s']:.0f} tokens/s"
                                  + (f", {runs[-1]['acceptance']:.0%} of drafts accepted" if draft_exit is not None else ""))
    report = build_report(app, manifest, engines.name, device, requests, runs)
    if app.bench.speculation.transformers:
        report["transformers"] = transformers_early_exit(app, manifest, requests[:min(4, len(requests))], exits, console)
    report_dir = write_reports(app, "speculation", device, engines.name, log_dir, report, render_markdown(report), lambda path: plot(report, path))
    print_table(report, console)
    console.print(f"report: {report_dir / 'speculation.md'}")
    return report_dir


def take_in_turn(workload: list[BenchRequest], groups: list[str], n: int) -> list[BenchRequest]:
    """n text requests, one of each group in turn (each group's in its order), repeated when they run out."""
    text = {}
    for r in workload:
        if r.text_only and (not groups or r.group in groups):
            text.setdefault(r.group, []).append(r)
    unknown = sorted(set(groups) - {r.group for r in workload})
    if unknown or not text:
        raise BenchError(f"bench.speculation.groups={list(groups)}: " + (f"no group {unknown} in the workload" if unknown else
                         "no text request in them") + f" (text groups: {sorted({r.group for r in workload if r.text_only})})")
    turns = [r for group in zip(*(g * (1 + n // len(g)) for g in text.values())) for r in group]
    return turns[:n]


def summarize(k: int, quantize: str | None, draft_exit: int | None, concurrency: int, results: list[RequestResult], wall: float) -> dict:
    tokens = sum(r.completion_tokens for r in results)
    counts = {key: sum((r.speculation or {}).get(key, 0) for r in results) for key in ("drafted", "accepted", "verifications", "tokens")}
    per_group = {}
    for r in results:
        g = per_group.setdefault(r.group, {"drafted": 0, "accepted": 0})
        for key in g:
            g[key] += (r.speculation or {}).get(key, 0)
    return {"draft_tokens": k, "draft_quantize": quantize, "draft_exit": draft_exit, "concurrency": concurrency,
            "acceptance_per_group": {g: c["accepted"] / c["drafted"] if c["drafted"] else None for g, c in per_group.items()},
            "tpot_ms": 1000 * statistics.fmean(r.tpot_s for r in results if r.tpot_s is not None),
            "ttft_ms": 1000 * statistics.fmean(r.ttft_s for r in results),
            "latency_s": statistics.fmean(r.latency_s for r in results),
            "tokens_per_s": tokens / wall, "completion_tokens": tokens, **counts,
            "acceptance": counts["accepted"] / counts["drafted"] if counts["drafted"] else None,
            "tokens_per_verification": counts["tokens"] / counts["verifications"] if counts["verifications"] else None,
            "outputs": [r.tokens for r in results]}


def build_report(app: BenchApp, manifest: Manifest, engines: str, device: str, requests: list[BenchRequest], runs: list[dict]) -> dict:
    """Each run's figures beside plain full depth's at the same draft-length server and concurrency,
    and its tokens against plain full depth's at concurrency 1 (the greedy reference)."""
    reference = next(r for r in runs if r["draft_exit"] is None and r["concurrency"] == min(x["concurrency"] for x in runs))["outputs"]
    for run in runs:
        plain = next(r for r in runs if r["draft_exit"] is None and r["draft_tokens"] == run["draft_tokens"]
                     and r["draft_quantize"] == run["draft_quantize"] and r["concurrency"] == run["concurrency"])
        equal, compared = map(sum, zip(*(agreement(out, ref) for out, ref in zip(run["outputs"], reference))))
        run["tokens_equal"] = equal / compared if compared else None
        run["speedup_tokens_per_s"] = run["tokens_per_s"] / plain["tokens_per_s"]
        run["tpot_ratio"] = run["tpot_ms"] / plain["tpot_ms"]
    for run in runs:
        del run["outputs"]
    return {"model": app.model.name, "engines": engines, "dtype": manifest.dtype, "device": device, "placement": app.server.runtime,
            "exits": list(Exits.of(manifest).layers), "requests": len(requests), "max_tokens": app.bench.speculation.max_tokens,
            "adaptive": app.bench.speculation.adaptive, "git": git_state(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "runs": runs}


def transformers_early_exit(app: BenchApp, manifest: Manifest, requests: list[BenchRequest], exits: Exits, console: Console) -> dict:
    """transformers' generate on the same weights, plain and with assistant_early_exit at each draft
    exit and length, batch 1: mean seconds per new token and whether the tokens equal plain's."""
    try:
        import transformers

        from model.autoglm import materialize, meta_model
        from model.checkpoint import save_glm_checkpoint
        from model.tokenizer import ChatTokenizer
    except ImportError as e:
        return {"skipped": f"transformers is not installed ({e.name}): pip install transformers"}
    try:
        same_weights(manifest, app.model, app.export)
    except BaselineSkipped as e:
        return {"skipped": str(e)}
    transformers.utils.logging.set_verbosity_error()
    dtype = EXPORT_DTYPES[app.export.dtype]
    dev = torch.device(app.export.device if app.export.device != "cuda" or torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="dyngraph-glm-") as tmp:
        ours = materialize(meta_model(app.model), app.export.device, dtype)
        save_glm_checkpoint(ours, tmp)
        del ours
        model = transformers.GlmForCausalLM.from_pretrained(tmp, dtype=dtype).to(dev).eval()
    tokenizer = ChatTokenizer.from_dir(app.model.checkpoint) if app.model.checkpoint else ChatTokenizer.builtin()
    n = app.bench.speculation.max_tokens

    def generate(ids: torch.Tensor, **kw) -> tuple[torch.Tensor, float]:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=0, **kw)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return out[0, ids.shape[1]:], (time.perf_counter() - t0) / n

    prompts = [torch.tensor([tokenizer.apply_chat_template(r.messages())], device=dev) for r in requests]
    generate(prompts[0])  # warm-up
    rows = []
    plain = [generate(ids) for ids in prompts]
    rows.append({"draft_exit": None, "draft_tokens": None, "s_per_token": statistics.fmean(s for _, s in plain), "tokens_equal": 1.0})
    for k in app.bench.speculation.draft_tokens:
        for e in [exits.first if x is None else x for x in app.bench.speculation.draft_exits]:
            got = [generate(ids, assistant_early_exit=e, num_assistant_tokens=k) for ids in prompts]
            equal = sum(int((a == b).sum()) for (a, _), (b, _) in zip(got, plain)) / sum(len(b) for b, _ in plain)
            rows.append({"draft_exit": e, "draft_tokens": k, "s_per_token": statistics.fmean(s for _, s in got), "tokens_equal": equal})
            console.print(f"  transformers assistant_early_exit={e}, {k} tokens: {1000 * rows[-1]['s_per_token']:.2f} ms/token "
                          f"(plain {1000 * rows[0]['s_per_token']:.2f})")
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {"implementation": f"transformers {transformers.__version__} GlmForCausalLM.generate (greedy, batch 1)",
            "device": str(dev), "requests": len(prompts), "rows": rows}


def fmt(value, spec: str, missing: str = "–") -> str:
    return missing if value is None else format(value, spec)


def label(run: dict) -> str:
    quantized = f" {run['draft_quantize']}" if run["draft_quantize"] else ""
    if run["draft_exit"] is None:
        return f"plain full depth (server of draft {run['draft_tokens']}{quantized})"
    return f"draft {run['draft_tokens']}{quantized} at exit {run['draft_exit']}"


def order(run: dict) -> tuple:
    return run["concurrency"], run["draft_exit"] or 0, run["draft_quantize"] or "", run["draft_tokens"]


def render_markdown(report: dict) -> str:
    out = [f"# Self-speculation against plain full depth: {report['model']} on {report['device']}", "",
           f"{report['engines']} ({report['dtype']}), placement {report['placement']}; {report['requests']} text requests of "
           f"{report['max_tokens']} greedy tokens each at every concurrency level; exits {report['exits']}; "
           f"adaptive draft length {'on' if report['adaptive'] else 'off'}; commit {report['git'].get('commit', '?')}.", "",
           "| configuration | concurrency | ms/token | tokens/s | × plain | drafts accepted | tokens per verification | tokens equal to full depth |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    seen = set()
    for run in sorted(report["runs"], key=order):
        key = (run["concurrency"], run["draft_exit"])
        if run["draft_exit"] is None and key in seen:
            continue  # plain runs once per server: one row per concurrency level
        seen.add(key)
        name = "plain full depth" if run["draft_exit"] is None else label(run)  # plain: the first server's
        out.append(f"| {name} | {run['concurrency']} | {run['tpot_ms']:.2f} | {run['tokens_per_s']:.0f} | "
                   f"{run['speedup_tokens_per_s']:.2f} | {fmt(run['acceptance'], '.0%')} | {fmt(run['tokens_per_verification'], '.2f')} | "
                   f"{fmt(run['tokens_equal'], '.1%')} |")
    hf = report.get("transformers")
    if hf:
        out += ["", "## transformers' assistant_early_exit (same weights, batch 1)", ""]
        if "skipped" in hf:
            out.append(f"Skipped: {hf['skipped']}")
        else:
            out += [hf["implementation"] + f", {hf['device']}, {hf['requests']} requests.", "",
                    "| configuration | ms/token | × plain | tokens equal to its plain greedy |", "|---|---:|---:|---:|"]
            base = hf["rows"][0]["s_per_token"]
            for row in hf["rows"]:
                name = "plain generate" if row["draft_exit"] is None else f"draft {row['draft_tokens']} at exit {row['draft_exit']}"
                out.append(f"| {name} | {1000 * row['s_per_token']:.2f} | {base / row['s_per_token']:.2f} | {row['tokens_equal']:.1%} |")
    groups = sorted({g for run in report["runs"] for g in run["acceptance_per_group"]})
    speculative = [r for r in report["runs"] if r["draft_exit"] is not None and r["concurrency"] == min(x["concurrency"] for x in report["runs"])]
    if speculative and len(groups) > 1:
        out += ["", "Drafts accepted per request group, at the lowest concurrency:", "",
                "| configuration | " + " | ".join(groups) + " |", "|---|" + "---:|" * len(groups)]
        for run in sorted(speculative, key=order):
            out.append(f"| {label(run)} | " + " | ".join(fmt(run["acceptance_per_group"].get(g), ".0%") for g in groups) + " |")
    out += ["", "ms/token: the client's mean over requests of (latency − time to first token) / (tokens − 1); tokens/s: all "
            "requests' tokens over the level's wall time; × plain: tokens/s over plain full depth's on the same server and level; "
            "tokens equal: position by position against plain full depth at the lowest concurrency (bench/quality.py).", ""]
    return "\n".join(out)


def print_table(report: dict, console: Console) -> None:
    table = Table(title="self-speculation against plain full depth")
    for col in ("configuration", "c", "ms/token", "tokens/s", "× plain", "accepted", "tokens/verif.", "equal"):
        table.add_column(col, justify="left" if col == "configuration" else "right")
    for run in sorted(report["runs"], key=order):
        table.add_row(label(run), str(run["concurrency"]), f"{run['tpot_ms']:.2f}", f"{run['tokens_per_s']:.0f}",
                      f"{run['speedup_tokens_per_s']:.2f}", fmt(run["acceptance"], ".0%"), fmt(run["tokens_per_verification"], ".2f"),
                      fmt(run["tokens_equal"], ".1%"))
    console.print(table)


def plot(report: dict, path: Path) -> None:
    """Output tokens/s per concurrency level: plain full depth and each speculative configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted({r["concurrency"] for r in report["runs"]})
    series: dict[str, dict[int, float]] = {}
    for run in report["runs"]:
        series.setdefault(label(run), {})[run["concurrency"]] = run["tokens_per_s"]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        ax.bar([j + i * width for j in range(len(levels))], [values.get(c, 0) for c in levels], width, label=name)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(levels))], [f"concurrency {c}" for c in levels])
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"Self-speculation, {report['model']} on {report['device']}: full-depth answers")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
