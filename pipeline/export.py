"""The export stage: every engine of the cut, built by a registered backend, validated against
its eager module, cached by content, and committed so that a reader never sees a half-export.

Layout of <engines_dir>/<model>/<backend>/:
  manifest.json                 written last, atomically
  <engine>-<key>.<suffix>       engine files, named by their cache key
  <engine>-<key>.json           the engine's record (hashes, validation): the cache entry
  .lock                         held for the whole export: two exports into one directory queue
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from exporters import BackendUnavailable, Exporter, backend_class
from exporters.quantize import BITS, BLOCKS, engine_quant
from model.autoglm import AutoGLM, ModelConfig, count_parameters, materialize, meta_model
from model.exits import ExitsError, ExitsInfo, check_exits, read_exits, resolve_exits
from contract.config import ExportConfig
from contract.engines import (EXPORT_DTYPES, Dim, EngineSpec, Limits, engine_specs, model_dims, path_specs,
                              probe_sizes, random_inputs, tensor_dtype)
from contract.manifest import (MANIFEST_NAME, EngineRecord, FileRecord, Manifest, ManifestError, PathRecord, engines_path,
                               fsync, write_atomic)
from contract.weights import WeightsError, weights_identity
from model.files import sha256_file
from pipeline.console import make_console
from pipeline.quantization import path_agreement

log = logging.getLogger(__name__)

# sources whose change alters what an engine computes: part of every cache key (the checkpoint
# loader and tokenizer are not: loaded weights are keyed by the checkpoint's content hash)
CODE_FILES = ("model/glm.py", "model/autoglm.py", "model/multimodal/*.py", "contract/engines.py")
STEPS = ("build", "load", "validate")


class ExportError(Exception):
    """A problem with the request or the environment, reported as one line."""


@dataclass
class ExportResult:
    manifest: Manifest
    directory: Path
    built: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    seconds: float = 0.0


def run_export(model_cfg: ModelConfig, cfg: ExportConfig, engines_dir: str | Path, console: Console | None = None) -> ExportResult:
    start = time.perf_counter()
    console = console or make_console()
    exporter = check_request(model_cfg, cfg)
    out_dir = engines_path(engines_dir, model_cfg.name, exporter.name, cfg.quantize)
    check_writable(out_dir)

    model = meta_model(model_cfg)  # structure only: planning needs no weights
    limits = Limits(cfg.max_batch, cfg.max_seq, cfg.max_context)
    specs = engine_specs(model, limits)
    dims = model_dims(model, limits)
    n_params = count_parameters(model)
    console.print(f"[bold]{model_cfg.name}[/]: {human_parameters(n_params)} parameters ({n_params:,}); "
                  f"{len(specs)} engines, backend {exporter.name}, {cfg.dtype} on {cfg.device}")
    try:
        weights = weights_identity(model_cfg, cfg)
    except WeightsError as e:
        raise ExportError(str(e)) from None
    exits = calibrated_exits(model_cfg, model, weights)
    code = code_hash(exporter)
    keys = {s.name: engine_key(s, dims, weights, exporter, code) for s in specs}

    todo = [s for s in specs if not cached_record(out_dir, s.name, keys[s.name])]
    if todo:  # bad weights fail here, before anything is written
        ensure_weights(model, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    with directory_lock(out_dir, console):
        # look again under the lock: an export we waited for may have built them meanwhile
        records = {s.name: r for s in specs if (r := cached_record(out_dir, s.name, keys[s.name]))}
        todo = [s for s in specs if s.name not in records]
        if todo:
            ensure_weights(model, cfg)
        build_missing(todo, records, keys, dims, exporter, cfg, out_dir, console)
        paths = path_specs(model_cfg.text.exit_layers)
        quantization = quantization_record(specs, records, out_dir, exporter, cfg, paths, model, bool(todo), console)
        manifest = Manifest(
            model={"name": model_cfg.name, "config": asdict(model_cfg), "parameters": n_params, "weights": weights,
                   "weights_hash": hashlib.sha256(json.dumps(weights, sort_keys=True).encode()).hexdigest()},
            backend={"name": exporter.name, "settings": exporter.settings(), "versions": exporter.versions()},
            dtype=cfg.dtype,
            dims={n: {"min": d.min, "max": d.max, "multiple": d.multiple} for n, d in dims.items()},
            engines={s.name: records[s.name] for s in specs},
            paths=[PathRecord(**asdict(p)) for p in paths],
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            exits=exits.record() if exits else None,
            quantization=quantization,
        )
        manifest.save(out_dir)
        remove_unreferenced(out_dir, manifest, exporter)
    result = ExportResult(manifest, out_dir, [s.name for s in todo], [s.name for s in specs if s not in todo], time.perf_counter() - start)
    print_summary(result, console)
    return result


# --- checks before anything is written --------------------------------------------------------


def check_request(model_cfg: ModelConfig, cfg: ExportConfig) -> Exporter:
    if cfg.dtype not in EXPORT_DTYPES:
        raise ExportError(f"export.dtype={cfg.dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    try:
        model_cfg.text.check()
    except ValueError as e:
        raise ExportError(str(e)) from None
    if cfg.max_batch < 1 or cfg.max_seq < 1 or cfg.max_context < 1:
        raise ExportError("export.max_batch, export.max_seq and export.max_context must be positive")
    if cfg.quantize is not None and cfg.quantize not in BITS:
        raise ExportError(f"export.quantize={cfg.quantize!r} is not one of {', '.join(BITS)} (or null: no quantization)")
    if cfg.quantize_block not in BLOCKS:  # checked even when off: a block set without export.quantize is a mistake too
        raise ExportError(f"export.quantize_block={cfg.quantize_block} is not one of {', '.join(map(str, BLOCKS))}")
    try:
        backend = backend_class(cfg.backend, 0)
    except KeyError as e:
        raise ExportError(e.args[0]) from None
    except BackendUnavailable as e:
        raise ExportError(str(e)) from None
    # what the backend can build, before its library is needed: installing TensorRT only to learn
    # that it cannot build int8 weights would be the wrong order
    built = getattr(backend, "quantizations", ())
    if cfg.quantize is not None and cfg.quantize not in built:
        raise ExportError(f"the {backend.name} backend cannot build export.quantize={cfg.quantize} "
                          f"(it builds: {', '.join(built) or 'no weight quantization'}); use export=onnx")
    try:
        exporter = backend(cfg)
        if check := getattr(exporter, "check_export", None):
            check()
    except BackendUnavailable as e:
        raise ExportError(str(e)) from None
    if torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
        raise ExportError(f"export.device={cfg.device} but torch sees no CUDA GPU; use export.device=cpu")
    return exporter


def check_writable(directory: Path) -> None:
    """Refuse an unwritable target before the slow work, creating nothing."""
    existing = directory
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ExportError(f"cannot write engines to {directory}: {existing} is not a directory")
    try:  # a real write: permission bits do not bind root, read-only mounts do
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".dyngraph-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ExportError(f"cannot write engines to {directory}: {existing} is not writable ({e.strerror})") from None


def ensure_weights(model: AutoGLM, cfg: ExportConfig) -> None:
    """Give the planning model its real weights, once."""
    from model.checkpoint import CheckpointError

    if not next(model.parameters()).is_meta:
        return
    try:
        materialize(model, cfg.device, EXPORT_DTYPES[cfg.dtype])
    except (CheckpointError, ExitsError) as e:
        raise ExportError(str(e)) from None


# --- cache keys -----------------------------------------------------------------------------


def calibrated_exits(model_cfg: ModelConfig, model: AutoGLM, weights: dict) -> ExitsInfo | None:
    """The exits file the weights include, checked against the (meta) model's shapes and the base
    weights it was calibrated on, before anything is built."""
    if not weights.get("exits"):
        return None
    try:
        info, shapes = read_exits(resolve_exits(model_cfg))
        check_exits(model, info, shapes)
    except ExitsError as e:
        raise ExportError(str(e)) from None
    # a checkpoint's decoder is its content hash; random weights are their seed on their generator's device
    base = {k: weights[k] for k in (("checkpoint",) if weights["checkpoint"] else ("checkpoint", "seed", "init_device"))}
    if {k: info.base_weights.get(k) for k in base} != base:
        raise ExportError(f"exits file {info.path} was calibrated on weights {info.base_weights}, this export's are {base}: "
                          f"calibrate again (python -m pipeline calibrate) or pass the calibration's model.seed/model.checkpoint/export.device")
    return info


def code_hash(exporter: Exporter) -> str:
    root = Path(__file__).resolve().parent.parent
    files = sorted(f for pattern in (*CODE_FILES, *exporter.sources) for f in root.glob(pattern))
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def engine_key(spec: EngineSpec, dims: dict[str, Dim], weights: dict, exporter: Exporter, code: str) -> str:
    """Everything that changes the engine's bytes, and nothing else: touching one option
    rebuilds only the engines that depend on it."""
    used = {entry for t in spec.inputs + spec.outputs for entry in t.shape if isinstance(entry, str)}
    used_dims = {d.name: asdict(d) for d in dims.values() if any(d.name in u for u in used)}
    # loaded weights matter only to engines that hold decoder tensors; encoders stay random
    holds_checkpoint = weights["checkpoint"] and spec.graph not in ("vision", "audio", "cross_kv", "cross_attn")
    # calibrated exit heads live in the segments that end before full depth
    holds_exits = spec.graph.startswith("segment") and spec.layers[1] < spec.config["text"]["n_layers"]
    payload = {
        "engine": spec.name, "graph": spec.graph, "config": spec.config, "dims": used_dims,
        "inputs": [asdict(t) for t in spec.inputs], "outputs": [asdict(t) for t in spec.outputs],
        "weights": {**weights, "checkpoint": weights["checkpoint"] if holds_checkpoint else None,
                    "exits": weights.get("exits") if holds_exits else None},
        "backend": exporter.name, "settings": engine_settings(exporter, spec), "versions": exporter.versions(), "code": code,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def engine_settings(exporter: Exporter, spec: EngineSpec) -> dict:
    """The backend's settings for this engine (a backend whose settings apply to every engine alike
    has only `settings`)."""
    per_engine = getattr(exporter, "engine_settings", None)
    return per_engine(spec.graph) if per_engine else exporter.settings()


def cached_record(out_dir: Path, name: str, key: str) -> EngineRecord | None:
    sidecar = out_dir / f"{name}-{key}.json"
    if not sidecar.exists():
        return None
    try:
        raw = json.loads(sidecar.read_text())
        record = EngineRecord(**{**raw, "files": [FileRecord(**f) for f in raw["files"]]})
    except (OSError, ValueError, TypeError, KeyError):
        return None
    # a size check catches truncation; the runtime verifies sha256 before it trusts a file
    if all((out_dir / f.name).is_file() and (out_dir / f.name).stat().st_size == f.bytes for f in record.files):
        return record
    return None


# --- build, validate, commit ------------------------------------------------------------------


def build_missing(todo: list[EngineSpec], records: dict[str, EngineRecord], keys: dict[str, str], dims: dict[str, Dim],
                  exporter: Exporter, cfg: ExportConfig, out_dir: Path, console: Console) -> None:
    groups: dict[str, list[EngineSpec]] = {}
    for spec in todo:
        groups.setdefault(spec.graph, []).append(spec)
    staging = out_dir / f".tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    progress = Progress(TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stage]}"),
                        TimeElapsedColumn(), console=console, disable=not cfg.progress or not todo)
    try:
        with progress:
            tasks = {s.name: progress.add_task(s.name, total=len(STEPS), stage="queued") for s in todo}
            for group in groups.values():
                start = time.perf_counter()
                for s in group:
                    progress.update(tasks[s.name], stage="tracing" if s is group[0] else "waiting for trace")
                stems = [staging / f"{s.name}-{keys[s.name]}" for s in group]
                exporter.build(group, dims, stems, out_dir)
                per_engine = (time.perf_counter() - start) / len(group)
                for spec, stem in zip(group, stems):
                    progress.update(tasks[spec.name], advance=1, stage="loading")
                    record = validate_and_commit(spec, stem, keys[spec.name], dims, exporter, cfg, out_dir,
                                                 lambda stage, t=tasks[spec.name]: progress.update(t, advance=1, stage=stage))
                    record.build_seconds = round(per_engine + record.build_seconds, 2)
                    write_atomic(out_dir / f"{spec.name}-{keys[spec.name]}.json", json.dumps(asdict(record), indent=1).encode())
                    records[spec.name] = record
                    progress.update(tasks[spec.name], stage="done")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def validate_and_commit(spec: EngineSpec, stem: Path, key: str, dims: dict[str, Dim], exporter: Exporter, cfg: ExportConfig,
                        out_dir: Path, advance) -> EngineRecord:
    start = time.perf_counter()
    files = [stem.parent / n for n in exporter.engine_files(stem.name) if (stem.parent / n).exists()]
    dtype = EXPORT_DTYPES[cfg.dtype]
    device = cfg.device if cfg.device != "cuda" else "cuda:0"
    session = exporter.load(files[0], spec.inputs, spec.outputs, device)
    loaded = time.perf_counter()
    advance("validating")
    quantized = engine_quant(spec.graph, cfg) is not None
    tolerance = cfg.quantize_tolerance[cfg.quantize] if quantized else cfg.tolerance[cfg.dtype]
    checks, worst_abs, worst_rel = [], 0.0, 0.0
    generator = torch.Generator().manual_seed(int(key, 16) % (2**31))  # fresh inputs per build, reproducible per key
    for sizes in probe_sizes(dims, spec):
        inputs = random_inputs(spec, sizes, dtype, device, generator)
        with torch.inference_mode():
            expected = spec.module(*inputs)
        expected = expected if isinstance(expected, tuple) else (expected,)
        # after the eager module, which leaves its inputs alone: an engine writes its cache in place
        got = session.run({t.name: x for t, x in zip(spec.inputs, inputs)})
        errors = {}
        for t, ref in zip(spec.outputs, expected):
            out = got[t.name]
            if out.shape != ref.shape:
                raise ExportError(f"engine {spec.name}: output {t.name} has shape {tuple(out.shape)}, eager gives {tuple(ref.shape)}")
            diff = (out.float() - ref.float()).abs()
            abs_err = float(diff.max()) if diff.numel() else 0.0
            if not torch.isfinite(out.float()).all():
                abs_err = float("inf")
            scale = float(ref.float().abs().max()) if ref.numel() else 0.0
            rel_err = abs_err / max(scale, 1e-6)
            errors[t.name] = {"max_abs": abs_err, "max_rel": rel_err}
            worst_abs, worst_rel = max(worst_abs, abs_err), max(worst_rel, rel_err)
            if not rel_err <= tolerance:
                raise ExportError(f"engine {spec.name} failed validation: output {t.name} at {used_sizes(spec, sizes)} has "
                                  f"max relative error {rel_err:.3g} (max abs {abs_err:.3g}) > tolerance {tolerance:g} for "
                                  f"{cfg.quantize + ' weights' if quantized else cfg.dtype}")
        checks.append({"sizes": used_sizes(spec, sizes), "errors": errors})
    del session
    log.info("%s: loaded in %.1f s, validated in %.1f s", spec.name, loaded - start, time.perf_counter() - loaded)
    advance("committing")
    records = []
    for f in files:  # content-addressed names: renaming over an identical file is harmless
        records.append(FileRecord(f.name, sha256_file(f), f.stat().st_size))
        os.replace(f, out_dir / f.name)
    fsync(out_dir)
    return EngineRecord(
        name=spec.name, graph=spec.graph, key=key, files=records,
        inputs=[io_record(t, dtype) for t in spec.inputs], outputs=[io_record(t, dtype) for t in spec.outputs],
        parameters=count_parameters(spec.module), layers=list(spec.layers) if spec.layers else None,
        validation=checks, max_abs_error=worst_abs, max_rel_error=worst_rel, build_seconds=time.perf_counter() - start,
    )


def quantization_record(specs: list[EngineSpec], records: dict[str, EngineRecord], out_dir: Path, exporter: Exporter,
                        cfg: ExportConfig, paths, model: AutoGLM, built: bool, console: Console) -> dict | None:
    """The manifest's quantization block: what was quantized and, per path, the agreement with the
    eager model (measured again whenever an engine was rebuilt, else the last export's)."""
    if cfg.quantize is None:
        return None
    record = {"scheme": cfg.quantize, "bits": BITS[cfg.quantize], "block_size": cfg.quantize_block, "symmetric": True,
              "head": cfg.quantize_head, "engines": [s.name for s in specs if engine_quant(s.graph, cfg)],
              "keys": {s.name: records[s.name].key for s in specs}}
    if not built:
        try:
            previous = Manifest.load(out_dir).quantization or {}
        except ManifestError:
            previous = {}
        if previous.get("keys") == record["keys"] and "agreement" in previous:
            return previous
    ensure_weights(model, cfg)
    start = time.perf_counter()
    record["agreement"] = path_agreement(specs, records, out_dir, exporter, cfg, paths, model.cfg.text.vocab_size)
    worst = min(record["agreement"].items(), key=lambda kv: kv[1]["top1_agreement"])
    console.print(f"{cfg.quantize} against the eager model in {cfg.dtype}: top-1 agreement {worst[1]['top1_agreement']:.1%} on the "
                  f"worst path ({worst[0]}), largest logit error {max(a['max_logit_error'] for a in record['agreement'].values()):.3g} "
                  f"({time.perf_counter() - start:.1f} s)")
    return record


def used_sizes(spec: EngineSpec, sizes: dict[str, int]) -> dict[str, int]:
    used = " ".join(str(e) for t in spec.inputs for e in t.shape if isinstance(e, str))
    return {n: v for n, v in sizes.items() if n in used}


def io_record(t, dtype: torch.dtype) -> dict:
    record = {"name": t.name, "shape": list(t.shape), "dtype": str(tensor_dtype(t, dtype)).removeprefix("torch.")}
    return record | ({"inplace_of": t.inplace_of} if t.inplace_of else {})


def remove_unreferenced(out_dir: Path, manifest: Manifest, exporter: Exporter) -> None:
    """Engines of earlier exports that this manifest no longer names, and staging left by killed ones."""
    keep = {f.name for e in manifest.engines.values() for f in e.files}
    keep |= {f"{e.name}-{e.key}.json" for e in manifest.engines.values()}
    for pattern in (*exporter.artifacts, "*-*.json"):
        for f in out_dir.glob(pattern):
            if f.name not in keep and f.name != MANIFEST_NAME:
                f.unlink(missing_ok=True)
    for d in out_dir.glob(".tmp-*"):
        shutil.rmtree(d, ignore_errors=True)
    for f in out_dir.glob(f".{MANIFEST_NAME}.*"):
        f.unlink(missing_ok=True)


@contextmanager
def directory_lock(directory: Path, console: Console):
    with open(directory / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            console.print(f"waiting for another export into {directory} to finish")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def print_summary(result: ExportResult, console: Console) -> None:
    table = Table(title=f"engines in {result.directory}", title_justify="left")
    for col in ("engine", "size", "params", "build s", "max rel err", ""):
        table.add_column(col, justify="left" if col in ("engine", "") else "right")
    total = 0
    for e in result.manifest.engines.values():
        total += e.bytes
        status = "built" if e.name in result.built else "cached"
        table.add_row(e.name, human_bytes(e.bytes), human_parameters(e.parameters), f"{e.build_seconds:.1f}", f"{e.max_rel_error:.2e}", status)
    console.print(table)
    worst = max(result.manifest.engines.values(), key=lambda e: e.max_rel_error)
    console.print(f"{len(result.built)} built, {len(result.cached)} cached, {human_bytes(total)} in all, "
                  f"largest validation error {worst.max_rel_error:.2e} ({worst.name}); {result.seconds:.1f} s")


def human_parameters(n: int) -> str:
    """A parameter count in millions, or from a billion in billions: 4.69 M, 9.06 B."""
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
