"""How far a quantized export is from its model: per path, the next-token agreement of the engines
with the eager modules in the export dtype, on fixed random prompts.

Validation bounds each engine's error on its own; this measures what a user sees through a whole
path: embed, each segment (after its cross-attention block, on media paths), the exit and the LM
head, as a prompt's prefill. The prompts and media are drawn from a fixed seed, so two exports of
the same weights report the same figures; the encoders are not quantized, so media paths start
from random media tokens instead of running them (and the three media paths of one exit, which
then run the same engines on the same tokens, are measured once). Each chain runs once, to full
depth, and every exit on its way is read from that run.
"""
from __future__ import annotations

import torch

from exporters import Exporter
from contract.config import ExportConfig
from contract.engines import EXPORT_DTYPES, EngineSpec, PathSpec, concrete_shape, tensor_dtype
from contract.manifest import EngineRecord

PROMPTS = 64  # per path; with random weights the top-1 margins are small, so fewer would be noisy
PROMPT_TOKENS = 16
MEDIA_TOKENS = 8


def path_agreement(specs: list[EngineSpec], records: dict[str, EngineRecord], directory, exporter: Exporter,
                   cfg: ExportConfig, paths: list[PathSpec], vocab: int) -> dict[str, dict]:
    """{path name: {"top1_agreement", "max_logit_error", "max_logit_rel_error", "prompts"}} for
    every dynamic path (the static path is the full-depth path with every block)."""
    device = "cuda:0" if cfg.device == "cuda" else cfg.device
    dtype = EXPORT_DTYPES[cfg.dtype]
    by_name = {s.name: s for s in specs}
    sessions = {}

    def engine(name: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        spec = by_name[name]
        if name not in sessions:
            sessions[name] = exporter.load(directory / records[name].path, spec.inputs, spec.outputs, device)
        out = sessions[name].run({t.name: x for t, x in zip(spec.inputs, inputs)})
        return [out[t.name] for t in spec.outputs]

    def eager(name: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.inference_mode():
            out = by_name[name].module(*inputs)
        return list(out) if isinstance(out, tuple) else [out]

    generator = torch.Generator().manual_seed(0)
    batch = min(cfg.max_batch, 16)
    ids = torch.randint(0, vocab, (PROMPTS, PROMPT_TOKENS), generator=generator)
    dim = by_name["embed"].outputs[0].shape[-1]
    media = torch.randn(PROMPTS, MEDIA_TOKENS, dim, generator=generator)
    dynamic = [p for p in paths if not p.static]
    # per chain (with media or without) only its deepest path runs: the shallower exits are on its way
    deepest = {}
    for p in dynamic:
        chain = len(p.modalities) > 1
        if chain not in deepest or p.exit_layer > deepest[chain].exit_layer:
            deepest[chain] = p
    stats = {}  # (exit layer, with media) -> [agreeing prompts, largest error, largest relative error]
    for chain, path in deepest.items():
        for start in range(0, PROMPTS, batch):
            rows = slice(start, start + batch)
            feeds = {"ids": ids[rows].to(device), "media": media[rows].to(device, dtype)}
            got = exit_logits(path, engine, feeds, by_name, dtype, device)
            ref = exit_logits(path, eager, feeds, by_name, dtype, device)
            for exit_layer, logits in got.items():
                entry = stats.setdefault((exit_layer, chain), [0, 0.0, 0.0])
                err = float((logits.float() - ref[exit_layer].float()).abs().max())
                entry[0] += int((logits.argmax(-1) == ref[exit_layer].argmax(-1)).sum())
                entry[1] = max(entry[1], err)
                entry[2] = max(entry[2], err / max(float(ref[exit_layer].float().abs().max()), 1e-6))
    return {p.name: {"top1_agreement": agree / PROMPTS, "max_logit_error": worst, "max_logit_rel_error": worst_rel,
                     "prompts": PROMPTS, "prompt_tokens": PROMPT_TOKENS}
            for p in dynamic for agree, worst, worst_rel in [stats[p.exit_layer, len(p.modalities) > 1]]}


def exit_logits(path: PathSpec, run, feeds: dict[str, torch.Tensor], specs: dict[str, EngineSpec], dtype: torch.dtype,
                device: str) -> dict[int, torch.Tensor]:
    """One path's prefill of fresh prompts (an empty cache of the prompt's length), through `run`
    (engine or eager): the last position's logits [B, V] at every exit on the way, by exit layer."""
    ids = feeds["ids"]
    b, s = ids.shape
    sizes = {"batch": b, "seq": s, "capacity": s, "media": MEDIA_TOKENS}
    (hidden,) = run("embed", [ids])
    # a cross-attention block and its media keys/values share the layer they sit in front of
    kv = {specs[name].layers[0]: run(name, [feeds["media"]])[0] for name in path.encode if specs[name].graph == "cross_kv"}
    mask = torch.ones(b, MEDIA_TOKENS, dtype=torch.bool, device=device)
    logits = {}
    for name in path.step:
        spec = specs[name]
        if spec.graph == "cross_attn":
            (hidden,) = run(name, [hidden, kv[spec.layers[0]], mask])
        elif spec.fused:  # a segment, ending at an exit
            cache = [torch.zeros(concrete_shape(t, sizes), dtype=tensor_dtype(t, dtype), device=device) for t in spec.inputs[3:]]
            seqlens = torch.full((b,), s - 1, dtype=torch.int32, device=device)  # no past: the prompt is each row's whole cache
            hidden, exit_hidden, *_ = run(name, [hidden, seqlens, torch.tensor(s, dtype=torch.int32), *cache])
            logits[spec.layers[1]] = run("lm_head", [exit_hidden[:, -1].contiguous()])[0]
    return logits
