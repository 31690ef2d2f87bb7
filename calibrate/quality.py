"""Quality per exit on held-out text, for models trained with their exits (calibrate/train.py).

Every exit of the model reads the same held-out windows in one pass (teacher-forced: each position
sees the true text before it), and each exit gets:

- loss: cross-entropy of the next token over the model's whole vocabulary (what training minimises);
- next-token accuracy: its top-1 equals the text's next token;
- agreement: its top-1 equals full depth's (the token the static graph would emit);
- per confidence threshold (top-1 probability over the decodable ids, as the runtime's confidence
  policy computes it): the share of positions at or above it (coverage), their agreement and accuracy;
- the mean accepted run of a k-token self-speculative draft: drafting k tokens from this exit and
  verifying them at full depth accepts the longest prefix that agrees, so from each position i the
  run is the number of consecutive agreeing positions i, i+1, ... up to k. Teacher-forced, it
  estimates what greedy self-speculation would accept (the draft's own tokens are not fed back);
- the calibrated threshold: calibrate/run.py's rule (CALM's fixed-sequence test on point estimates)
  on this exit's confidence and agreement, the one the heads mode uses.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from calibrate.metrics import agreement_curve, at_threshold, choose_threshold, curve_points
from calibrate.plots import save
from calibrate.report import fmt, fmt_pct


@dataclass
class Predictions:
    """Per exit (full depth last), at every held-out position: [E, N, S]."""

    loss: np.ndarray  # float32, nats
    top1: np.ndarray  # int64, over the decodable ids
    confidence: np.ndarray  # float32, the top-1 probability over the decodable ids
    target: np.ndarray  # [N, S] the text's next tokens


@torch.no_grad()
def predict(exit_hidden, lm_head: torch.nn.Module, windows: torch.Tensor, decodable: int, batch: int, device, autocast) -> Predictions:
    """windows [N, S + 1] token ids; exit_hidden(ids [B, S]) -> per exit the LM head's input [B, S, D]."""
    losses, tops, confs = [], [], []
    for a in range(0, windows.shape[0], batch):
        w = windows[a:a + batch].to(device).long()
        ids, target = w[:, :-1], w[:, 1:]  # [B, S] each
        with autocast() if autocast else nullcontext():
            hs = exit_hidden(ids)
        step_loss, step_top, step_conf = [], [], []
        for h in hs:
            logits = lm_head(h).float()  # [B, S, V]
            step_loss.append(F.cross_entropy(logits.transpose(1, 2), target, reduction="none"))  # [B, S]
            best, arg = logits[..., :decodable].softmax(-1).max(-1)  # [B, S] each
            step_top.append(arg)
            step_conf.append(best)
        losses.append(torch.stack(step_loss).cpu())
        tops.append(torch.stack(step_top).cpu())
        confs.append(torch.stack(step_conf).cpu())
    return Predictions(torch.cat(losses, 1).numpy(), torch.cat(tops, 1).numpy(), torch.cat(confs, 1).numpy(), windows[:, 1:].long().numpy())


def mean_accepted(agree: np.ndarray, k: int) -> float | None:
    """Mean over start positions i of the run of consecutive agreeing positions from i, at most k: agree [N, S]."""
    n, s = agree.shape
    if s <= k:
        return None
    run = np.ones((n, s - k), dtype=bool)
    total = np.zeros((n, s - k))
    for j in range(k):
        run &= agree[:, j:s - k + j]
        total += run
    return float(total.mean())


def exit_quality(pred: Predictions, exit_layers: list[int], confidences: list[float], draft_tokens: list[int], target_agreement: float,
                 min_exit_rate: float, with_curves: bool = True) -> list[dict]:
    """One record per exit (full depth last): the figures above and, before full depth, the calibrated threshold."""
    full = pred.top1[-1]
    out = []
    for k, layer in enumerate(exit_layers):
        correct = pred.top1[k] == pred.target
        conf = pred.confidence[k]
        e = {"exit_layer": layer, "loss": float(pred.loss[k].mean()), "next_token_accuracy": float(correct.mean())}
        if k == len(exit_layers) - 1:
            e["by_confidence"] = {str(t): {"coverage": float((conf >= t).mean()),
                                           "accuracy": float(correct[conf >= t].mean()) if (conf >= t).any() else None} for t in confidences}
            out.append(e)
            continue
        agree = pred.top1[k] == full
        e["agreement"] = float(agree.mean())
        e["by_confidence"] = {str(t): {"coverage": float((conf >= t).mean()),
                                       "agreement": float(agree[conf >= t].mean()) if (conf >= t).any() else None,
                                       "accuracy": float(correct[conf >= t].mean()) if (conf >= t).any() else None} for t in confidences}
        e["draft_mean_accepted"] = {str(n): mean_accepted(agree, n) for n in draft_tokens}
        curve = agreement_curve(conf.ravel().astype(np.float64), agree.ravel())
        t = choose_threshold(*curve, target_agreement, min_exit_rate)
        e["threshold"] = t
        e["at_threshold"] = at_threshold(conf.ravel(), agree.ravel(), t)
        if with_curves:
            e["curve"] = curve_points(curve)
        out.append(e)
    return out


# --- report ---------------------------------------------------------------------------------


def render_markdown(report: dict, plots: list[str]) -> str:
    m, c, t, r = report["model"], report["corpus"], report["training"], report["recipe"]
    out = [f"# dyngraph exit training: {m['name']} ({m['parameters'] / 1e6:.1f} M decoder parameters), exits {m['exit_layers']}", ""]
    start = f"continual training of `{m['start']}`" if m["start"] != "random" else f"pre-training from random weights (seed {m['seed']})"
    out += [f"{report['created']}; {start}; {report['device']['dtype']} on {report['device']['name']} ({report['device']['device']}, torch "
            f"{report['device']['torch']}).", ""]
    out += [f"Corpus `{c['directory']}` (sha256 `{c['sha256'][:16]}`): {c['train_tokens']:,} training tokens in {c['train_documents']} documents; "
            f"held out: `{c['heldout']}`, {c['heldout_documents']} documents, {c['heldout_positions']:,} positions evaluated "
            f"({c['heldout_windows']} windows of {c['seq_len']}). Tokenizer `{m['tokenizer']}` ({m['decodable_ids']} ids).", ""]
    out += [f"Training: {t['steps']} steps of {t['batch_tokens']:,} tokens ({t['tokens']:,} tokens) in {t['seconds']:.1f} s, "
            f"{t['tokens_per_s']:,.0f} tokens/s, stopped by {t['stopped_by']}" + (f", resumed {t['sessions'] - 1} time(s)" if t["sessions"] > 1 else "") + ".", ""]
    weights = ", ".join(f"{e}: {w:.3g}" for e, w in zip(m["exit_layers"], r["exit_weights"]))
    out += [f"Recipe (LayerSkip): early-exit loss {'on' if r['early_exit_loss'] else 'off (full depth only)'}, per-exit scales {weights} "
            f"({r['weights_from']}); curriculum {r['curriculum']}; layer dropout p_max {r['layer_dropout']} rising with depth"
            f"{' and with time' if r['dropout_time_ramp'] else ''}; AdamW lr {r['lr']}, betas {r['betas']}, weight decay {r['weight_decay']}.", ""]
    out += ["## Per exit, on held-out text", ""]
    ks = report["config"]["train"]["draft_tokens"]
    out += ["| exit | loss before | loss after | next-token accuracy | agreement with full depth | "
            + " | ".join(f"mean accepted, {k}-token draft" for k in ks) + " | threshold | coverage there | agreement there |",
            "|---:|---:|---:|---:|---:|" + "---:|" * len(ks) + "---:|---:|---:|"]
    for b, a in zip(report["before"]["exits"], report["after"]["exits"]):
        last = "threshold" not in a
        draft = " | ".join("—" if last else fmt(a["draft_mean_accepted"][str(k)], ".2f") for k in ks)
        at = a.get("at_threshold") or {}
        out.append(f"| {a['exit_layer']} | {b['loss']:.3f} | {a['loss']:.3f} | {fmt_pct(a['next_token_accuracy'])} | "
                   f"{'—' if last else fmt_pct(a['agreement'])} | {draft} | {'—' if last else fmt(a['threshold'], '.4g')} | "
                   f"{'—' if last else fmt_pct(at.get('exit_rate'))} | {'—' if last else fmt_pct(at.get('agreement'))} |")
    target = report["config"]["target_agreement"]
    out += ["", f"Threshold: calibrate/run.py's rule, the lowest top-1 probability at which this exit, and every higher threshold "
            f"that at least {fmt_pct(report['config']['min_exit_rate'])} of the positions reach, agrees with full depth on >= "
            f"{fmt_pct(target)} of the positions it lets exit (n/a: none does). Mean accepted: teacher-forced estimate (module docstring).", ""]
    out += ["## Coverage and agreement per confidence threshold", "",
            "| exit | " + " | ".join(f"≥ {t}: coverage, agreement" for t in report["config"]["train"]["confidences"]) + " |",
            "|---:|" + "---|" * len(report["config"]["train"]["confidences"])]
    for a in report["after"]["exits"]:
        cells = []
        for t, v in a["by_confidence"].items():
            second = v.get("agreement", v.get("accuracy"))
            cells.append(f"{fmt_pct(v['coverage'])}, {fmt_pct(second)}")
        out.append(f"| {a['exit_layer']} | " + " | ".join(cells) + " |")
    out += ["", "(Full depth: coverage and next-token accuracy.)", ""]
    f = report["files"]
    out += ["## Output", "", f"`{f['checkpoint']}`: a Hugging Face GLM checkpoint (sha256 of config.json and shards `{f['fingerprint'][:16]}`); "
            f"`exits/{f['exits']['name']}` holds the earlier exits' heads and thresholds (sha256 `{f['exits']['sha256'][:16]}`), found by "
            "`model.exits=auto`.", ""]
    out += [f"![{p}]({p})" for p in plots]
    return "\n".join(out) + "\n"


def write_plots(report: dict, losses: dict[str, list[float | None]], directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = []
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for k, (b, a) in enumerate(zip(report["before"]["exits"], report["after"]["exits"])):
        color = colors[k % len(colors)]
        values = np.array([np.nan if v is None else v for v in losses[str(a["exit_layer"])]], dtype=float)
        steps = np.nonzero(~np.isnan(values))[0]
        if len(steps):
            window = max(1, len(steps) // 50)
            smooth = np.convolve(values[steps], np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1:] + 1, smooth, color=color, label=f"exit {a['exit_layer']} (training batches)")
        ax.axhline(a["loss"], color=color, ls="--", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy, nats")
    ax.set_title("training loss per exit; held-out after training (dashed)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    written.append(save(fig, plt, directory / "training.png"))

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for k, a in enumerate(report["after"]["exits"][:-1]):
        color = colors[k % len(colors)]
        ax.plot(a["curve"]["exit_rate"], a["curve"]["agreement"], color=color, label=f"exit {a['exit_layer']}")
        if a["threshold"] is not None:
            ax.plot([a["at_threshold"]["exit_rate"]], [a["at_threshold"]["agreement"]], "o", color=color)
    ax.axhline(report["config"]["target_agreement"], color="grey", ls="--", lw=1, label="target")
    ax.set_xlabel("coverage (share of held-out positions at or above the threshold)")
    ax.set_ylabel("top-1 agreement with full depth")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{report['model']['name']}: held-out agreement per exit (dots: calibrated thresholds)", fontsize=10)
    written.append(save(fig, plt, directory / "agreement.png"))
    return written
