"""A calibration's report.md and its console summary, rendered from report.json's dict."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from contract.config import CalibrateApp
from model.exits import EXITS_DIR, EXITS_NAME, ExitsInfo
from runtime.policy import DEFAULT_CONFIDENCE


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def fmt_pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def shares_text(shares: dict) -> str:
    return ", ".join(f"{e}: {fmt_pct(s)}" for e, s in shares.items())


def render_markdown(report: dict, plots: list[str]) -> str:
    m, c, t = report["model"], report["corpus"], report["training"]
    cfg = report["config"]
    out = [f"# dyngraph calibration: {m['name']} exits {m['exit_layers'][:-1]}", ""]
    out += [f"{report['created']}; {report['device']['dtype']} on {report['device']['name']} ({report['device']['device']}); "
            f"weights {m['checkpoint'] or 'random (seed ' + str(m['base_weights']['seed']) + ')'}; adapter rank {m['adapter_rank']}; "
            f"KL(full depth || exit) over the {m['decodable_ids']} decodable ids.", ""]
    out += [f"Corpus `{c['directory']}`: {c['files']} file(s), {c['documents']} documents ({c['chats_with_reply']} chats with a reply), "
            f"sha256 `{c['sha256'][:16]}`; {c['train_tokens']:,} training tokens ({c['train_documents']} documents), "
            f"{c['heldout_tokens']:,} held-out ({c['heldout_documents']}). Training: {t['steps']} steps of {t['batch_tokens']} positions "
            f"in {t['seconds']:.1f} s ({t['tokens_per_s']:,.0f} positions/s), stopped by {t['stopped_by']}.", ""]
    out += ["## Per exit, on held-out text", ""]
    rows = []
    for e in report["exits"]:
        b, a, at = e["heldout"]["before"], e["heldout"]["after"], e["at_threshold"]
        rows.append(f"| {e['exit_layer']} | {b['kl']:.4f} | {a['kl']:.4f} | {fmt_pct(b['agreement'])} | {fmt_pct(a['agreement'])} | "
                    f"{fmt(e['threshold'], '.4g')} | {fmt_pct(at['exit_rate'])} | {fmt_pct(at['agreement'])} | {fmt(e['threshold_before'], '.4g')} |")
    out += ["| exit | KL before | KL after | top-1 agreement before | after | threshold | exit rate there | agreement there | threshold before |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *rows, ""]
    out += [f"Threshold: the lowest top-1 probability at which this exit, and every higher threshold that at least "
            f"{fmt_pct(cfg['min_exit_rate'])} of the positions reach, agrees with full depth on >= {fmt_pct(cfg['target_agreement'])} "
            "of the positions it lets exit (n/a: none does, the exit is never taken). \"Before\": the uncalibrated heads.", ""]
    ca, cb = report["cascade"]["after"], report["cascade"]["before"]
    out += ["## The confidence policy over the held-out positions", "",
            "| heads, thresholds | exit share | agreement with full depth | mean layers |", "|---|---|---:|---:|",
            f"| calibrated, calibrated | {shares_text(ca['exit_share'])} | {fmt_pct(ca['agreement'])} | {ca['mean_layers']:.1f} |",
            f"| uncalibrated, {DEFAULT_CONFIDENCE} (the runtime's default) | {shares_text(cb['exit_share'])} | {fmt_pct(cb['agreement'])} | {cb['mean_layers']:.1f} |", ""]
    mix = report.get("mix") or {}
    if "exit_share" in mix:
        out += [f"## The bench's `{mix['bench']}` mix ({mix['text_requests']} text requests)", "",
                f"Where the confidence policy sends them: calibrated {shares_text(mix['exit_share']['after'])}; "
                f"uncalibrated at {DEFAULT_CONFIDENCE}: {shares_text(mix['exit_share']['before'])}. {mix['note']}.", ""]
    chats = report.get("chats") or {}
    if "heuristic_fit" in chats:
        h = chats["heuristic_fit"]
        out += [f"## Held-out chats as requests ({chats['requests']})", "",
                f"The confidence policy, deciding at the prompt's last token as the runtime does: {shares_text(chats['confidence_policy']['exit_share'])}, "
                f"reply agreement with full depth {fmt_pct(chats['confidence_policy']['reply_agreement'])}. Reply agreement if every request "
                f"exited at one exit: {shares_text(chats['reply_agreement_per_exit'])}.", "",
                f"Heuristic policy fitted to them: `{h['override']}` ({h['method']}).", ""]
    elif chats.get("skipped"):
        out += [f"Request view and heuristic fit skipped: {chats['skipped']}.", ""]
    f = report["file"]
    out += ["## Output", "", f"`{f['name']}` ({f['bytes']:,} bytes), sha256 `{f['sha256']}`; thresholds in its metadata.", ""]
    out += [f"![{p}]({p})" for p in plots]
    return "\n".join(out) + "\n"


def print_summary(report: dict, info: ExitsInfo, app: CalibrateApp, console: Console) -> None:
    table = Table(title=f"exits calibrated into {info.path}", title_justify="left")
    for col in ("exit", "KL before", "KL after", "agree before", "agree after", "threshold", "exit rate"):
        table.add_column(col, justify="right")
    for e in report["exits"]:
        b, a = e["heldout"]["before"], e["heldout"]["after"]
        table.add_row(str(e["exit_layer"]), f"{b['kl']:.4f}", f"{a['kl']:.4f}", fmt_pct(b["agreement"]), fmt_pct(a["agreement"]),
                      fmt(e["threshold"], ".4g"), fmt_pct(e["at_threshold"]["exit_rate"]))
    console.print(table)
    found = app.model.checkpoint and info.path == (Path(app.model.checkpoint).expanduser() / EXITS_DIR / EXITS_NAME).resolve()
    where = f"model.checkpoint={app.model.checkpoint}" if found else f"model.exits={info.path}"
    rank = f" model.text.exit_adapter_rank={app.model.text.exit_adapter_rank}" if app.model.text.exit_adapter_rank else ""
    console.print(f"sha256 {info.sha256}; export with: python -m pipeline export model={app.model.name} {where}{rank}; "
                  f"serve with the same overrides and runtime.policy.name=confidence")
