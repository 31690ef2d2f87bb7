"""python -m runtime.probe [--url URL]: one streamed request per dynamic path through a running
server, with the engines and devices each one ran on, its time to first token and time per
output token: a deployment check for a new placement or GPU.

The server must let requests choose their exit (`runtime.policy.request_override=true`):

    python -m runtime.serve model=phone-9b export.dtype=fp16 runtime=two_gpu runtime.policy.request_override=true &
    python -m runtime.probe --out probe.json

Every request is greedy (temperature 0) and runs its full `--max-tokens`, so two servers' probes
compare token by token: `--reference probe-fp16.json` adds each path's agreement with that earlier
probe (the share of positions where both generated the same token), e.g. an int8 export's against fp16's.
"""
from __future__ import annotations

import asyncio
import json
import sys
import time

import httpx
import numpy as np
from rich.table import Table

from bench.client import send
from bench.quality import agreement
from bench.workload import BenchRequest, draw_chart, encode_png, encode_wav, synth_sound
from pipeline.console import make_console

MODALITY_SETS = [("text",), ("text", "image"), ("text", "audio"), ("text", "image", "audio")]


def probe_requests(max_tokens: int) -> list[BenchRequest]:
    rng = np.random.default_rng(0)
    png = encode_png(draw_chart("bars", 448, rng))
    wav = encode_wav(synth_sound("chirp", 3.0, rng))
    return [BenchRequest(i, "+".join(m), m, "Describe what you perceive, step by step.", max_tokens,
                         png if "image" in m else None, wav if "audio" in m else None)
            for i, m in enumerate(MODALITY_SETS)]


async def probe(url: str, exits: list[int], max_tokens: int, model: str, headers: dict) -> list[dict]:
    rows = []
    async with httpx.AsyncClient(timeout=600, headers=headers) as client:
        for exit_layer in exits:
            for request in probe_requests(max_tokens):
                body = request.body(model, temperature=0.0, seed=0) | {"exit_layer": exit_layer, "ignore_eos": True}
                result = await send(client, url, request, body, "dynamic", time.perf_counter(), 0.0)
                if not result.ok:
                    raise SystemExit(f"probe failed at exit {exit_layer} with {request.group}: {result.error}")
                rows.append({"path": result.path, "exit_layer": result.exit_layer, "engines": result.engines,
                             "devices": result.devices, "ttft_ms": 1e3 * result.ttft_s,
                             "ms_per_token": 1e3 * result.tpot_s if result.tpot_s else None,
                             "completion_tokens": result.completion_tokens, "tokens": result.tokens})
    return rows


def compare(rows: list[dict], reference: list[dict]) -> tuple[int, int]:
    """Set each row's token agreement with the reference probe's row of the same path (None where
    it has none); returns (tokens equal, tokens compared) over them all."""
    by_path = {r["path"]: r["tokens"] for r in reference}
    pooled = [0, 0]
    for r in rows:
        same, total = agreement(r["tokens"], by_path[r["path"]]) if r["path"] in by_path else (0, 0)
        r["agreement"] = same / total if total else None
        pooled[0] += same
        pooled[1] += total
    return pooled[0], pooled[1]


def load_reference(path: str) -> list[dict]:
    """An earlier probe's --out, checked; SystemExit with one line if it is not one."""
    try:
        reference = json.loads(open(path).read())
    except (OSError, ValueError) as e:
        sys.exit(f"--reference {path}: {e}")
    if not (isinstance(reference, list) and all(isinstance(r, dict) and {"path", "tokens"} <= r.keys() for r in reference)):
        sys.exit(f"--reference {path}: not the --out of a probe (a list of rows with path and tokens)")
    return reference


def run_probe(url: str, exits: list[int], max_tokens: int, model: str, api_key: str | None = None,
              out: str | None = None, reference_path: str | None = None) -> list[dict]:
    """Probe the server at `url`, print one row per path (with its agreement with the reference
    probe, if given) and write the rows to `out`; SystemExit with one line on failure."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    reference = load_reference(reference_path) if reference_path else None
    try:
        rows = asyncio.run(probe(url.rstrip("/"), exits, max_tokens, model, headers))
    except httpx.HTTPError as e:
        sys.exit(f"cannot reach the server at {url}: {e}")
    columns = ["path", "engines", "devices", "TTFT ms", "ms/token"]
    if reference is not None:
        same, total = compare(rows, reference)
        columns.append("agreement")
    table = Table(title=f"one request per path at {url}", title_justify="left")
    for col in columns:
        table.add_column(col, justify="left" if col in ("path", "engines", "devices") else "right")
    for r in rows:
        devices = ", ".join(sorted(set(r["devices"].values())))
        cells = [r["path"], " ".join(r["engines"]), devices, f"{r['ttft_ms']:.1f}", f"{r['ms_per_token']:.2f}" if r["ms_per_token"] else "-"]
        if reference is not None:
            cells.append("-" if r["agreement"] is None else f"{r['agreement']:.0%}")
        table.add_row(*cells)
    make_console(stderr=False).print(table)
    if reference is not None and total:
        print(f"token agreement with {reference_path}: {same / total:.1%} over {total} tokens")
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows
