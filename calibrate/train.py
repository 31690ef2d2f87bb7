"""`python -m pipeline calibrate calibrate.mode=model`: the whole decoder trained for its exits.

LayerSkip's recipe (the formulas and settings are contract.config.ExitTraining's): the
cross-entropy of every exit through the one shared LM head, weighted per exit and scheduled by a
curriculum, and layer dropout that rises with depth (and, from scratch, with time). With
model.checkpoint this is continual training of that checkpoint; without one, pre-training of
model.text from model.seed's random weights. The vision and audio encoders and the
cross-attention are not trained (text only) and not written.

Output, a Hugging Face GLM checkpoint folder that `model.checkpoint=` loads like any other:
  config.json, model.safetensors   model/checkpoint.py's writer: the full-depth decoder
  tokenizer.json                   the tokenizer trained with (GLM-4's chat specials checked on load)
  exits/exits.safetensors          the earlier exits' norms (and adapters), trained with the decoder,
                                   and their thresholds calibrated on held-out text; model.exits=auto finds it
  report.md, report.json, training.png, agreement.png   quality per exit (calibrate/quality.py)
everything written into a staging folder beside it and renamed into place at the end. The run's
state (safetensors + JSON) is saved as it goes, and the same command resumes from it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import time
import uuid
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.autoglm import build_model
from model.checkpoint import CheckpointError, checkpoint_fingerprint, save_glm_checkpoint
from model.exits import EXITS_DIR, EXITS_NAME, exit_parameters, save_exits
from model.glm import Attention, Transformer, apply_rope, rope_tables
from contract.config import CalibrateApp
from contract.manifest import write_atomic
from pipeline.console import make_console
from pipeline.export import ExportError, check_writable
from calibrate.quality import exit_quality, predict, render_markdown, write_plots
from calibrate.report import fmt, fmt_pct
from calibrate.run import CalibrateError, check_request, device_name, load_tokenizer, read_corpus, split_documents

REPORT_KIND = "dyngraph-exit-training-report"
SCHEMA_VERSION = 1
CURRICULA = ("none", "rotational", "gradual")
STATE_FORMAT = "dyngraph-train-state"
FLUSH_EVERY = 20  # steps between reading the losses back (a device sync) for the progress bar and the curves


# --- the model's forward for training ---------------------------------------------------------


def attention(a: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """model/glm.py's Attention over a whole window with no cache: SDPA's causal kernel instead of
    the runtime's additive mask (the same result; tests/test_train.py checks it against AutoGLM.forward)."""
    b, s, _ = x.shape
    q = a.q_proj(x).view(b, s, a.n_heads, a.head_dim).transpose(1, 2)  # [B, H, S, hd]
    k = a.k_proj(x).view(b, s, a.n_kv_heads, a.head_dim).transpose(1, 2)  # [B, Hkv, S, hd]
    v = a.v_proj(x).view(b, s, a.n_kv_heads, a.head_dim).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # [B, H, S, hd]
    return a.o_proj(out.transpose(1, 2).reshape(b, s, a.n_heads * a.head_dim))  # [B, S, D]


def exit_hidden(text: Transformer, ids: torch.Tensor, keep: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """[B, S] -> per exit (full depth last) what the shared LM head reads there, [B, S, D].

    keep [n_layers, B] (layer dropout): 0 skips that layer for that sample, both of its residual
    branches, as LayerSkip drops a layer. The residual stream stays float32 under autocast."""
    b, s = ids.shape
    h = text.embed_tokens(ids)  # [B, S, D]
    position_ids = torch.arange(s, device=ids.device).expand(b, s)
    cos, sin = rope_tables(text.args, position_ids, dtype)  # [B, 1, S, rot]
    outs, i = [], 0
    for segment in text.segments:
        for layer in segment.layers:
            m = None if keep is None else keep[i].view(b, 1, 1)
            a = attention(layer.self_attn, layer.input_layernorm(h), cos, sin)
            h = h + (a if m is None else m * a)
            f = layer.mlp(layer.post_attention_layernorm(h))
            h = h + (f if m is None else m * f)
            i += 1
        outs.append(segment.exit(h))
    return outs


# --- the recipe -------------------------------------------------------------------------------


def exit_weights(app: CalibrateApp) -> tuple[list[float], str]:
    """Per exit, full depth last: the configured scales, else LayerSkip's sum_l rule."""
    t, args = app.calibrate.train, app.model.text
    if t.exit_weights:
        return [float(w) for w in t.exit_weights], "calibrate.train.exit_weights"
    n = args.n_layers

    def e(layer: int) -> float:  # layer: 0-based index of the layer the exit follows
        return t.exit_scale * layer * (layer + 1) / 2 if layer < n - 1 else (n - 1) + t.exit_scale * (n - 2) * (n - 1) / 2

    return [e(x - 1) for x in args.exit_layers], f"LayerSkip's sum_l rule, exit_scale {t.exit_scale}"


def enabled_exits(app: CalibrateApp, step: int, progress: float) -> list[bool]:
    """Which exits' losses count at this step (full depth always does)."""
    t, exits = app.calibrate.train, list(app.model.text.exit_layers)
    n = app.model.text.n_layers
    if not t.early_exit_loss:
        early = [False] * (len(exits) - 1)
    elif t.curriculum == "rotational":
        early = [step % t.rotation == k % t.rotation for k in range(len(exits) - 1)]
    elif t.curriculum == "gradual":
        # LayerSkip's C_grad: layer index l counts once l > (1 - t / T_C) (L - 1), from the deepest down
        f = min(1.0, progress / t.gradual_fraction) if t.gradual_fraction > 0 else 1.0
        early = [(x - 1) > (1 - f) * (n - 1) for x in exits[:-1]]
    else:
        early = [True] * (len(exits) - 1)
    return early + [True]


def dropout_rates(app: CalibrateApp, progress: float, from_scratch: bool) -> torch.Tensor | None:
    """p(l, t) = S(t) * D(l) * p_max per layer, [n_layers]; None when layer dropout is off."""
    t, n = app.calibrate.train, app.model.text.n_layers
    if t.layer_dropout <= 0:
        return None
    ramp = from_scratch if t.dropout_time_ramp is None else t.dropout_time_ramp
    s = 2.0 ** progress - 1.0 if ramp else 1.0
    d = 2.0 ** (torch.arange(n, dtype=torch.float64) / max(1, n - 1)) - 1.0
    return (s * d * t.layer_dropout).float()


def learning_rate(app: CalibrateApp, step: int, progress: float) -> float:
    c = app.calibrate
    warmup = max(1, c.warmup_steps)
    r = c.train.min_lr_ratio
    return c.lr * min(1.0, (step + 1) / warmup) * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def training_progress(app: CalibrateApp, step: int, seconds: float) -> float:
    """Share of the budget spent: of max_steps or of max_minutes, whichever ends first."""
    c = app.calibrate
    return max(step / c.max_steps if c.max_steps else 0.0, seconds / (60 * c.max_minutes) if c.max_minutes else 0.0)


# --- data -------------------------------------------------------------------------------------


def token_stream(documents, eos: int, budget: int) -> torch.Tensor:
    """The documents' ids end to end, each closed by <|endoftext|>, at most `budget` tokens: [T] int32."""
    ids: list[int] = []
    for d in documents:
        ids += d.ids + [eos]
        if len(ids) >= budget:
            break
    return torch.tensor(ids[:budget], dtype=torch.int32)


def random_windows(stream: torch.Tensor, generator: torch.Generator, batch: int, seq_len: int) -> torch.Tensor:
    """`batch` windows of seq_len + 1 tokens at seeded random offsets: [B, S + 1]."""
    starts = torch.randint(0, stream.numel() - seq_len, (batch,), generator=generator)
    return stream[starts[:, None] + torch.arange(seq_len + 1)]


# --- state ------------------------------------------------------------------------------------


def run_identity(app: CalibrateApp, corpus_sha: str, heldout_sha: str, tokenizer_sha: str) -> str:
    """What a saved state must have been trained on to be resumed: everything but the budget and the bookkeeping."""
    cfg = asdict(app.calibrate)
    for key in ("output_dir", "progress", "max_steps", "max_minutes"):
        cfg.pop(key)
    for key in ("state_dir", "resume", "save_every_minutes", "pause_after_steps", "eval_batch", "confidences", "draft_tokens"):
        cfg["train"].pop(key)
    record = {"model": asdict(app.model), "corpus": corpus_sha, "heldout": heldout_sha, "tokenizer": tokenizer_sha, "calibrate": cfg}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def trainable(text: Transformer) -> list[tuple[str, torch.nn.Parameter]]:
    return list(text.named_parameters())


def save_state(directory: Path, text: Transformer, optimizer: torch.optim.Optimizer, generators: dict[str, torch.Generator], meta: dict) -> None:
    """state.safetensors (weights, AdamW moments, generator states) then state.json, each replaced
    atomically; both carry the step, so a kill between the two renames is detected on resume."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, p in trainable(text):
        tensors[f"param.{name}"] = p.detach()
        if state := optimizer.state.get(p):
            tensors[f"adam.{name}.exp_avg"] = state["exp_avg"]
            tensors[f"adam.{name}.exp_avg_sq"] = state["exp_avg_sq"]
    for key, g in generators.items():
        tensors[f"rng.{key}"] = g.get_state()
    tmp = directory / f".state.safetensors.{uuid.uuid4().hex[:8]}"
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": STATE_FORMAT, "step": str(meta["step"]), "identity": meta["identity"]})
        os.replace(tmp, directory / "state.safetensors")
    finally:
        tmp.unlink(missing_ok=True)
    write_atomic(directory / "state.json", (json.dumps(meta, allow_nan=True) + "\n").encode())


def load_state(directory: Path, identity: str, text: Transformer, optimizer: torch.optim.Optimizer, generators: dict[str, torch.Generator]) -> dict:
    """Restore a saved state into the model, the optimizer and the generators; return its meta."""
    try:
        meta = json.loads((directory / "state.json").read_text())
        with safe_open(str(directory / "state.safetensors"), framework="pt") as f:
            header = f.metadata() or {}
            keys = set(f.keys())
            if header.get("format") != STATE_FORMAT or header.get("step") != str(meta.get("step")):
                raise CalibrateError(f"training state {directory} is inconsistent (state.json at step {meta.get('step')}, "
                                     f"state.safetensors at {header.get('step')}): remove it or set calibrate.train.resume=false")
            if meta.get("identity") != identity:
                raise CalibrateError(f"training state {directory} was written by a different run (model, corpus, tokenizer or training "
                                     "settings differ): remove it, or set calibrate.train.resume=false to start over")
            params = dict(trainable(text))
            with torch.no_grad():
                for name, p in params.items():
                    saved = f.get_slice(f"param.{name}").get_shape()
                    if list(saved) != list(p.shape):
                        raise CalibrateError(f"training state {directory}: {name} has shape {list(saved)} but the model's is {list(p.shape)}")
                    p.copy_(f.get_tensor(f"param.{name}"))
            index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
            state = {}
            for name, p in params.items():
                if f"adam.{name}.exp_avg" in keys:
                    state[index[id(p)]] = {"step": torch.tensor(float(meta["optimizer_step"])),
                                           "exp_avg": f.get_tensor(f"adam.{name}.exp_avg"), "exp_avg_sq": f.get_tensor(f"adam.{name}.exp_avg_sq")}
            optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
            for key, g in generators.items():
                g.set_state(f.get_tensor(f"rng.{key}"))
    except (OSError, SafetensorError, json.JSONDecodeError, KeyError) as e:
        raise CalibrateError(f"training state {directory} cannot be read ({e}): remove it or set calibrate.train.resume=false") from None
    return meta


# --- the stage --------------------------------------------------------------------------------


def check_train_request(app: CalibrateApp) -> None:
    c, t = app.calibrate, app.calibrate.train
    check_request(app)
    if c.dtype == "fp16":
        raise CalibrateError("calibrate.dtype=fp16 is not trained here (it needs loss scaling): use bf16 (autocast on float32 weights) or fp32")
    if t.curriculum not in CURRICULA:
        raise CalibrateError(f"calibrate.train.curriculum={t.curriculum!r} is not one of {', '.join(CURRICULA)}")
    if t.rotation < 1 or not 0 <= t.layer_dropout < 1 or not 0 <= t.gradual_fraction <= 1 or t.exit_scale < 0:
        raise CalibrateError("calibrate.train: rotation >= 1, layer_dropout in [0, 1), gradual_fraction in [0, 1] and exit_scale >= 0")
    n = len(app.model.text.exit_layers)
    if t.exit_weights is not None and (len(t.exit_weights) != n or min(t.exit_weights) < 0 or t.exit_weights[-1] <= 0):
        raise CalibrateError(f"calibrate.train.exit_weights={list(t.exit_weights)} needs one scale >= 0 per exit {list(app.model.text.exit_layers)}, "
                             "the full-depth one > 0")
    if not c.max_steps and not c.max_minutes:
        raise CalibrateError("calibrate.mode=model needs a budget: calibrate.max_steps and/or calibrate.max_minutes > 0")


def output_directory(app: CalibrateApp) -> Path:
    if app.calibrate.output_dir:
        return Path(app.calibrate.output_dir).expanduser()
    return Path(app.engines_dir).expanduser() / app.model.name / "checkpoint"


def run_train(app: CalibrateApp, console: Console | None = None) -> Path | None:
    """Train; return the checkpoint folder written (None: paused, the state kept)."""
    console = console or make_console()
    cfg, tcfg = app.calibrate, app.calibrate.train
    check_train_request(app)
    if threads := int(os.environ.get("DYNGRAPH_CPU_THREADS", "0")):
        torch.set_num_threads(threads)
    out_dir = output_directory(app)
    if app.model.checkpoint and out_dir.resolve() == Path(app.model.checkpoint).expanduser().resolve():
        raise CalibrateError(f"calibrate.output_dir={out_dir} is model.checkpoint: write the trained checkpoint elsewhere")
    try:
        check_writable(out_dir)
    except ExportError as e:
        raise CalibrateError(str(e)) from None
    state_dir = Path(tcfg.state_dir).expanduser() if tcfg.state_dir else out_dir.parent / f".{out_dir.name}.train-state"

    tokenizer = load_tokenizer(app)
    corpus = read_corpus(cfg.corpus, tokenizer)
    if cfg.heldout_corpus:
        heldout_corpus = read_corpus(cfg.heldout_corpus, tokenizer)
        train_docs, heldout_docs, heldout_sha, heldout_name = corpus.documents, heldout_corpus.documents, heldout_corpus.sha256, str(heldout_corpus.directory)
    else:
        train_docs, heldout_docs = split_documents(corpus.documents, cfg.heldout_fraction, cfg.seq_len, cfg.seed)
        heldout_sha, heldout_name = corpus.sha256, f"{cfg.heldout_fraction:.0%} of the corpus's tokens, by document"
    eos = tokenizer.token_id("<|endoftext|>")
    train_ids = token_stream(train_docs, eos, cfg.max_train_tokens)
    held_ids = token_stream(heldout_docs, eos, cfg.max_heldout_tokens + 1)
    if train_ids.numel() <= cfg.seq_len + 1:
        raise CalibrateError(f"corpus {corpus.directory}: {train_ids.numel()} training tokens, fewer than one window of calibrate.seq_len={cfg.seq_len} + 1")
    n_windows = (held_ids.numel() - 1) // cfg.seq_len
    if n_windows < 1:
        raise CalibrateError(f"held-out text ({heldout_name}) has {held_ids.numel()} tokens, fewer than one window of calibrate.seq_len={cfg.seq_len} + 1")
    windows = torch.stack([held_ids[i * cfg.seq_len:(i + 1) * cfg.seq_len + 1] for i in range(n_windows)])  # [N, S + 1]

    model_cfg = copy.deepcopy(app.model)
    from_scratch = not model_cfg.checkpoint
    try:
        torch.manual_seed(cfg.seed)
        model = build_model(model_cfg, cfg.device, torch.float32)
    except CheckpointError as e:
        raise CalibrateError(str(e)) from None
    if tokenizer.vocab_size > model_cfg.text.vocab_size:
        raise CalibrateError(f"the tokenizer has {tokenizer.vocab_size} ids, more than the model's vocabulary of {model_cfg.text.vocab_size} "
                             f"(model.text.vocab_size): the shapes do not match")
    text = model.text.requires_grad_(True).train()
    device = next(text.parameters()).device
    bf16 = cfg.dtype == "bf16"
    compute = torch.bfloat16 if bf16 else torch.float32
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else None
    decay = [p for _, p in trainable(text) if p.dim() >= 2]
    no_decay = [p for _, p in trainable(text) if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=tuple(tcfg.betas), fused=device.type == "cuda")
    generators = {"batches": torch.Generator().manual_seed(cfg.seed), "dropout": torch.Generator().manual_seed(cfg.seed + 1)}
    exit_layers = list(model_cfg.text.exit_layers)
    weights, weights_from = exit_weights(app)
    batch = max(1, cfg.batch_tokens // cfg.seq_len)
    n_params = sum(p.numel() for _, p in trainable(text))
    tokenizer_sha = hashlib.sha256(tokenizer.tokenizer.to_str().encode()).hexdigest()
    identity = run_identity(app, corpus.sha256, heldout_sha, tokenizer_sha)

    def evaluate() -> dict:
        text.eval()
        pred = predict(lambda ids: exit_hidden(text, ids, None, compute), text.lm_head, windows, tokenizer.vocab_size, tcfg.eval_batch, device, autocast)
        text.train()
        return {"exits": exit_quality(pred, exit_layers, list(tcfg.confidences), list(tcfg.draft_tokens), cfg.target_agreement, cfg.min_exit_rate)}

    meta = None
    if tcfg.resume and (state_dir / "state.json").is_file():
        meta = load_state(state_dir, identity, text, optimizer, generators)
        meta["sessions"] += 1
        console.print(f"resuming {state_dir} at step {meta['step']} ({meta['seconds']:.0f} s trained)")
    console.print(f"[bold]{model_cfg.name}[/]: {'continual training of ' + str(model_cfg.checkpoint) if not from_scratch else 'pre-training from random weights'}, "
                  f"{n_params / 1e6:.1f} M decoder parameters, exits {exit_layers}; {train_ids.numel():,} training tokens, "
                  f"{n_windows * cfg.seq_len:,} held-out positions; {cfg.dtype} on {cfg.device}; batch {batch} x {cfg.seq_len}")
    if meta is None:
        meta = {"identity": identity, "step": 0, "optimizer_step": 0, "tokens": 0, "seconds": 0.0, "sessions": 1,
                "losses": {str(e): [] for e in exit_layers}, "before": evaluate()}

    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"), TextColumn("{task.fields[info]}"),
                        TimeElapsedColumn(), console=console, disable=not cfg.progress)
    step, session_start, stopped_by = meta["step"], meta["seconds"], None
    first_step = step  # of this session
    pending: list[torch.Tensor] = []

    def flush() -> None:
        for row in torch.stack(pending).tolist() if pending else []:
            for e, v in zip(exit_layers, row):
                meta["losses"][str(e)].append(None if math.isnan(v) else round(v, 5))
        pending.clear()

    def checkpoint_state(seconds: float) -> None:
        flush()
        meta.update(step=step, optimizer_step=step, seconds=seconds)
        save_state(state_dir, text, optimizer, generators, meta)

    start = time.perf_counter()
    last_save = start
    task = progress.add_task("train", total=1.0, info="")
    try:
        with progress:
            while True:
                seconds = session_start + time.perf_counter() - start
                frac = training_progress(app, step, seconds)
                if cfg.max_steps and step >= cfg.max_steps:
                    stopped_by = "calibrate.max_steps"
                elif cfg.max_minutes and seconds >= 60 * cfg.max_minutes:
                    stopped_by = "calibrate.max_minutes"
                elif tcfg.pause_after_steps and step - first_step >= tcfg.pause_after_steps:
                    stopped_by = "pause"
                if stopped_by:
                    break
                lr = learning_rate(app, step, frac)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                w = random_windows(train_ids, generators["batches"], batch, cfg.seq_len).to(device).long()  # [B, S + 1]
                ids, target = w[:, :-1], w[:, 1:]
                enabled = enabled_exits(app, step, frac)
                rates = dropout_rates(app, frac, from_scratch)
                keep = None if rates is None else (torch.rand(len(rates), batch, generator=generators["dropout"]) >= rates[:, None]).to(device, compute)
                with autocast() if autocast else torch.enable_grad():
                    hs = exit_hidden(text, ids, keep, compute)
                    losses = [F.cross_entropy(text.lm_head(h).float().view(-1, text.args.vocab_size), target.reshape(-1)) if on else None
                              for h, on in zip(hs, enabled)]
                total = sum(wk * lk for wk, lk, on in zip(weights, losses, enabled) if on and wk > 0) / sum(
                    wk for wk, on in zip(weights, enabled) if on and wk > 0)
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                torch.nn.utils.clip_grad_norm_(text.parameters(), tcfg.grad_clip)
                optimizer.step()
                nan = torch.full((), float("nan"), device=device)
                pending.append(torch.stack([lk.detach() if lk is not None else nan for lk in losses]))
                step += 1
                meta["tokens"] += batch * cfg.seq_len
                if step % FLUSH_EVERY == 0 or step == 1:
                    flush()
                    elapsed = time.perf_counter() - start
                    last = "  ".join(f"{e}:{fmt(next((v for v in reversed(meta['losses'][str(e)]) if v is not None), None), '.3f')}" for e in exit_layers)
                    rate = (step - first_step) * batch * cfg.seq_len / elapsed if elapsed else 0.0
                    progress.update(task, completed=min(1.0, frac), info=f"step {step}  loss {last}  {rate:,.0f} tok/s")
                    if time.perf_counter() - last_save >= 60 * tcfg.save_every_minutes:
                        checkpoint_state(session_start + time.perf_counter() - start)
                        last_save = time.perf_counter()
    except KeyboardInterrupt:
        checkpoint_state(session_start + time.perf_counter() - start)
        console.print(f"interrupted at step {step}: state saved in {state_dir}; run the same command again to resume")
        raise
    seconds = session_start + time.perf_counter() - start
    session_tokens = (step - first_step) * batch * cfg.seq_len
    session_seconds = seconds - session_start
    checkpoint_state(seconds)
    if stopped_by == "pause":
        console.print(f"paused after step {step} (calibrate.train.pause_after_steps): state in {state_dir}; run the same command again to continue")
        return None

    text.eval().requires_grad_(False)
    after = evaluate()
    thresholds = {e["exit_layer"]: e["threshold"] for e in after["exits"][:-1]}
    report = {
        "kind": REPORT_KIND, "schema_version": SCHEMA_VERSION, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": model_cfg.name, "start": model_cfg.checkpoint or "random", "seed": model_cfg.seed, "parameters": n_params,
                  "exit_layers": exit_layers, "dim": model_cfg.text.dim, "n_layers": model_cfg.text.n_layers, "vocab_size": model_cfg.text.vocab_size,
                  "decodable_ids": tokenizer.vocab_size, "tokenizer": app.tokenizer or model_cfg.checkpoint or "builtin byte-level"},
        "device": {"device": cfg.device, "dtype": cfg.dtype, "name": device_name(cfg.device), "torch": torch.__version__},
        "config": asdict(cfg),
        "recipe": {"early_exit_loss": tcfg.early_exit_loss, "exit_weights": weights, "weights_from": weights_from, "curriculum": tcfg.curriculum
                   + (f" (R={tcfg.rotation})" if tcfg.curriculum == "rotational" else f" (T_C = {tcfg.gradual_fraction:g} of training)" if tcfg.curriculum == "gradual" else ""),
                   "layer_dropout": tcfg.layer_dropout, "dropout_time_ramp": from_scratch if tcfg.dropout_time_ramp is None else tcfg.dropout_time_ramp,
                   "lr": cfg.lr, "betas": list(tcfg.betas), "weight_decay": tcfg.weight_decay},
        "corpus": {"directory": str(corpus.directory), "sha256": corpus.sha256, "train_documents": len(train_docs), "train_tokens": int(train_ids.numel()),
                   "heldout": heldout_name, "heldout_sha256": heldout_sha, "heldout_documents": len(heldout_docs),
                   "heldout_windows": n_windows, "heldout_positions": n_windows * cfg.seq_len, "seq_len": cfg.seq_len},
        "training": {"steps": step, "tokens": meta["tokens"], "batch_tokens": batch * cfg.seq_len, "seconds": seconds, "stopped_by": stopped_by,
                     "tokens_per_s": session_tokens / session_seconds if session_seconds else 0.0, "sessions": meta["sessions"]},
        "before": meta["before"], "after": after,
    }
    commit(out_dir, model, tokenizer, report, meta["losses"], thresholds, cfg)
    shutil.rmtree(state_dir, ignore_errors=True)  # the run is complete: its checkpoint is the state worth keeping
    print_summary(report, out_dir, app, console)
    return out_dir


def commit(out_dir: Path, model, tokenizer, report: dict, losses: dict, thresholds: dict, cfg) -> None:
    """Write the checkpoint folder beside `out_dir` and rename it into place: a run that fails or is
    killed leaves `out_dir` as it was (a previous folder there is replaced only by a complete one)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        save_glm_checkpoint(model, staging)
        tokenizer.save(staging)
        fingerprint = checkpoint_fingerprint(staging)
        exit_layers = list(model.cfg.text.exit_layers)
        # the export ties an exits file to the checkpoint it was calibrated on by the checkpoint's content hash
        base = {"seed": model.cfg.seed, "init_device": torch.device(cfg.device).type, "checkpoint": fingerprint}
        info = save_exits(exit_parameters(model), staging / EXITS_DIR / EXITS_NAME, exit_layers=exit_layers[:-1],
                          adapter_rank=model.cfg.text.exit_adapter_rank, thresholds=thresholds, target_agreement=cfg.target_agreement,
                          base_weights=base, calibration={"trained": "calibrate.mode=model", "steps": report["training"]["steps"],
                                                          "corpus_sha256": report["corpus"]["sha256"], "created": report["created"],
                                                          "heldout": {str(e["exit_layer"]): {"agreement": e["agreement"], "loss": e["loss"]}
                                                                      for e in report["after"]["exits"][:-1]}})
        (staging / EXITS_DIR / "exits.sha256").write_text(f"{info.sha256}  {EXITS_NAME}\n")
        report["files"] = {"checkpoint": str(out_dir), "fingerprint": fingerprint,
                           "exits": {"name": EXITS_NAME, "sha256": info.sha256, "thresholds": {str(k): v for k, v in thresholds.items()}}}
        write_atomic(staging / "report.json", (json.dumps(report, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode())
        plots = write_plots(report, losses, staging)
        (staging / "report.md").write_text(render_markdown(report, [p.name for p in plots]))
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def print_summary(report: dict, out_dir: Path, app: CalibrateApp, console: Console) -> None:
    table = Table(title=f"trained checkpoint {out_dir}", title_justify="left")
    ks = [str(k) for k in app.calibrate.train.draft_tokens]
    for col in ("exit", "loss before", "loss after", "accuracy", "agreement", *(f"accepted/{k}" for k in ks), "threshold", "coverage"):
        table.add_column(col, justify="right")
    for b, a in zip(report["before"]["exits"], report["after"]["exits"]):
        last = "threshold" not in a
        table.add_row(str(a["exit_layer"]), f"{b['loss']:.3f}", f"{a['loss']:.3f}", fmt_pct(a["next_token_accuracy"]),
                      "—" if last else fmt_pct(a["agreement"]), *("—" if last else fmt(a["draft_mean_accepted"][k], ".2f") for k in ks),
                      "—" if last else fmt(a["threshold"], ".4g"), "—" if last else fmt_pct(a["at_threshold"]["exit_rate"]))
    console.print(table)
    t = report["training"]
    console.print(f"{t['steps']} steps, {t['tokens']:,} tokens in {t['seconds']:.0f} s ({t['tokens_per_s']:,.0f} tokens/s), stopped by {t['stopped_by']}; "
                  f"export with: python -m pipeline export model={app.model.name} model.checkpoint={out_dir}; "
                  "serve with the same overrides and runtime.policy.name=confidence")
