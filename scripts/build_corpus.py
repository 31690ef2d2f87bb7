"""Build a calibration corpus from text already installed on this machine; nothing is downloaded.

    python scripts/build_corpus.py OUT_DIR [--max-mb 8]
    python scripts/build_corpus.py OUT_DIR --code [--max-mb 128] [--vocab-size 8192] [--seed 0]

The default mode: three sources, read in a fixed order so that the same machine image gives the same corpus:
  - chats.jsonl: the Python standard library's docstrings (read with `ast`, nothing is imported),
    each one the assistant's reply to a question about its module, class or function, asked in
    one of several forms (short, a request to explain, a how-to), so that the heuristic policy's
    features vary across the chats;
  - readme-*.txt: the long descriptions (READMEs) in the installed packages' metadata;
  - license-*.txt: the license files installed beside those packages.
Identical texts are kept once. Everything is English: the machines hold no Chinese text to speak of.

--code: a corpus to train a model on (python -m pipeline calibrate calibrate.mode=model): the .py
files of the interpreter's standard library and of its site-packages, one document each, the
docstring chats above drawn from those same files, and the installed packages' READMEs. Split BY
FILE, in a seeded order, into train/ and heldout/ (a held-out file's source and its docstrings
never reach the training part), and a byte-level BPE (tokenizer.json, GLM-4's chat specials as
ids 0..15) trained on the training part only. corpus.json records the files of each part and
their sha256. Same machine image and seed: the same bytes, the same tokenizer.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import random
import site
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
SOURCE_CHARS = (200, 400_000)  # --code: shorter files are stubs, longer ones generated tables
README_SHARE = 0.1  # --code: of --max-mb, left to the installed packages' READMEs after the sources
TOKENIZER_MB = 16.0  # --code: the BPE trains on the first this many MB of the training part (a sample is enough for 8192 ids)


def docstring_chats(limit: int, seen: set[str]):
    """(module, qualified name, docstring) for every documented module, class and function of the stdlib."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not any(part in ("test", "tests", "idlelib", "site-packages") for part in p.parts))
    used = 0
    for i, path in enumerate(files):
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for line in file_chats(source, module, i, seen):
            used += len(line)
            if used > limit:
                return
            yield line


def file_chats(source: str, module: str, i: int, seen: set[str]) -> list[str]:
    """The docstring chats (JSON lines) of one source file: its module's, classes' and public functions'."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    nodes = [(module, tree)] + [(f"{module}.{n.name}", n) for n in ast.walk(tree)
                                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not n.name.startswith("_")]
    lines = []
    for j, (name, node) in enumerate(nodes):
        doc = ast.get_docstring(node)
        if not doc or len(doc) < MIN_CHARS or not new(doc, seen):
            continue
        question = QUESTIONS[(i + j) % len(QUESTIONS)].format(name=name, module=module.split(".")[0])
        lines.append(json.dumps({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": doc}]}, ensure_ascii=False))
    return lines


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


def source_roots() -> list[Path]:
    """The standard library and every site-packages directory of this interpreter, outermost first."""
    paths = sysconfig.get_paths()
    found = [paths["stdlib"], paths["purelib"], paths["platlib"], *site.getsitepackages()]
    roots = sorted({Path(p).resolve() for p in found if p and Path(p).is_dir()})
    return [r for r in roots if not any(o != r and o in r.parents for o in roots)]  # a root inside another is read once


def source_files(roots: list[Path]) -> list[tuple[str, Path]]:
    """(module name, path) of every .py file under the roots, sorted by path: the same image, the same list."""
    files: dict[Path, str] = {}
    for root in roots:
        for directory, subdirs, names in os.walk(root):
            subdirs.sort()
            for name in sorted(n for n in names if n.endswith(".py")):
                path = Path(directory, name)
                parts = path.relative_to(root).with_suffix("").parts
                files.setdefault(path, ".".join(p for p in parts if p not in ("site-packages", "dist-packages")).removesuffix(".__init__"))
    return [(module, path) for path, module in sorted(files.items())]


def code_corpus(out: Path, budget: int, heldout_fraction: float, vocab_size: int, seed: int, roots: list[Path]) -> str:
    """--code: train/ and heldout/ by file, the tokenizer of train/, corpus.json; returns the summary line."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from model.tokenizer import ChatTokenizer

    seen: set[str] = set()
    files = source_files(roots)
    order = random.Random(seed).sample(range(len(files)), len(files))
    docs, used = [], 0  # (name, text, chats) in the seeded order, identical texts once
    for i in order:
        module, path = files[i]
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not SOURCE_CHARS[0] < len(text) < SOURCE_CHARS[1] or not new(text, seen):
            continue
        chats = file_chats(text, module, i, seen)
        docs.append((f"py-{module}", text, chats))
        used += len(text) + sum(map(len, chats))
        if used > (1 - README_SHARE) * budget:
            break
    for kind, name, text in package_texts(seen):
        if kind == "readme" and used + len(text) <= budget:
            docs.append((f"readme-{name}", text, []))
            used += len(text)
    held = max(1, round(heldout_fraction * len(docs)))
    # the READMEs come last in `docs`: a fixed interleave puts some of them in each part
    split = {"heldout": docs[:held // 2] + docs[-(held - held // 2):], "train": docs[held // 2:len(docs) - (held - held // 2)]}
    record = {"seed": seed, "heldout_fraction": heldout_fraction, "vocab_size": vocab_size, "python": sys.version.split()[0], "parts": {}}
    for part, members in split.items():
        directory = out / part
        directory.mkdir(parents=True, exist_ok=True)
        digest, names, chats = hashlib.sha256(), [], []
        for k, (name, text, file_chat_lines) in enumerate(members):
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)[:120]
            file = f"{k:05d}-{safe}.txt"  # numbered: the seeded order is the files' order
            (directory / file).write_text(text, encoding="utf-8")
            digest.update(file.encode() + b"\0" + text.encode())
            names.append(file)
            chats += file_chat_lines
        (directory / "chats.jsonl").write_text("\n".join(chats) + "\n", encoding="utf-8")
        digest.update(b"chats.jsonl\0" + "\n".join(chats).encode())
        record["parts"][part] = {"files": len(names), "chats": len(chats), "mb": round(sum(len(t) for _, t, _ in members) / 1e6, 3),
                                 "sha256": digest.hexdigest(), "names": names}
    sample, size = [], 0
    for _, text, _ in split["train"]:
        sample.append(text)
        size += len(text)
        if size > TOKENIZER_MB * 1e6:
            break
    tokenizer = ChatTokenizer.train_bpe(sample, vocab_size)
    tokenizer.save(out)
    record["tokenizer"] = {"file": "tokenizer.json", "vocab_size": tokenizer.vocab_size, "trained_on_mb": round(size / 1e6, 3),
                           "sha256": hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()}
    (out / "corpus.json").write_text(json.dumps(record, indent=1) + "\n")
    t, h = record["parts"]["train"], record["parts"]["heldout"]
    return (f"{out}: train/ {t['files']} files ({t['mb']:.1f} MB, {t['chats']} docstring chats), heldout/ {h['files']} files "
            f"({h['mb']:.2f} MB, {h['chats']} chats), tokenizer.json ({tokenizer.vocab_size} ids, BPE on {size / 1e6:.1f} MB of train/); "
            f"Python {sys.version.split()[0]}, seed {seed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the corpus directory to write (calibrate.corpus=OUT)")
    parser.add_argument("--max-mb", type=float, default=None, help="about this many MB of text in all (default 8, half of it chats; --code: 128, what 270 s of training on an H200 reads without repeating much)")
    parser.add_argument("--code", action="store_true", help="sources, docstrings and READMEs split by file into train/ and heldout/, with a BPE tokenizer")
    parser.add_argument("--heldout-fraction", type=float, default=0.02, help="--code: the share of files held out")
    parser.add_argument("--vocab-size", type=int, default=8192, help="--code: the tokenizer's ids, chat specials included")
    parser.add_argument("--seed", type=int, default=0, help="--code: the file order, hence the split and the tokenizer")
    parser.add_argument("--source", type=Path, action="append", default=None,
                        help="--code: read the .py files under this directory (repeatable) instead of the standard library and site-packages")
    args = parser.parse_args()
    max_mb = args.max_mb if args.max_mb is not None else (128.0 if args.code else 8.0)
    if max_mb <= 0:
        parser.error("--max-mb must be positive")
    budget = int(max_mb * 1e6)
    if args.code:
        if not 0 < args.heldout_fraction < 1:
            parser.error("--heldout-fraction must lie in (0, 1)")
        if (args.out / "corpus.json").exists() or (args.out / "train").exists():
            parser.error(f"{args.out} already holds a corpus: give a new directory (the parts would mix)")
        try:
            roots = sorted({r.resolve() for r in args.source}) if args.source else source_roots()
            print(code_corpus(args.out, budget, args.heldout_fraction, args.vocab_size, args.seed, roots))
        except ValueError as e:
            parser.error(str(e))
        return
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
