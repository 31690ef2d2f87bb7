"""Build a calibration corpus from text already installed on this machine; nothing is downloaded.

    python scripts/build_corpus.py OUT_DIR [--max-mb 8]

Three sources, read in a fixed order so that the same machine image gives the same corpus:
  - chats.jsonl: the Python standard library's docstrings (read with `ast`, nothing is imported),
    each one the assistant's reply to a question about its module, class or function, asked in
    one of several forms (short, a request to explain, a how-to), so that the heuristic policy's
    features vary across the chats;
  - readme-*.txt: the long descriptions (READMEs) in the installed packages' metadata;
  - license-*.txt: the license files installed beside those packages.
Identical texts are kept once. Everything is English: the machines hold no Chinese text to speak of.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

QUESTIONS = [
    "What does `{name}` do?",
    "Explain `{name}` in Python's {module} module.",
    "How do I use {name}?",
    "Describe {name}.",
    "Why would I call `{name}`, and what should I watch out for? Explain step by step.",
    "{name}",
]
MIN_CHARS = 120  # shorter docstrings and READMEs say little


def docstring_chats(limit: int, seen: set[str]):
    """(module, qualified name, docstring) for every documented module, class and function of the stdlib."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not any(part in ("test", "tests", "idlelib", "site-packages") for part in p.parts))
    used = 0
    for i, path in enumerate(files):
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        nodes = [(module, tree)] + [(f"{module}.{n.name}", n) for n in ast.walk(tree)
                                    if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not n.name.startswith("_")]
        for j, (name, node) in enumerate(nodes):
            doc = ast.get_docstring(node)
            if not doc or len(doc) < MIN_CHARS or not new(doc, seen):
                continue
            question = QUESTIONS[(i + j) % len(QUESTIONS)].format(name=name, module=module.split(".")[0])
            line = json.dumps({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": doc}]}, ensure_ascii=False)
            used += len(line)
            if used > limit:
                return
            yield line


def package_texts(seen: set[str]):
    """("readme" | "license", package name, text) from the installed distributions, by name."""
    dists = sorted(metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower())
    for dist in dists:
        name = (dist.metadata["Name"] or "unknown").lower()
        readme = dist.metadata.get_payload() or dist.metadata["Description"] or ""
        if len(readme) >= MIN_CHARS and new(readme, seen):
            yield "readme", name, readme
        for f in dist.files or []:
            if "license" in f.name.lower() or "copying" in f.name.lower():
                try:
                    text = Path(dist.locate_file(f)).read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError):
                    continue
                if len(text) >= MIN_CHARS and new(text, seen):
                    yield "license", name, text


def new(text: str, seen: set[str]) -> bool:
    digest = hashlib.sha256(text.strip().encode()).hexdigest()
    if digest in seen:
        return False
    seen.add(digest)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the corpus directory to write (calibrate.corpus=OUT)")
    parser.add_argument("--max-mb", type=float, default=8.0, help="about this many MB of text in all, half of it chats")
    args = parser.parse_args()
    if args.max_mb <= 0:
        parser.error("--max-mb must be positive")
    budget = int(args.max_mb * 1e6)
    args.out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    chats = list(docstring_chats(budget // 2, seen))
    (args.out / "chats.jsonl").write_text("\n".join(chats) + "\n", encoding="utf-8")
    used, counts = sum(map(len, chats)), {"readme": 0, "license": 0}
    for kind, name, text in package_texts(seen):
        if used + len(text) > budget:
            break
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
        (args.out / f"{kind}-{safe}-{counts[kind]}.txt").write_text(text, encoding="utf-8")
        used += len(text)
        counts[kind] += 1
    print(f"{args.out}: {len(chats)} stdlib docstring chats, {counts['readme']} READMEs, {counts['license']} license texts; "
          f"{used / 1e6:.1f} MB (Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
