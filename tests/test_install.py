"""The install is reproducible: the README's commands and CI install from the committed constraints,
and those constraints pin every dependency pyproject.toml declares, at versions it allows. A
pyproject change without `bash scripts/lock.sh` fails here, not on the next user's fresh clone."""
from __future__ import annotations

import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from .conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# which extras each constraints file resolves (scripts/lock.sh)
LOCKS = {"cpu": ("cpu", "test", "peer", "ray"), "gpu": ("gpu", "test", "peer-cuda", "ray")}


def pins(lock: str) -> dict[str, list[Version]]:
    """name -> its pinned versions (one per line: a universal lock pins some packages per Python
    version); a pin whose marker is never true (torch in gpu.txt) is no pin."""
    out: dict[str, list[Version]] = {}
    for line in (ROOT / "constraints" / f"{lock}.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            if "never" not in str(req.marker or ""):
                (spec,) = req.specifier
                out.setdefault(canonicalize_name(req.name), []).append(Version(spec.version))
    return out


def requirements(extras: tuple[str, ...]) -> list[Requirement]:
    declared = PYPROJECT["project"]["dependencies"] + [r for e in extras for r in PYPROJECT["project"]["optional-dependencies"][e]]
    return [Requirement(r) for r in declared]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]


def test_readme_and_ci_install_from_the_constraints():
    installs = [c for c in readme_commands() if c.startswith("pip install") and ".[" in c]
    cpu = [c for c in installs if "[cpu" in c]
    gpu = [c for c in installs if "[gpu" in c]
    assert cpu and all("-c constraints/cpu.txt" in c for c in cpu), cpu
    assert gpu and all("-c constraints/gpu.txt" in c for c in gpu), gpu
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("pip install")]
    assert ci and set(ci) <= {c.split("&&")[0].strip() for c in cpu}, (ci, cpu)  # CI installs as the README says


@pytest.mark.parametrize("lock", LOCKS)
def test_constraints_pin_every_declared_dependency_within_its_range(lock):
    pinned = pins(lock)
    for req in requirements(LOCKS[lock]):
        name = canonicalize_name(req.name)
        if lock == "gpu" and name == "torch":
            assert name not in pinned  # the user's CUDA build owns it
            continue
        assert name in pinned, f"{req} is not in constraints/{lock}.txt: run `bash scripts/lock.sh`"
        for version in pinned[name]:
            assert req.specifier.contains(version, prereleases=True), \
                f"constraints/{lock}.txt pins {name}=={version}, outside pyproject's {req}: run `bash scripts/lock.sh`"
    assert pinned.get("torch", [Version("2.13.0")]) == [Version("2.13.0")]  # the README's CPU pin
