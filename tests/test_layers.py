"""The package layers (docs/architecture.md): every module's imports, read from its source, point
down or sideways, never up, and no module imports itself back through others.

    model < contract < exporters < pipeline, runtime < serving, bench < calibrate < cli

A package on a rank may import any package on a lower rank, and one on its own rank as long as no
cycle forms. cli/ is the entry-point layer: it assembles everything and nothing imports it. The
commands' documented names (`python -m pipeline`, `python -m runtime.serve`, Ray's
`runtime.cluster.proxy_middlewares`) are shims: modules that hold nothing but imports (and the
`if __name__ == "__main__"` line), which stand with cli/ on top, so nothing below may import them. A new
top-level package fails here until it is given a rank.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RANKS = {"model": 0, "contract": 1, "exporters": 2, "pipeline": 3, "runtime": 3, "serving": 4, "bench": 4, "calibrate": 5, "cli": 6}
TOP = max(RANKS.values())
ENTRY_PACKAGE = "cli"


def packages(root: Path = ROOT) -> list[str]:
    return sorted(p.name for p in root.iterdir() if (p / "__init__.py").is_file() and p.name != "tests")


def modules(root: Path = ROOT) -> dict[str, Path]:
    found = {}
    for package in packages(root):
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def type_only(tree: ast.Module) -> set[int]:
    """ids of the nodes under `if TYPE_CHECKING:`: imported for annotations, never run."""
    return {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and isinstance(node.test, ast.Name)
            and node.test.id == "TYPE_CHECKING" for s in node.body for n in ast.walk(s)}


def imports(name: str, path: Path, types: bool = True) -> set[str]:
    """Absolute names of every module this one imports, wherever the statement is (function bodies
    included; TYPE_CHECKING blocks too, unless `types` is false: a type is a dependency, but an
    import that never runs closes no import cycle)."""
    is_package = path.name == "__init__.py"
    found = set()
    tree = ast.parse(path.read_text(), str(path))
    skipped = set() if types else type_only(tree)
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
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


def is_main_guard(node: ast.stmt) -> bool:
    """`if __name__ == "__main__": f()`, with nothing else in it."""
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and isinstance(node.test.left, ast.Name)
            and node.test.left.id == "__name__" and not node.orelse
            and all(isinstance(s, ast.Expr) and isinstance(s.value, ast.Call) for s in node.body))


def is_shim(path: Path) -> bool:
    """A module of nothing but imports: a docstring, import statements and the main guard. It keeps
    a documented name (a `python -m` path, a Ray import path) pointing at the entry-point layer."""
    body = ast.parse(path.read_text(), str(path)).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return bool(body) and all(isinstance(n, (ast.Import, ast.ImportFrom)) or is_main_guard(n) for n in body)


def entry_points(ours: dict[str, Path]) -> set[str]:
    """The entry-point layer: cli/ and the shims over it."""
    return {name for name, path in ours.items() if name.split(".")[0] == ENTRY_PACKAGE or is_shim(path)}


def layer(module: str, entries: set[str]) -> int:
    return TOP if module in entries else RANKS[module.split(".")[0]]


def edges(ours: dict[str, Path], types: bool = True) -> list[tuple[str, str]]:
    """(importer, imported) for every import of one of our modules by another."""
    return [(name, target) for name, path in ours.items() for target in sorted(imports(name, path, types))
            if target in ours and target != name]


def upward(ours: dict[str, Path]) -> list[str]:
    entries = entry_points(ours)
    return [f"{a} (rank {layer(a, entries)}) imports {b} (rank {layer(b, entries)})"
            for a, b in edges(ours) if layer(b, entries) > layer(a, entries)]


def cycles(ours: dict[str, Path]) -> list[list[str]]:
    """Every strongly connected set of two or more modules (Tarjan): modules that import each other,
    directly or through others, with imports that run (a TYPE_CHECKING import of the caller's type
    is how a helper names it without one)."""
    graph: dict[str, set[str]] = {}
    for a, b in edges(ours, types=False):
        graph.setdefault(a, set()).add(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_package_has_a_rank_and_the_documented_entry_points_are_shims():
    assert set(packages()) == set(RANKS), "give each top-level package its rank in RANKS (and docs/architecture.md)"
    ours = modules()
    for shim in ("pipeline.__main__", "runtime.serve", "runtime.probe", "runtime.cluster"):
        assert shim in ours and is_shim(ours[shim]), f"{shim} must stay a shim over cli/ (its name is documented)"


def test_no_module_imports_upward():
    found = upward(modules())
    assert not found, "\n".join(found)


def test_no_import_cycle_between_modules():
    # within a package too: runtime/serve.py <-> runtime/cluster.py, bench/run.py <-> bench/soak.py
    found = [" <-> ".join(c) for c in cycles(modules())]
    assert not found, "\n".join(found)


def test_only_entry_points_import_hydra_at_import_time():
    # library code takes the typed dataclasses; an import of Hydra inside a function is allowed
    ours = modules()
    entries = entry_points(ours)
    top_level = [f"{name} imports {target}" for name, path in ours.items() if name not in entries
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


def tree(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    for package in {name.split("/")[0] for name in files}:
        (root / package / "__init__.py").touch()
    return modules(root)


def test_an_upward_import_is_caught(tmp_path):
    ours = tree(tmp_path, {
        "runtime/serve.py": "from cli.serve import main\n\nif __name__ == '__main__':\n    main()\n",  # a shim: fine
        "runtime/engines.py": "from serving.chat import ChatService\n",  # a shim's shape, but upward and imported below
        "runtime/step.py": "import runtime.engines\n\ndef f():\n    from serving.app import create_app\n",  # upward, in a function
        "serving/chat.py": "from runtime.step import f\n", "serving/app.py": "",
        "cli/serve.py": "from serving.chat import ChatService\n\ndef main():\n    pass\n",
    })
    assert is_shim(ours["runtime.serve"]) and not is_shim(ours["runtime.step"])
    # a shim ranks with the entry points, so a library module that imports one imports upward
    assert upward(ours) == ["runtime.step (rank 3) imports runtime.engines (rank 6)",
                            "runtime.step (rank 3) imports serving.app (rank 4)"]


def test_a_cycle_inside_a_package_is_caught(tmp_path):
    ours = tree(tmp_path, {
        "bench/run.py": "def f():\n    from bench.soak import run_soak\n",
        "bench/soak.py": "from bench.run import slug\nfrom bench.host import x\n",
        "bench/host.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from bench.soak import Soak\n",
    })
    assert cycles(ours) == [["bench.run", "bench.soak"]]  # host <-> soak is a type only
