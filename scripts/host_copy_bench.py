"""What a host copy of an engine's weights costs on a GPU host: the buffer (torch's pinned
allocator, a page-locked-in-place numpy buffer as runtime.files.host_buffer makes, or plain
pageable memory), filling it, and its copy to the device.

    python3 scripts/host_copy_bench.py --out host-copy.json     # buffers of 0.5 and 2.3 GiB
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from runtime.files import host_buffer


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--gib", type=float, nargs="+", default=[0.5, 2.3])
    args = ap.parse_args()
    kinds = {"torch_pinned": lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True).numpy(),
             "registered": host_buffer,
             "pageable": lambda n: np.empty(n, dtype=np.uint8)}
    rows = []
    for gib in args.gib:
        n = int(gib * 2**30)
        device = torch.empty(n, dtype=torch.uint8, device="cuda")
        for kind, make in kinds.items():
            buf, alloc_s = timed(lambda: make(n))
            _, fill_s = timed(lambda: buf.fill(1))
            host = torch.from_numpy(buf)
            copies = [timed(lambda: device.copy_(host, non_blocking=True))[1] for _ in range(3)]
            row = {"gib": gib, "kind": kind, "alloc_s": round(alloc_s, 4), "fill_s": round(fill_s, 4),
                   "copy_s": round(min(copies), 4), "copy_gb_per_s": round(n / min(copies) / 1e9, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del host, buf
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
