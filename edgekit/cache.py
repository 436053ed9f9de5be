"""Where edgekit keeps what it computes once: float references and reference logits."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def tree_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a directory (an .mlpackage is a directory)."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def model_bytes(file: Path) -> int:
    """Bytes of a model: a package directory, or the file and its external data beside it
    (``model.onnx.data``, onnxruntime-genai's ``model.onnx_data``)."""
    file = Path(file)
    if file.is_dir():
        return tree_bytes(file)
    return sum(p.stat().st_size for p in file.parent.iterdir() if p.is_file() and p.name.startswith(file.name))


def cache_dir(*parts: str) -> Path:
    """``$EDGEKIT_CACHE`` or ``$XDG_CACHE_HOME/edgekit`` or ``~/.cache/edgekit``, joined with parts."""
    root = os.environ.get("EDGEKIT_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "edgekit")
    path = Path(root).joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_files(paths: list[Path]) -> str:
    """One digest over several files (names and contents), for model directories."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()
