"""The content hash of a file: the one rule every record of a file's identity uses (the manifest's
engine files, an exits file's record, the runtime's verification)."""
from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: str | Path, chunk: int = 8 << 20) -> str:
    """The file's sha256, hex, read `chunk` bytes at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
