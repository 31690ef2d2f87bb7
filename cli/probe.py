"""python -m runtime.probe [--url URL]: the probe's command line over bench/probe.py."""
from __future__ import annotations

import argparse

from bench.probe import __doc__ as ABOUT, run_probe


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m runtime.probe", description=ABOUT.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--exits", type=int, nargs="+", default=[6, 12, 18, 24])
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per request (generated past EOS)")
    parser.add_argument("--model", default="autoglm-phone-9b")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    parser.add_argument("--reference", default=None, help="an earlier probe's --out: each path's token agreement with it")
    args = parser.parse_args()
    run_probe(args.url, args.exits, args.max_tokens, args.model, args.api_key, args.out, args.reference)
