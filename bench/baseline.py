"""The two yardsticks measured beside the server in the same bench run.

- What a user would otherwise run: transformers' eager `GlmForCausalLM.generate` on the same
  decoder weights, exchanged through the checkpoint compatibility (save_glm_checkpoint writes our
  decoder as a GLM checkpoint, transformers loads it), greedy, on the same prompt ids.
- The roofline: the bytes of weights a decode step of a path must read, over the copy bandwidth
  of the device measured now (one large device-to-device copy, bytes read plus bytes written).

A third, ONNX Runtime GenAI on a Llama of the same dims, is in bench/peer.py. All of them run
after the servers have stopped, so that the bench process's own CUDA context and allocations
never show up in the servers' memory or energy figures.
"""
from __future__ import annotations

import logging
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from model.autoglm import ModelConfig, materialize, meta_model
from model.tokenizer import ChatTokenizer
from contract.config import ExportConfig, RooflineSettings, TransformersBaseline
from contract.engines import DTYPE_BYTES, EXPORT_DTYPES
from contract.weights import weights_identity  # the export's own record of what made the weights
from contract.manifest import Manifest, PathRecord
from bench.workload import BenchRequest

log = logging.getLogger(__name__)


# --- weight bytes per step ------------------------------------------------------------------


def gathers_tokens(manifest: Manifest, name: str) -> bool:
    """Whether engine `name` takes the token ids, and so holds the token embedding table inside
    (`embed`; a static graph that embeds for itself)."""
    return any(t["name"] == "input_ids" for t in manifest.engines[name].inputs)


def step_engine_bytes(manifest: Manifest, path: PathRecord) -> dict[str, int]:
    """Bytes of weights each engine of one decode step of `path` reads at batch 1.

    What each engine stores (its files: quantized weights with their scales count as stored), except
    the token embedding: a step gathers one row of that table, not the table (151552 x 4096 in
    phone-9b, 8% of the model). The table, never quantized, is taken out of whichever engines of the
    step take the token ids, so the count holds for any cut: a chain of embed, segments and LM head,
    or one graph holding all of them.
    """
    per = DTYPE_BYTES[manifest.dtype]
    text = manifest.model["config"]["text"]
    table, row = text["vocab_size"] * text["dim"], text["dim"]
    out = {}
    for name in path.step:
        stored = manifest.engines[name].bytes
        if gathers_tokens(manifest, name):
            stored += (row - table) * per
        out[name] = stored
    return out


def step_weight_bytes(manifest: Manifest, path: PathRecord) -> int:
    """Bytes of weights one decode step of `path` reads at batch 1 (see step_engine_bytes)."""
    return sum(step_engine_bytes(manifest, path).values())


def encode_weight_bytes(manifest: Manifest, path: PathRecord) -> int:
    """Bytes of weights a request's encode phase reads once (encoders, media keys/values), as stored."""
    return sum(manifest.engines[name].bytes for name in path.encode)


# --- device copy bandwidth ------------------------------------------------------------------


@dataclass
class Bandwidth:
    device: str
    bytes_per_s: float
    copy_bytes: int  # size of the buffer copied; each copy reads and writes it
    iters: int
    method: str


def copy_bandwidth(device: str, cfg: RooflineSettings) -> Bandwidth:
    """Read + write bytes per second of one large copy on `device`.

    CUDA: a device-to-device copy_ timed with CUDA events over `iters` copies (the first, which
    may page in the buffers, is left out). CPU: the same copy_ (torch spreads it over its threads),
    the best of `iters`, since a shared host's other load can only slow a copy down.
    """
    nbytes = cfg.copy_mib << 20
    dev = torch.device(device)
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    src.fill_(1)  # touch every page before timing
    dst = torch.empty_like(src)
    dst.copy_(src)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.device(dev):
            start.record()
            for _ in range(cfg.iters):
                dst.copy_(src)
            end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3 / cfg.iters
        method = "torch copy_ device to device, CUDA events, mean"
    else:
        times = []
        for _ in range(cfg.iters):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
        seconds = min(times)
        method = f"torch copy_ in host memory ({torch.get_num_threads()} threads), best of {cfg.iters}"
    del src, dst
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return Bandwidth(device, 2 * nbytes / seconds, nbytes, cfg.iters, method)


# --- transformers' eager generate -----------------------------------------------------------


class BaselineSkipped(Exception):
    """The comparison cannot be made honestly here; the message, recorded in the report, says why."""


def same_weights(manifest: Manifest, model_cfg: ModelConfig, export_cfg: ExportConfig) -> None:
    """Refuse when materialising `model_cfg` would not reproduce the exported decoder weights."""
    if manifest.dtype != export_cfg.dtype:
        raise BaselineSkipped(f"the engines are {manifest.dtype} but export.dtype={export_cfg.dtype}: pass the export's overrides to the bench")
    ours = weights_identity(model_cfg, export_cfg)
    if manifest.model.get("weights") != ours:
        raise BaselineSkipped(f"the bench's model and export settings draw weights {ours}, the engines were exported with "
                              f"{manifest.model.get('weights')}: pass the export's overrides (model.seed, export.device, model.checkpoint) to the bench")
    if manifest.model["config"]["text"] != asdict(model_cfg.text):
        raise BaselineSkipped("the bench's model.text config differs from the exported one")


def transformers_baseline(requests: list[BenchRequest], manifest: Manifest, model_cfg: ModelConfig, export_cfg: ExportConfig,
                          cfg: TransformersBaseline, device: str, tokenizer: ChatTokenizer) -> dict:
    """Per-token decode latency of GlmForCausalLM.generate on the workload's text requests."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    same_weights(manifest, model_cfg, export_cfg)
    text = [r for r in requests if r.text_only][: cfg.max_requests]
    if not text:
        raise BaselineSkipped("the workload has no text-only requests")
    dtype = EXPORT_DTYPES[export_cfg.dtype]
    dev = torch.device(device)
    workdir = Path(cfg.workdir or tempfile.gettempdir()).expanduser()
    # the checkpoint holds the decoder: every parameter but the encoders' and the cross-attention's
    decoder = sum(e.parameters for n, e in manifest.engines.items() if n == "embed" or n == "lm_head" or n.startswith("segment."))
    need, free = decoder * DTYPE_BYTES[export_cfg.dtype], shutil.disk_usage(workdir).free
    if free < need * 1.05:
        raise BaselineSkipped(f"the GLM checkpoint needs {need / 2**30:.1f} GiB in {workdir}, which has {free / 2**30:.1f} GiB free: "
                              "set bench.transformers.workdir")

    with tempfile.TemporaryDirectory(prefix="dyngraph-glm-", dir=workdir) as tmp:
        # the export's weights: same seed, same generator device, same dtype (or the same checkpoint)
        ours = materialize(meta_model(model_cfg), export_cfg.device, dtype)
        from model.checkpoint import save_glm_checkpoint

        save_glm_checkpoint(ours, tmp)
        del ours  # never two copies of phone-9b on the device
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        model = transformers.GlmForCausalLM.from_pretrained(tmp, dtype=dtype, attn_implementation=cfg.attn_implementation).to(dev).eval()

    class StepClock(transformers.LogitsProcessor):
        """Timestamps each step as its logits arrive: the gaps are the per-token decode times."""

        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            self.times.append(time.perf_counter())
            return scores

    def generate(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
        """(seconds to the first token, mean seconds per later token) of one greedy generate."""
        clock = StepClock()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, num_beams=1, pad_token_id=0, logits_processor=[clock])
        if out.shape[1] != ids.shape[1] + new_tokens or len(clock.times) != new_tokens:
            raise BaselineSkipped(f"generate produced {out.shape[1] - ids.shape[1]} tokens, {new_tokens} were asked")
        return clock.times[0] - t0, (clock.times[-1] - clock.times[0]) / (new_tokens - 1)

    rows = []
    first = torch.tensor([tokenizer.apply_chat_template(text[0].messages())], device=dev)
    generate(model, first, 2)  # warm-up: kernels, allocator
    for r in text:
        ids = torch.tensor([tokenizer.apply_chat_template(r.messages())], device=dev)
        prefill, tpot = generate(model, ids, max(2, r.max_tokens))
        rows.append({"index": r.index, "group": r.group, "prompt_tokens": ids.shape[1], "new_tokens": max(2, r.max_tokens),
                     "ttft_s": prefill, "tpot_s": tpot})
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "implementation": f"transformers {transformers.__version__} GlmForCausalLM.generate (eager, greedy, dynamic cache)",
        "attn_implementation": cfg.attn_implementation,
        "device": device,
        "dtype": export_cfg.dtype,
        "requests": rows,
        "tpot_s": statistics.fmean(r["tpot_s"] for r in rows),
    }
