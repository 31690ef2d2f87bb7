"""The package layers (docs/architecture.md): every module's imports, read from its source, point
down or sideways, never up, and no two top-level packages import each other.

    model < contract < exporters < pipeline, runtime < serving, bench < calibrate < entry points

A package on a rank may import any package on a lower rank, and one on its own rank as long as no
cycle forms. The entry points (the modules behind `python -m ...` and Ray's import paths) sit on
top: they assemble everything and nothing imports them. A new top-level package fails here until
it is given a rank.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RANKS = {"model": 0, "contract": 1, "exporters": 2, "pipeline": 3, "runtime": 3, "serving": 4, "bench": 4, "calibrate": 5}
ENTRY_POINTS = {"pipeline.__main__", "pipeline.commands", "runtime.serve", "runtime.probe", "runtime.cluster"}
TOP = max(RANKS.values()) + 1


def packages() -> list[str]:
    return sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name != "tests")


def modules() -> dict[str, Path]:
    found = {}
    for package in packages():
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path) -> set[str]:
    """Absolute names of every module this one imports, wherever the statement is (function bodies
    and TYPE_CHECKING blocks included: a type is a dependency too)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names}  # `from pkg import module`
    return found


def layer(module: str) -> int:
    return TOP if module in ENTRY_POINTS else RANKS[module.split(".")[0]]


def edges() -> list[tuple[str, str]]:
    """(importer, imported) for every import of one of our modules by another."""
    ours = modules()
    return [(name, target) for name, path in ours.items() for target in sorted(imports(name, path))
            if target in ours and target.split(".")[0] != name.split(".")[0] or target in ENTRY_POINTS and target != name]


def test_every_package_has_a_rank_and_every_entry_point_exists():
    assert set(packages()) == set(RANKS), "give each top-level package its rank in RANKS (and docs/architecture.md)"
    assert ENTRY_POINTS <= set(modules())


def test_no_module_imports_upward():
    upward = [f"{a} (rank {layer(a)}) imports {b} (rank {layer(b)})" for a, b in edges() if layer(b) > layer(a)]
    assert not upward, "\n".join(upward)


def test_no_import_cycle_between_top_level_packages():
    graph: dict[str, set[str]] = {}
    for a, b in edges():
        if a not in ENTRY_POINTS:
            graph.setdefault(a.split(".")[0], set()).add(b.split(".")[0])
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in trail:
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif len(trail) < len(RANKS):
                visit(nxt, trail + [nxt])

    for package in sorted(graph):
        visit(package, [package])
    assert not cycles, "\n".join(sorted(set(cycles)))


def test_only_entry_points_import_hydra_at_import_time():
    # library code takes the typed dataclasses; an import of Hydra inside a function is allowed
    top_level = [f"{name} imports {target}" for name, path in modules().items() if name not in ENTRY_POINTS
                 for node in ast.parse(path.read_text()).body if isinstance(node, (ast.Import, ast.ImportFrom))
                 for target in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""])
                 if target.split(".")[0] in ("hydra", "omegaconf")]
    assert not top_level, "\n".join(top_level)


@pytest.mark.parametrize("source, expected", [
    ("from .glm import Segment", {"model.glm", "model.glm.Segment"}),
    ("from ..glm import MLP", {"model.glm", "model.glm.MLP"}),
    ("def f():\n    import runtime.serve", {"runtime.serve"}),
])
def test_imports_are_read_from_the_source(tmp_path, source, expected):
    # the checks above are only as good as this parser: relative and function-level imports count
    path = tmp_path / "x.py"
    path.write_text(source)
    name = "model.multimodal.x" if source.startswith("from ..") else "model.x"
    assert imports(name, path) == expected


def test_an_upward_import_is_caught(monkeypatch):
    monkeypatch.setattr(f"{__name__}.ENTRY_POINTS", ENTRY_POINTS - {"runtime.serve"})
    # runtime.serve assembles serving: as a plain runtime module that import would point up
    assert any(a == "runtime.serve" and layer(b) > layer(a) for a, b in edges())
