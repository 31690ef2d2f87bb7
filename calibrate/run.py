"""`python -m pipeline calibrate`: exit heads that mean something on a real checkpoint.

A checkpoint was never trained to predict from its middle layers, so its early exits start as
noise. This stage tunes what the exits own, with the backbone frozen (as EE-LLM tunes its exit
heads, by self-distillation as in LayerSkip), and calibrates when to trust them (as CALM does):

1. Corpus: every .txt file under `calibrate.corpus` is a document ([gMASK]<sop> and its text);
   every line of a .jsonl file is a chat, {"messages": [{"role", "content"}, ...]}, rendered with
   GLM-4's chat template (model/tokenizer.py). Documents are cut into pieces of `seq_len` tokens
   and split, document by document, into a training and a held-out part.
2. Features: one frozen forward per piece gives the hidden state in front of every exit head. They
   are kept (on `calibrate.device`): a head sees one position at a time and the backbone never
   changes, so every training step after that costs only the heads and the shared LM head.
3. Training: each exit before full depth (its RMSNorm, and its low-rank adapter with
   model.text.exit_adapter_rank > 0), in float32, minimises KL(full depth || exit) over the
   decodable ids (those the runtime samples from) on random batches of positions.
4. Thresholds: on the held-out positions, per exit and threshold t, the exit rate (share whose
   top-1 probability is >= t) and the agreement (share of those whose top-1 equals full depth's).
   The chosen t is the lowest one such that it, and every higher one resting on at least
   `min_exit_rate` of the positions, meets `target_agreement`: fixed-sequence testing from the
   top, as in CALM's calibration, here on point estimates.
5. Output: exits.safetensors (model/exits.py: the heads and, in its metadata, the thresholds),
   exits.sha256, report.json, report.md (calibrate/report.py) and PNG plots (calibrate/plots.py), the
   numbers from calibrate/metrics.py, moved into the output folder only once
   everything has been computed.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from model.autoglm import AutoGLM, build_model
from model.checkpoint import CheckpointError
from model.exits import EXITS_DIR, EXITS_NAME, ExitsInfo, save_exits
from model.glm import Segment
from model.tokenizer import ChatTokenizer
from contract.config import CalibrateApp, CalibrateConfig, ExportConfig
from contract.engines import EXPORT_DTYPES
from pipeline.console import make_console
from pipeline.export import ExportError, check_writable
from contract.weights import WeightsError, weights_identity
from contract.manifest import write_atomic
from bench.workload import WorkloadError, build_workload
from runtime.config import PolicyConfig
from runtime.policy import DEFAULT_CONFIDENCE, DepthPolicy, PolicyInput
from calibrate.metrics import (agreement_curve, at_threshold, cascade, choose_threshold, curve_points, fit_heuristic,
                               policy_shares)
from calibrate.plots import write_plots
from calibrate.report import print_summary, render_markdown

log = logging.getLogger(__name__)

REPORT_KIND = "dyngraph-calibration-report"
SCHEMA_VERSION = 1
CORPUS_SUFFIXES = (".txt", ".jsonl")
# OpenAI's chat roles as GLM-4's template names them (as the server maps them)
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "observation",
              "observation": "observation"}
GRID = [round(x, 2) for x in np.linspace(0.0, 1.0, 21)]  # the thresholds report.json tabulates
EVAL_CHUNK = 4096  # positions per evaluation batch


class CalibrateError(Exception):
    """A problem with the request, the corpus or the checkpoint, reported as one line."""


# --- corpus ---------------------------------------------------------------------------------


@dataclass
class Document:
    source: str  # file, or file:line for a chat
    ids: list[int]
    prompt_len: int = 0  # a chat that ends with an assistant reply: the prompt's length (the rest is the reply)
    policy_text: str = ""  # what the heuristic policy would read: the last user message


@dataclass
class Corpus:
    directory: Path
    files: list[str]
    sha256: str  # over the files' names and bytes
    documents: list[Document]


def read_corpus(directory: str, tokenizer: ChatTokenizer) -> Corpus:
    if not directory:
        raise CalibrateError("calibrate.corpus is not set: give a directory of .txt or .jsonl files (calibrate.corpus=DIR)")
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise CalibrateError(f"calibrate.corpus={directory}: no such directory")
    files = sorted(p for p in root.rglob("*") if p.suffix in CORPUS_SUFFIXES and p.is_file())
    if not files:
        raise CalibrateError(f"corpus {root} has no .txt or .jsonl files")
    digest = hashlib.sha256()
    documents: list[Document] = []
    pending: list[tuple[Document, str]] = []  # the .txt documents and their texts, encoded together below
    start = [tokenizer.token_id("[gMASK]"), tokenizer.token_id("<sop>")]
    for path in files:
        try:
            raw = path.read_bytes()
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CalibrateError(f"corpus file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise CalibrateError(f"corpus file {path} cannot be read: {e.strerror}") from None
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + raw)
        if path.suffix == ".txt":
            if text.strip():
                documents.append(Document(str(path), start))
                pending.append((documents[-1], text))
            continue
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                documents.append(chat_document(f"{path}:{n}", line, tokenizer))
    # the .txt documents encoded together: `tokenizers` spreads a batch over the cores (a code corpus is tens of MB)
    for (d, _), ids in zip(pending, tokenizer.encode_batch([text for _, text in pending])):
        d.ids = start + ids
    if not documents:
        raise CalibrateError(f"corpus {root}: its {len(files)} .txt/.jsonl file(s) hold no text")
    return Corpus(root, [p.relative_to(root).as_posix() for p in files], digest.hexdigest(), documents)


def chat_document(source: str, line: str, tokenizer: ChatTokenizer) -> Document:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise CalibrateError(f"corpus file {source} is not a JSON object ({e.msg})") from None
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise CalibrateError(f'corpus file {source}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}}')
    chat = []
    for m in messages:
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        if role not in CHAT_ROLES or not isinstance(content, str):
            raise CalibrateError(f"corpus file {source}: every message needs a role ({', '.join(CHAT_ROLES)}) and a string content")
        chat.append({"role": CHAT_ROLES[role], "content": content})
    users = [m["content"] for m in chat if m["role"] == "user"]
    if chat[-1]["role"] == "assistant" and len(chat) > 1:
        # the prompt exactly as the server builds it, then the reply: the part a request generates
        prompt = tokenizer.apply_chat_template(chat[:-1])
        return Document(source, prompt + tokenizer.encode(chat[-1]["content"]), len(prompt), users[-1] if users else "")
    return Document(source, tokenizer.apply_chat_template(chat, add_generation_prompt=False))


def split_documents(documents: list[Document], heldout_fraction: float, seq_len: int, seed: int) -> tuple[list[Document], list[Document]]:
    """(train, held-out), whole documents on each side: a seeded order, the first ones held out
    until they hold `heldout_fraction` of the tokens. A single document is split by pieces."""
    if len(documents) == 1:
        d = documents[0]
        documents = [Document(f"{d.source}@{i}", d.ids[i:i + seq_len]) for i in range(0, len(d.ids), seq_len)]
    order = random.Random(seed).sample(range(len(documents)), len(documents))
    total = sum(len(d.ids) for d in documents)
    heldout, train, held = [], [], 0
    for i in order:
        if held < heldout_fraction * total and len(order) - len(heldout) > 1:
            heldout.append(documents[i])
            held += len(documents[i].ids)
        else:
            train.append(documents[i])
    if not train or not heldout:
        raise CalibrateError(f"the corpus is too small to split: {total} tokens in {len(documents)} document(s); "
                             f"the training and the held-out part each need a piece of their own (seq_len {seq_len})")
    return train, heldout


def pieces(documents: list[Document], seq_len: int, budget: int) -> list[list[int]]:
    """Each document cut into pieces of at most seq_len tokens, up to `budget` tokens in all."""
    out, used = [], 0
    for d in documents:
        for i in range(0, len(d.ids), seq_len):
            piece = d.ids[i:i + seq_len][:budget - used]
            if not piece:
                return out
            out.append(piece)
            used += len(piece)
    return out


# --- the frozen backbone --------------------------------------------------------------------


@torch.no_grad()
def exit_states(model: AutoGLM, ids: torch.Tensor) -> list[torch.Tensor]:
    """The hidden state in front of every exit head, text only: [B, S] -> n_exits x [B, S, D]."""
    text = model.text
    b, s = ids.shape
    h = text.embed_tokens(ids)
    position_ids = torch.arange(s, device=ids.device).expand(b, s)
    kv_mask = torch.zeros(b, 0, dtype=torch.bool, device=ids.device)
    states = []
    for segment in text.segments:
        h, _ = segment(h, position_ids, kv_mask, segment.empty_kv(b, h.device, h.dtype))
        states.append(h)
    return states


def padded_batches(seqs: list[list[int]], batch: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids [B, S], valid [B, S]): right padding, which a causal model never attends to."""
    out = []
    for i in range(0, len(seqs), batch):
        group = seqs[i:i + batch]
        width = max(len(s) for s in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        valid = torch.zeros(len(group), width, dtype=torch.bool)
        for row, s in enumerate(group):
            ids[row, :len(s)] = torch.tensor(s)
            valid[row, :len(s)] = True
        out.append((ids.to(device), valid.to(device)))
    return out


def extract(model: AutoGLM, seqs: list[list[int]], cfg: CalibrateConfig, progress: Progress, name: str) -> list[torch.Tensor]:
    """Per exit, the hidden states of every position of `seqs`: n_exits x [N, D] in the model's dtype."""
    n = sum(len(s) for s in seqs)
    dim, device, dtype = model.cfg.text.dim, next(model.parameters()).device, next(model.parameters()).dtype
    features = [torch.empty(n, dim, dtype=dtype, device=device) for _ in model.text.segments]
    task = progress.add_task(name, total=n, info="")
    start, done = time.perf_counter(), 0
    for ids, valid in padded_batches(seqs, cfg.forward_batch, device):
        states = exit_states(model, ids)
        count = int(valid.sum())
        for f, h in zip(features, states):
            f[done:done + count] = h[valid]  # [count, D]
        done += count
        progress.update(task, advance=count, info=f"{done / (time.perf_counter() - start):,.0f} tok/s")
    return features


# --- the exit heads -------------------------------------------------------------------------


def fresh_heads(model: AutoGLM) -> torch.nn.ModuleList:
    """A float32 copy of every exit head but the full-depth one: Segments without layers, so that
    `Segment.exit` is the one definition of what an exit computes."""
    segments = model.text.segments
    heads = torch.nn.ModuleList(Segment(model.cfg.text, 0) for _ in range(len(segments) - 1))
    heads = heads.to(device=next(model.parameters()).device, dtype=torch.float32)
    with torch.no_grad():
        for head, segment in zip(heads, segments):
            for name, p in head.named_parameters():
                p.copy_(segment.get_parameter(name))
    return heads


class Distiller:
    """Full depth's next-token distribution and the exits', over the decodable ids, in float32."""

    def __init__(self, model: AutoGLM, decodable: int):
        self.final = model.text.segments[-1]
        self.weight = model.text.lm_head.weight[:decodable].detach().float()  # [V', D]

    @torch.no_grad()
    def teacher(self, h_last: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.final.exit(h_last).float() @ self.weight.T, -1)  # [n, V']

    def student(self, head: Segment, h: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(head.exit(h.float()) @ self.weight.T, -1)  # [n, V']


def kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position: [n, V'] x 2 -> [n]."""
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)


@dataclass
class TrainResult:
    steps: int
    seconds: float
    tokens_per_s: float
    stopped_by: str
    losses: list[list[float]]  # per exit, the mean KL of each step's batch


def train(heads: torch.nn.ModuleList, distiller: Distiller, features: list[torch.Tensor], cfg: CalibrateConfig,
          progress: Progress) -> TrainResult:
    n = features[0].shape[0]
    params = [p for p in heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    warmup = max(1, min(cfg.warmup_steps, cfg.max_steps // 10))
    # linear warm-up, then cosine down to a tenth: the heads are few parameters, fitted from scratch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, cfg.max_steps))))))
    generator = torch.Generator(device=features[0].device).manual_seed(cfg.seed)
    losses: list[list[float]] = [[] for _ in heads]
    task = progress.add_task("train exit heads", total=cfg.max_steps, info="")
    start, stopped_by, step = time.perf_counter(), "calibrate.max_steps", 0
    batch = min(cfg.batch_tokens, n)
    for step in range(1, cfg.max_steps + 1):
        idx = torch.randint(0, n, (batch,), device=features[0].device, generator=generator)
        teacher = distiller.teacher(features[-1][idx])
        step_losses = [kl(teacher, distiller.student(head, f[idx])).mean() for head, f in zip(heads, features)]
        optimizer.zero_grad(set_to_none=True)
        torch.stack(step_losses).sum().backward()
        optimizer.step()
        schedule.step()
        for record, loss in zip(losses, step_losses):
            record.append(float(loss.detach()))
        elapsed = time.perf_counter() - start
        progress.update(task, advance=1, info=f"KL {sum(r[-1] for r in losses) / len(losses):.4f}  {step * batch / elapsed:,.0f} tok/s")
        if cfg.max_minutes and elapsed >= 60 * cfg.max_minutes:
            stopped_by = "calibrate.max_minutes"
            break
    seconds = time.perf_counter() - start
    return TrainResult(step, seconds, step * batch / seconds if seconds else 0.0, stopped_by if step else "calibrate.max_steps=0", losses)


@dataclass
class HeldOut:
    """Per exit before full depth, at every held-out position."""

    kl: list[np.ndarray]
    agree: list[np.ndarray]  # exit top-1 == full depth's
    confidence: list[np.ndarray]  # the exit's top-1 probability, as the runtime's confidence policy computes it


@torch.no_grad()
def evaluate(heads: torch.nn.ModuleList, distiller: Distiller, features: list[torch.Tensor]) -> HeldOut:
    kls, agrees, confs = [[] for _ in heads], [[] for _ in heads], [[] for _ in heads]
    for a in range(0, features[0].shape[0], EVAL_CHUNK):
        teacher = distiller.teacher(features[-1][a:a + EVAL_CHUNK])
        top1 = teacher.argmax(-1)
        for k, head in enumerate(heads):
            student = distiller.student(head, features[k][a:a + EVAL_CHUNK])
            kls[k].append(kl(teacher, student).cpu())
            best, arg = student.max(-1)
            agrees[k].append((arg == top1).cpu())
            confs[k].append(best.exp().cpu())
    cat = lambda parts: [torch.cat(p).double().numpy() for p in parts]  # noqa: E731
    return HeldOut(cat(kls), [a.astype(bool) for a in cat(agrees)], cat(confs))


# --- requests: held-out chats and the bench's text prompts -----------------------------------


@torch.no_grad()
def request_view(model: AutoGLM, heads: torch.nn.ModuleList, distiller: Distiller, prompts: list[list[int]], replies: list[list[int]],
                 batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per request and exit before full depth: the top-1 probability at the prompt's last token
    (where the runtime decides), and the agreement with full depth over the reply (teacher-forced);
    and per request the positions that agreement counts. Shapes [R, K], [R, K], [R]."""
    device = next(model.parameters()).device
    seqs = [p + r for p, r in zip(prompts, replies)]
    confidence, agreement, counts = [], [], []
    row = 0
    for ids, valid in padded_batches(seqs, batch, device):
        states = exit_states(model, ids)
        for b in range(ids.shape[0]):
            first, last = len(prompts[row]) - 1, len(seqs[row])  # the decision position, then each reply position
            teacher = distiller.teacher(states[-1][b, first:last])
            top1 = teacher.argmax(-1)
            conf, agree = [], []
            for k, head in enumerate(heads):
                student = distiller.student(head, states[k][b, first:last])
                conf.append(float(student[0].max().exp()))
                agree.append(float((student.argmax(-1) == top1).float().mean()))
            confidence.append(conf)
            agreement.append(agree)
            counts.append(last - first)
            row += 1
    return np.array(confidence), np.array(agreement), np.array(counts)


# --- the stage ------------------------------------------------------------------------------


def check_request(app: CalibrateApp) -> None:
    c = app.calibrate
    if c.mode not in ("heads", "model"):
        raise CalibrateError(f"calibrate.mode={c.mode!r} is not one of heads (exit heads on a frozen backbone), model (the whole decoder, calibrate/train.py)")
    if not 0.0 < c.target_agreement <= 1.0:
        raise CalibrateError(f"calibrate.target_agreement={c.target_agreement} must lie in (0, 1]: the share of tokens on which an exit must agree with full depth")
    if not 0.0 < c.heldout_fraction < 1.0:
        raise CalibrateError(f"calibrate.heldout_fraction={c.heldout_fraction} must lie in (0, 1)")
    if not 0.0 <= c.min_exit_rate < 1.0:
        raise CalibrateError(f"calibrate.min_exit_rate={c.min_exit_rate} must lie in [0, 1)")
    if c.dtype not in EXPORT_DTYPES:
        raise CalibrateError(f"calibrate.dtype={c.dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    for name in ("seq_len", "forward_batch", "batch_tokens", "max_train_tokens", "max_heldout_tokens"):
        if getattr(c, name) < 1:
            raise CalibrateError(f"calibrate.{name}={getattr(c, name)} must be positive")
    if c.max_steps < 0 or c.max_minutes < 0 or c.lr <= 0:
        raise CalibrateError("calibrate.max_steps and calibrate.max_minutes must be >= 0, calibrate.lr > 0")
    if torch.device(c.device).type == "cuda" and not torch.cuda.is_available():
        raise CalibrateError(f"calibrate.device={c.device} but torch sees no CUDA GPU; use calibrate.device=cpu")
    try:
        app.model.text.check()
    except ValueError as e:
        raise CalibrateError(str(e)) from None


def output_directory(app: CalibrateApp) -> Path:
    if app.calibrate.output_dir:
        return Path(app.calibrate.output_dir).expanduser()
    if app.model.checkpoint:
        return Path(app.model.checkpoint).expanduser() / EXITS_DIR  # where model.exits=auto finds it
    return Path(app.engines_dir).expanduser() / app.model.name / EXITS_DIR


def load_tokenizer(app: CalibrateApp) -> ChatTokenizer:
    source = app.tokenizer or app.model.checkpoint  # as runtime.serve picks it: the ids must be the ones it serves
    try:
        return ChatTokenizer.from_dir(source) if source else ChatTokenizer.builtin()
    except ValueError as e:
        raise CalibrateError(str(e)) from None


def run_calibrate(app: CalibrateApp, console: Console | None = None) -> Path:
    """Calibrate the exits; return the output folder (exits.safetensors and the report)."""
    console = console or make_console()
    cfg = app.calibrate
    check_request(app)
    if threads := int(os.environ.get("DYNGRAPH_CPU_THREADS", "0")):
        torch.set_num_threads(threads)  # as the runtime's ONNX Runtime sessions take it: a shared CPU
    out_dir = output_directory(app)
    try:
        check_writable(out_dir)
    except ExportError as e:
        raise CalibrateError(str(e)) from None
    tokenizer = load_tokenizer(app)
    corpus = read_corpus(cfg.corpus, tokenizer)
    train_docs, heldout_docs = split_documents(corpus.documents, cfg.heldout_fraction, cfg.seq_len, cfg.seed)
    train_seqs = pieces(train_docs, cfg.seq_len, cfg.max_train_tokens)
    heldout_seqs = pieces(heldout_docs, cfg.seq_len, cfg.max_heldout_tokens)

    model_cfg = copy.deepcopy(app.model)
    model_cfg.exits = None  # calibrate from the fresh heads, whatever file model.exits would find
    try:
        # what the export records of these weights, with the same generator device: the exits file is tied to it
        base_weights = weights_identity(model_cfg, ExportConfig(device=cfg.device))
        base_weights.pop("exits")
        torch.manual_seed(cfg.seed)
        model = build_model(model_cfg, cfg.device, EXPORT_DTYPES[cfg.dtype])
    except (WeightsError, CheckpointError) as e:
        raise CalibrateError(str(e)) from None
    if tokenizer.vocab_size > model_cfg.text.vocab_size:
        raise CalibrateError(f"the tokenizer has {tokenizer.vocab_size} ids, more than the model's vocabulary of {model_cfg.text.vocab_size}")
    exit_layers = list(model_cfg.text.exit_layers)
    console.print(f"[bold]{model_cfg.name}[/]: calibrating exits {exit_layers[:-1]} against full depth ({exit_layers[-1]} layers); "
                  f"corpus {corpus.directory}: {len(corpus.files)} file(s), {len(corpus.documents)} documents; "
                  f"{sum(map(len, train_seqs)):,} training and {sum(map(len, heldout_seqs)):,} held-out tokens; "
                  f"{cfg.dtype} on {cfg.device}, adapter rank {model_cfg.text.exit_adapter_rank}")

    distiller = Distiller(model, tokenizer.vocab_size)
    before_heads = fresh_heads(model)
    heads = fresh_heads(model)
    progress = Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not cfg.progress)
    with progress:
        train_features = extract(model, train_seqs, cfg, progress, "features (training)")
        heldout_features = extract(model, heldout_seqs, cfg, progress, "features (held-out)")
        result = train(heads, distiller, train_features, cfg, progress)
    del train_features
    before, after = evaluate(before_heads, distiller, heldout_features), evaluate(heads, distiller, heldout_features)

    per_exit, thresholds, thresholds_before = [], [], []
    for k, layer in enumerate(exit_layers[:-1]):
        curve = agreement_curve(after.confidence[k], after.agree[k])
        t = choose_threshold(*curve, cfg.target_agreement, cfg.min_exit_rate)
        t_before = choose_threshold(*agreement_curve(before.confidence[k], before.agree[k]), cfg.target_agreement, cfg.min_exit_rate)
        thresholds.append(t)
        thresholds_before.append(t_before)
        per_exit.append({
            "exit_layer": layer,
            "heldout": {"before": {"kl": float(before.kl[k].mean()), "agreement": float(before.agree[k].mean())},
                        "after": {"kl": float(after.kl[k].mean()), "agreement": float(after.agree[k].mean())}},
            "threshold": t, "at_threshold": at_threshold(after.confidence[k], after.agree[k], t),
            "threshold_before": t_before, "at_threshold_before": at_threshold(before.confidence[k], before.agree[k], t_before),
            "grid": {"after": [at_threshold(after.confidence[k], after.agree[k], g) for g in GRID],
                     "before": [at_threshold(before.confidence[k], before.agree[k], g) for g in GRID]},
            "curve": {"after": curve_points(curve), "before": curve_points(agreement_curve(before.confidence[k], before.agree[k]))},
            "train_loss": {"first": result.losses[k][0] if result.losses[k] else None, "last": result.losses[k][-1] if result.losses[k] else None},
        })

    requests = requests_block(app, model, tokenizer, before_heads, heads, distiller, heldout_docs, thresholds, exit_layers)
    report = {
        "kind": REPORT_KIND, "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": model_cfg.name, "checkpoint": model_cfg.checkpoint, "base_weights": base_weights,
                  "exit_layers": exit_layers, "adapter_rank": model_cfg.text.exit_adapter_rank, "dim": model_cfg.text.dim,
                  "decodable_ids": tokenizer.vocab_size, "tokenizer": app.tokenizer or model_cfg.checkpoint or "builtin byte-level"},
        "device": {"device": cfg.device, "dtype": cfg.dtype, "name": device_name(cfg.device), "torch": torch.__version__},
        "config": asdict(cfg),
        "corpus": {"directory": str(corpus.directory), "files": len(corpus.files), "sha256": corpus.sha256,
                   "documents": len(corpus.documents), "chats_with_reply": sum(d.prompt_len > 0 for d in corpus.documents),
                   "train_documents": len(train_docs), "heldout_documents": len(heldout_docs),
                   "train_tokens": sum(map(len, train_seqs)), "heldout_tokens": sum(map(len, heldout_seqs))},
        "training": {"steps": result.steps, "seconds": result.seconds, "tokens_per_s": result.tokens_per_s, "stopped_by": result.stopped_by,
                     "batch_tokens": min(cfg.batch_tokens, sum(map(len, train_seqs)))},
        "exits": per_exit,
        "cascade": {"after": cascade(after.confidence, after.agree, thresholds, exit_layers),
                    "before": cascade(before.confidence, before.agree, [DEFAULT_CONFIDENCE] * len(thresholds), exit_layers)},
        **requests,
    }
    tensors = {f"text.segments.{k}.{name}": p for k, head in enumerate(heads) for name, p in head.named_parameters()}
    calibration = {"corpus_sha256": corpus.sha256, "train_tokens": report["corpus"]["train_tokens"], "steps": result.steps,
                   "heldout": {str(e["exit_layer"]): e["heldout"]["after"] for e in per_exit}, "created": report["created"]}
    info = commit(out_dir, tensors, report, result, model_cfg, thresholds, base_weights, calibration, cfg)
    print_summary(report, info, app, console)
    return out_dir


def requests_block(app: CalibrateApp, model: AutoGLM, tokenizer: ChatTokenizer, before_heads, heads, distiller: Distiller,
                   heldout_docs: list[Document], thresholds: list[float | None], exit_layers: list[int]) -> dict:
    """The request-level view: the bench's text prompts (where the confidence policy would send
    them, before and after), and the held-out chats (the same, with their reply agreement, and
    the heuristic policy's thresholds fitted to them)."""
    cfg = app.calibrate
    out: dict = {}
    try:
        mix = [r for r in build_workload(app.bench) if r.text_only]
    except WorkloadError as e:
        mix, out["mix"] = [], {"skipped": str(e)}
    if mix:
        prompts = [tokenizer.apply_chat_template(r.messages())[-cfg.seq_len:] for r in mix]
        conf_after = request_view(model, heads, distiller, prompts, [[]] * len(prompts), cfg.forward_batch)[0]
        conf_before = request_view(model, before_heads, distiller, prompts, [[]] * len(prompts), cfg.forward_batch)[0]
        out["mix"] = {"bench": app.bench.name, "text_requests": len(mix), "note": "Text requests only: media requests also run the encoders and cross-attention",
                      "exit_share": {"after": policy_shares(conf_after, thresholds, exit_layers),
                                     "before": policy_shares(conf_before, [DEFAULT_CONFIDENCE] * len(thresholds), exit_layers)}}
    chats = [d for d in heldout_docs if d.prompt_len and len(d.ids) > d.prompt_len][:cfg.max_heldout_chats]
    if len(chats) < 2:
        out["chats"] = {"skipped": f"{len(chats)} held-out chat(s) with a reply: the request view and the heuristic fit need .jsonl chats that end with an assistant message"}
        return out
    prompts = [d.ids[:d.prompt_len][-cfg.seq_len // 2:] for d in chats]
    replies = [d.ids[d.prompt_len:][:cfg.seq_len - len(p)] for d, p in zip(chats, prompts)]
    conf, agreement, counts = request_view(model, heads, distiller, prompts, replies, cfg.forward_batch)
    where = [next((k for k, t in enumerate(thresholds) if t is not None and c[k] >= t), len(thresholds)) for c in conf]
    reply_agreement = [agreement[r, k] if k < len(thresholds) else 1.0 for r, k in enumerate(where)]
    policy = DepthPolicy(PolicyConfig(), exit_layers)
    scores = np.array([policy.score(PolicyInput(d.policy_text, ("text",))) for d in chats])
    fitted, groups = fit_heuristic(scores, agreement, counts, cfg.target_agreement)
    out["chats"] = {
        "requests": len(chats),
        "confidence_policy": {"exit_share": policy_shares(conf, thresholds, exit_layers),
                              "reply_agreement": float(np.average(reply_agreement, weights=counts))},
        "reply_agreement_per_exit": {str(e): float(np.average(agreement[:, k], weights=counts)) for k, e in enumerate(exit_layers[:-1])},
        "heuristic_fit": {"thresholds": fitted, "override": f"runtime.policy.thresholds=[{','.join(f'{t:g}' for t in fitted)}]",
                          "groups": {str(e): g for e, g in zip(exit_layers[:-1], groups)},
                          "method": "per exit in order, the highest threshold such that the requests it adds to that exit keep a "
                                    "length-weighted reply agreement >= target_agreement (default PolicyConfig score weights)"},
    }
    return out


def commit(out_dir: Path, tensors: dict, report: dict, result: TrainResult, model_cfg, thresholds, base_weights, calibration,
           cfg: CalibrateConfig) -> ExitsInfo:
    """Write everything into a staging folder beside the output folder, then move it in, the
    exits file last: a run that fails or is killed leaves the output folder as it was."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    exit_layers = list(model_cfg.text.exit_layers)
    try:
        info = save_exits(tensors, staging / EXITS_NAME, exit_layers=exit_layers[:-1], adapter_rank=model_cfg.text.exit_adapter_rank,
                          thresholds=dict(zip(exit_layers[:-1], thresholds)), target_agreement=cfg.target_agreement,
                          base_weights=base_weights, calibration=calibration)
        report["file"] = {"name": EXITS_NAME, "sha256": info.sha256, "bytes": info.bytes,
                          "thresholds": {str(e): t for e, t in zip(exit_layers[:-1], thresholds)}}
        (staging / "exits.sha256").write_text(f"{info.sha256}  {EXITS_NAME}\n")
        write_atomic(staging / "report.json", (json.dumps(report, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode())
        plots = write_plots(report, result, staging)
        (staging / "report.md").write_text(render_markdown(report, [p.name for p in plots]))
        out_dir.mkdir(parents=True, exist_ok=True)
        names = [p.name for p in staging.iterdir() if p.name != EXITS_NAME] + [EXITS_NAME]
        for name in names:
            os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    info.path = (out_dir / EXITS_NAME).resolve()
    return info


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return platform.processor() or platform.machine()
