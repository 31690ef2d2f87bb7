"""`python -m pipeline bench bench=prefix`: the prefix cache off against on, on multi-turn chats
that share one long system prompt.

Two servers, the same but for `runtime.prefix_cache.enabled` (off first, the reference), every
request at one depth (`bench.prefix.exit_layer`, default the full depth; runtime.policy.force_exit).
Each drives the same chats at each concurrency level: `chats` users, each holding a chat of `turns`
turns, every turn's request carrying the system prompt (`system_tokens` tokens of a phone agent's
tool documentation), the chat's earlier user turns, the answers the server returned to them and the
new user turn; greedy, at most `max_tokens` tokens. Turn t of every chat is sent, at most
`concurrency` at a time, before turn t+1 of any. A level's system prompt opens with a session line
of its own: each level starts with none of its prompts cached (its chats share the system prompt
with each other), and so does the first level after the unmeasured warm-up, whose chats have a
session of their own too.

Per server and level: time to first token (mean, p50, p99) of the first turns and of the later
turns, time per output token, and the prompt tokens served from the cache
(`usage.prompt_tokens_details.cached_tokens`, 0 where a server does not say) over all prompt
tokens. Between the servers at each level: the tokens equal, position by position
(bench/quality.py), and the first difference if any (greedy: they must all be equal), and per turn
the time to first token with the cache over without. Beside them the peer (bench/peer.py, ORT
GenAI) at the same depth: its time to first token at each prompt's length (the cache-off server's
prompt tokens at the lowest level), each prompt prefilled whole.

Reports go to `<output_dir>/<date>-<device>-<model>-<backend>[-<quantize>]-prefix/`: prefix.json,
prefix.md, prefix.png and the servers' logs.
"""
from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
import zlib
from dataclasses import replace
from datetime import datetime, timezone
from itertools import zip_longest
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.client import RequestResult, drive
from bench.host import cpu_model, git_state, open_nvml, write_reports
from bench.metrics import fmt_ratio, fmt_s, fmt_share, stats
from bench.peer import PeerSkipped, run_peer
from bench.quality import agreement, token_texts
from bench.run import check_engines, served_tokenizer, yardstick
from bench.server import BenchError, Server
from bench.workload import BenchRequest
from contract.config import BenchApp, PrefixBench
from contract.exits import Exits
from model.tokenizer import ChatTokenizer
from pipeline.console import make_console


def run_prefix(app: BenchApp, server_overrides: list[str], console: Console | None = None) -> Path:
    """Run the comparison; return the report folder."""
    console = console or make_console()
    cfg, seed = app.bench.prefix, app.bench.seed
    engines, manifest = check_engines(app)
    exits = Exits.of(manifest)
    tokenizer = served_tokenizer(app)
    check_settings(cfg, exits, tokenizer, manifest.dims["capacity"]["max"])
    depth = cfg.exit_layer or exits.full
    levels = sorted(set(app.bench.concurrency))
    users = chat_turns(cfg, seed)
    systems = {level: system_prompt(cfg, f"{seed}-c{level}", seed, tokenizer) for level in levels}
    log_dir = Path(tempfile.mkdtemp(prefix="dyngraph-prefix-"))
    console.print(f"[bold]prefix cache[/]: {cfg.chats} chats x {cfg.turns} turns x {cfg.max_tokens} tokens x concurrency {levels}, "
                  f"a system prompt of {len(tokenizer.encode(systems[levels[0]]))} tokens, {depth} layers; engines {engines}")
    runs, gpu_labels = [], set()
    progress = Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, disable=not app.progress)
    with progress:
        for enabled in (False, True):
            name = f"cache {'on' if enabled else 'off'}"
            log_path = log_dir / f"server-{name.replace(' ', '-')}.log"
            overrides = [f"runtime.policy.force_exit={depth}", f"runtime.prefix_cache.enabled={str(enabled).lower()}"]
            task = progress.add_task(f"{name}: starting server", total=None)
            with Server(app, "dynamic", server_overrides + overrides, log_path) as server:
                gpu_labels |= {d for d in server.stats().get("devices") or {} if d.startswith("cuda")}
                warm = users[:max(levels)]
                progress.update(task, description=f"{name}: warm-up", total=len(warm) * cfg.turns, completed=0)
                converse(app, server, system_prompt(cfg, "warm-up", seed, tokenizer), warm, max(levels), lambda: progress.advance(task))
                for level in levels:
                    progress.update(task, description=f"{name} c={level}", total=cfg.chats * cfg.turns, completed=0)
                    t0 = time.perf_counter()
                    turns = converse(app, server, systems[level], users, level, lambda: progress.advance(task))
                    runs.append(summarize(enabled, level, turns, time.perf_counter() - t0))
                    console.print(f"  {name} c={level}: time to first token {fmt_s(runs[-1]['ttft_s']['first_turn']['mean'])} "
                                  f"(turn 1), {fmt_s((runs[-1]['ttft_s']['later_turns'] or {}).get('mean'))} (later turns); "
                                  f"{fmt_share(runs[-1]['cached_share'])} of prompt tokens cached")
            progress.remove_task(task)
    device = sorted(gpu_labels)[0] if gpu_labels else "cpu"
    nvml = open_nvml(app)
    device_name = nvml.info(device).name if nvml is not None and device in nvml.handles else "GPU" if gpu_labels else cpu_model()
    if nvml is not None:
        nvml.close()
    peer = {"skipped": "bench.peer.enabled=false"}
    if app.bench.peer.enabled:
        console.print(f"building and timing the peer (ORT GenAI) on {device}")
        peer_app = replace(app, bench=replace(app.bench, peer=replace(app.bench.peer, layers=app.bench.peer.layers or [depth])))
        peer = yardstick("peer", PeerSkipped, lambda: run_peer(peer_app, manifest, turn_lengths(runs), device, log_dir, console))
    report = build_report(app, manifest.dtype, engines.name, device_name, depth, systems[levels[0]], tokenizer, runs, peer)
    report_dir = write_reports(app, "prefix", device_name, engines.name, log_dir, report, render_markdown(report), lambda path: plot(report, path))
    print_table(report, console)
    console.print(f"report: {report_dir / 'prefix.md'}")
    return report_dir


# --- the workload ---------------------------------------------------------------------------


def check_settings(cfg: PrefixBench, exits: Exits, tokenizer: ChatTokenizer, context: int) -> None:
    """One line naming the first bad bench.prefix setting, before any server starts."""
    if not cfg.tools or not cfg.user_turns:
        raise BenchError("bench.prefix.tools and bench.prefix.user_turns must each list some text")
    if cfg.system_tokens < 1 or cfg.chats < 1 or cfg.turns < 1 or cfg.max_tokens < 2:
        raise BenchError(f"bench.prefix: system_tokens={cfg.system_tokens}, chats={cfg.chats} and turns={cfg.turns} must be at "
                         f"least 1, max_tokens={cfg.max_tokens} at least 2")
    if cfg.exit_layer is not None and cfg.exit_layer not in exits.layers:
        raise BenchError(f"bench.prefix.exit_layer={cfg.exit_layer} is not one of the engines' exits {list(exits.layers)}")
    # the last turn's prompt, its answers counted at max_tokens each, and its own answer must fit the engines' context
    longest = max(cfg.user_turns, key=len)
    messages = [{"role": "system", "content": system_prompt(cfg, "check", 0, tokenizer)}]
    messages += [{"role": "user", "content": longest}, {"role": "assistant", "content": ""}] * (cfg.turns - 1) + [{"role": "user", "content": longest}]
    need = len(tokenizer.apply_chat_template(messages)) + cfg.turns * cfg.max_tokens
    if need > context:
        raise BenchError(f"bench.prefix: a chat's last turn needs about {need} tokens (system_tokens={cfg.system_tokens}, "
                         f"turns={cfg.turns}, max_tokens={cfg.max_tokens}), past the engines' context of {context}")


def system_prompt(cfg: PrefixBench, session: str, seed: int, tokenizer: ChatTokenizer) -> str:
    """The session's line, `intro`, then `tools` in seeded orders until the text holds `system_tokens`
    tokens, cut there. The session line comes first so that different sessions share no cached block."""
    rng = np.random.default_rng([seed, zlib.crc32(session.encode())])
    parts = [f"Session {session}.", cfg.intro.strip()]
    while len(tokenizer.encode("\n\n".join(parts))) < cfg.system_tokens:
        parts += [cfg.tools[i].strip() for i in rng.permutation(len(cfg.tools))]
    # a cut inside a character that spans several tokens decodes to U+FFFD: leave it out
    return tokenizer.decode(tokenizer.encode("\n\n".join(parts))[:cfg.system_tokens]).rstrip("\ufffd")


def chat_turns(cfg: PrefixBench, seed: int) -> list[list[str]]:
    """Per chat, its user turns: consecutive entries of `user_turns` from a start drawn per chat
    (distinct starts while there are entries enough), the same at every level."""
    n = len(cfg.user_turns)
    starts = np.random.default_rng([seed, zlib.crc32(b"prefix-chats")]).permutation(max(n, cfg.chats)) % n
    return [[cfg.user_turns[(int(s) + t) % n] for t in range(cfg.turns)] for s in starts[:cfg.chats]]


def converse(app: BenchApp, server: Server, system: str, users: list[list[str]], concurrency: int, advance) -> list[list[RequestResult]]:
    """Every chat through its turns, turn by turn, at most `concurrency` requests at a time; the results per turn, per chat."""
    cfg = app.bench.prefix
    histories = [[{"role": "system", "content": system}] for _ in users]
    turns = []
    for t in range(len(users[0])):
        requests = [BenchRequest(c, f"turn {t + 1}", ("text",), chat[t], cfg.max_tokens) for c, chat in enumerate(users)]
        for history, request in zip(histories, requests):
            history.append({"role": "user", "content": request.prompt})
        bodies = [r.body(server.model_id, 0.0, app.bench.seed) | {"messages": list(h)} for r, h in zip(requests, histories)]
        results = asyncio.run(drive(server.url, requests, bodies, "dynamic", concurrency, [0.0] * len(requests),
                                    app.bench.request_timeout_s, lambda _: advance()))
        failed = [r for r in results if not r.ok]
        if failed:
            raise BenchError(f"turn {t + 1} of chat {failed[0].index} failed: {failed[0].error} (log: {server.log_path})")
        for history, result in zip(histories, results):
            history.append({"role": "assistant", "content": "".join(result.tokens)})
        turns.append(results)
    return turns


# --- figures ---------------------------------------------------------------------------------


def summarize(enabled: bool, concurrency: int, turns: list[list[RequestResult]], wall: float) -> dict:
    def cached(results: list[RequestResult]) -> dict:
        prompt, hit = sum(r.prompt_tokens or 0 for r in results), sum(r.cached_tokens for r in results)
        return {"prompt_tokens": prompt, "cached_tokens": hit, "cached_share": hit / prompt if prompt else None}

    flat = [r for turn in turns for r in turn]
    return {"prefix_cache": enabled, "concurrency": concurrency, "wall_s": wall,
            "ttft_s": {"first_turn": stats([r.ttft_s for r in turns[0]]), "later_turns": stats([r.ttft_s for turn in turns[1:] for r in turn])},
            "tpot_s": stats([r.tpot_s for r in flat]), "completion_tokens": sum(r.completion_tokens or 0 for r in flat), **cached(flat),
            "turns": [{"turn": t + 1, "ttft_s": stats([r.ttft_s for r in turn]), **cached(turn)} for t, turn in enumerate(turns)],
            "requests": [{"chat": r.index, "turn": t + 1, "prompt_tokens": r.prompt_tokens, "cached_tokens": r.cached_tokens,
                          "completion_tokens": r.completion_tokens, "ttft_s": r.ttft_s, "tpot_s": r.tpot_s, "tokens": r.tokens}
                         for t, turn in enumerate(turns) for r in turn]}


def compare(off: dict, on: dict) -> dict:
    """The cache-on run against the cache-off run of one level: tokens equal, the first difference,
    and time to first token on over off, per turn."""
    equal = compared = 0
    first = None
    for a, b in zip(off["requests"], on["requests"]):  # the same order: turn by turn, chat by chat
        same, n = agreement(b["tokens"], a["tokens"])
        equal, compared = equal + same, compared + n
        if first is None and same < n:
            pairs = list(zip_longest(token_texts(a["tokens"]), token_texts(b["tokens"])))
            position = next(i for i, (x, y) in enumerate(pairs) if x != y)
            first = {"chat": a["chat"], "turn": a["turn"], "position": position, "cache_off": pairs[position][0], "cache_on": pairs[position][1]}

    def ratio(x: dict | None, y: dict | None) -> float | None:
        return y["mean"] / x["mean"] if x and y and x["mean"] else None

    return {"concurrency": off["concurrency"], "tokens_equal": equal, "tokens_compared": compared, "identical": equal == compared,
            "first_mismatch": first, "prompts_equal": all(a["prompt_tokens"] == b["prompt_tokens"] for a, b in zip(off["requests"], on["requests"])),
            "ttft_ratio": {"first_turn": ratio(off["ttft_s"]["first_turn"], on["ttft_s"]["first_turn"]),
                           "later_turns": ratio(off["ttft_s"]["later_turns"], on["ttft_s"]["later_turns"]),
                           "per_turn": [ratio(x["ttft_s"], y["ttft_s"]) for x, y in zip(off["turns"], on["turns"])]}}


def turn_lengths(runs: list[dict]) -> dict[str, list[int]]:
    """The cache-off server's prompt tokens at the lowest level, per turn: the lengths the peer prefills."""
    reference = min((r for r in runs if not r["prefix_cache"]), key=lambda r: r["concurrency"])
    groups: dict[str, list[int]] = {}
    for r in reference["requests"]:
        groups.setdefault(f"turn {r['turn']}", []).append(r["prompt_tokens"])
    return groups


def peer_per_turn(peer: dict, depth: int) -> dict:
    """The peer's mean time to first token per turn, at our depth (its first run: CUDA graphs where it captured them)."""
    if "skipped" in peer:
        return {"skipped": peer["skipped"]}
    runs = [r for d in peer["depths"] if d["layers"] == depth and "skipped" not in d for r in d["runs"] if "skipped" not in r]
    if not runs:
        return {"skipped": f"the peer has no figure at {depth} layers (bench.peer.layers={[d['layers'] for d in peer['depths']]})"}
    ttft = {p["prompt_tokens"]: p["ttft_s"] for p in runs[0]["prefill"]}
    return {"layers": depth, "cuda_graph": runs[0]["cuda_graph"],
            "ttft_s": [statistics.fmean(ttft[n] for n in lengths) for lengths in peer["prompt_lengths"].values()]}


def build_report(app: BenchApp, dtype: str, engines: str, device: str, depth: int, system: str, tokenizer: ChatTokenizer,
                 runs: list[dict], peer: dict) -> dict:
    cfg = app.bench.prefix
    offs = {r["concurrency"]: r for r in runs if not r["prefix_cache"]}
    comparisons = [compare(offs[r["concurrency"]], r) for r in runs if r["prefix_cache"]]
    shared = len(tokenizer.apply_chat_template([{"role": "system", "content": system}], add_generation_prompt=False))
    return {"model": app.model.name, "engines": engines, "dtype": dtype, "device": device, "placement": app.server.runtime,
            "layers": depth, "system_tokens": len(tokenizer.encode(system)), "shared_prefix_tokens": shared, "chats": cfg.chats,
            "turns": cfg.turns, "max_tokens": cfg.max_tokens, "server_args": list(app.server.args), "git": git_state(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "runs": runs, "comparisons": comparisons,
            "peer_per_turn": peer_per_turn(peer, depth), "peer": peer}


# --- reports ---------------------------------------------------------------------------------


def ttft_cell(s: dict | None) -> str:
    return "n/a" if s is None else " / ".join(f"{1e3 * s[k]:.1f}" for k in ("mean", "p50", "p99"))


def rows(report: dict) -> list[list[str]]:
    """The main table's cells, one row per level and configuration."""
    equal = {c["concurrency"]: c for c in report["comparisons"]}
    out = []
    for run in sorted(report["runs"], key=lambda r: (r["concurrency"], r["prefix_cache"])):
        c = equal[run["concurrency"]]
        out.append(["on" if run["prefix_cache"] else "off", str(run["concurrency"]), ttft_cell(run["ttft_s"]["first_turn"]),
                    ttft_cell(run["ttft_s"]["later_turns"]), fmt_ratio(1e3 * run["tpot_s"]["mean"] if run["tpot_s"] else None),
                    f"{run['cached_tokens']:,} / {run['prompt_tokens']:,} ({fmt_share(run['cached_share'])})",
                    f"{c['tokens_equal']:,} / {c['tokens_compared']:,}" if run["prefix_cache"] else "reference"])
    return out


COLUMNS = ("prefix cache", "concurrency", "TTFT turn 1, ms (mean / p50 / p99)", "TTFT later turns, ms (mean / p50 / p99)",
           "ms/token", "cached / prompt tokens", "tokens equal to cache off")


def render_markdown(report: dict) -> str:
    peer = report["peer_per_turn"]
    out = [f"# Prefix cache off against on: {report['model']} on {report['device']}", "",
           f"{report['engines']} ({report['dtype']}), placement {report['placement']}, every request at {report['layers']} layers; "
           f"{report['chats']} chats of {report['turns']} turns sharing a system prompt of {report['system_tokens']} tokens "
           f"({report['shared_prefix_tokens']} with the chat template's opening), answers of at most {report['max_tokens']} greedy "
           f"tokens; server args {report['server_args'] or 'none'}; commit {report['git'].get('commit', '?')}.", "",
           "| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
    out += ["| " + " | ".join(row) + " |" for row in rows(report)]
    out += ["", "## Time to first token per turn", "",
            "| concurrency | turn | cache off, ms | cache on, ms | on / off | cached share (on) | ORT GenAI, ms |",
            "|---:|---:|---:|---:|---:|---:|---:|"]
    for c in report["comparisons"]:
        off, on = (next(r for r in report["runs"] if r["concurrency"] == c["concurrency"] and r["prefix_cache"] == x) for x in (False, True))
        for t, (a, b, ratio) in enumerate(zip(off["turns"], on["turns"], c["ttft_ratio"]["per_turn"])):
            theirs = f"{1e3 * peer['ttft_s'][t]:.1f}" if "ttft_s" in peer and c["concurrency"] == report["comparisons"][0]["concurrency"] else "–"
            out.append(f"| {c['concurrency']} | {t + 1} | {1e3 * a['ttft_s']['mean']:.1f} | {1e3 * b['ttft_s']['mean']:.1f} | "
                       f"{fmt_ratio(ratio)} | {fmt_share(b['cached_share'])} | {theirs} |")
    out += [""]
    for c in report["comparisons"]:
        line = f"- Concurrency {c['concurrency']}: {c['tokens_equal']:,} of {c['tokens_compared']:,} tokens equal between cache on and off"
        m = c["first_mismatch"]
        out.append(line + (f"; the first difference: chat {m['chat']}, turn {m['turn']}, token {m['position']}: "
                           f"{m['cache_off']!r} without the cache, {m['cache_on']!r} with it." if m else "."))
    out.append("- ORT GenAI: " + (f"not run: {peer['skipped']}." if "skipped" in peer else
               f"{report['peer']['implementation']}, {peer['layers']} layers{', CUDA graphs' if peer['cuda_graph'] else ''}: each "
               "prompt (the cache-off server's prompt tokens at the lowest level) prefilled whole; it keeps nothing between requests."))
    out += ["", "TTFT: the client's time to the first generated token; ms/token: (latency − TTFT) / (tokens − 1), the mean over "
            "requests; cached: the prompt tokens the server reports served from its prefix cache (usage.prompt_tokens_details."
            "cached_tokens; 0 where it reports none). Each level starts with none of its prompts cached (its own session line "
            "opens the system prompt). Tokens equal: position by position, cache on against off at the same level (bench/quality.py).", ""]
    return "\n".join(out)


def print_table(report: dict, console: Console) -> None:
    table = Table(title="prefix cache off against on")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col == "prefix cache" else "right")
    for row in rows(report):
        table.add_row(*row)
    console.print(table)


def plot(report: dict, path: Path) -> None:
    """Mean time to first token per turn: cache off and on at each concurrency level, and the peer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    turns = list(range(1, report["turns"] + 1))
    levels = sorted({r["concurrency"] for r in report["runs"]})
    for run in sorted(report["runs"], key=lambda r: (r["concurrency"], r["prefix_cache"])):
        ax.plot(turns, [1e3 * t["ttft_s"]["mean"] for t in run["turns"]], marker="o", color=f"C{levels.index(run['concurrency'])}",
                linestyle="-" if run["prefix_cache"] else "--", label=f"cache {'on' if run['prefix_cache'] else 'off'}, concurrency {run['concurrency']}")
    peer = report["peer_per_turn"]
    if "ttft_s" in peer:
        ax.plot(turns, [1e3 * t for t in peer["ttft_s"]], marker="s", color="black", linestyle=":", label=f"ORT GenAI, {peer['layers']} layers")
    ax.set_xticks(turns)
    ax.set_xlabel("turn")
    ax.set_ylabel("time to first token, ms (mean)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Prefix cache off and on, {report['model']}: a {report['system_tokens']}-token system prompt", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
