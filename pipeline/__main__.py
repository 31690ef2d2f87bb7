"""python -m pipeline {export,calibrate,bench,compare} [overrides]

Each command is its own Hydra app with its own primary config in conf/ (export.yaml,
calibrate.yaml, bench.yaml); `python -m pipeline export --help` lists its groups with their options
and its main settings, `python -m pipeline export --cfg job` the whole composed config.
"""
from __future__ import annotations

import sys

from pipeline.commands import COMMANDS

USAGE = "usage: python -m pipeline {" + ",".join(COMMANDS) + "} [overrides | --help]"


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        sys.exit(0 if sys.argv[1:2] in (["-h"], ["--help"]) else 2)
    command = sys.argv.pop(1)
    sys.argv[0] = f"python -m pipeline {command}"
    COMMANDS[command]()


if __name__ == "__main__":
    main()
