#!/usr/bin/env bash
# Refresh the pins that the README's install commands use (pip install -c constraints/<extra>.txt):
#   pip install uv && bash scripts/lock.sh
# uv resolves every dependency of pyproject.toml once, for every platform and Python >= 3.11
# (--universal), so the same file serves a developer's machine, CI and the GPU host.
# - cpu.txt: the cpu, test, peer and ray extras with torch at the README's 2.13.0 (a constraint
#   only pins what is installed: torch's CUDA packages listed there are never pulled by the CPU wheel).
# - gpu.txt: the gpu, test, peer-cuda and ray extras without torch: GPU users install torch for
#   their CUDA first, and that torch owns its own dependencies.
# Then run the README's test command: the refreshed pins land only with a green suite.
set -euo pipefail
cd "$(dirname "$0")/.."
common=(pyproject.toml --universal --python-version 3.11 --quiet --no-header)
uv pip compile "${common[@]}" --extra cpu --extra test --extra peer --extra ray \
    --constraint constraints/torch-cpu.in -o constraints/cpu.txt
uv pip compile "${common[@]}" --extra gpu --extra test --extra peer-cuda --extra ray \
    --override constraints/torch-yours.in --no-emit-package torch -o constraints/gpu.txt
echo "constraints/cpu.txt: $(grep -c '==' constraints/cpu.txt) pins; constraints/gpu.txt: $(grep -c '==' constraints/gpu.txt) pins"
