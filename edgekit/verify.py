"""Is this the artifact its manifest describes? Sizes always (free), sha256 on request.

``manifest.json`` lists every file of the artifact with its size and sha256 (:func:`edgekit.manifest.file_entries`).
Opening an artifact compares the sizes, which catches truncated copies and swapped files at no cost;
``verify=True`` (``edgekit verify``, and by default ``edgekit serve`` and ``edgekit profile``) hashes the
files too, which catches a flipped byte. Hashing a multi-GB GGUF takes seconds, so a digest is
remembered per (path, size, mtime): a file rewritten in place with the same size and modification
time would not be re-hashed, like ``make`` would not rebuild it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from edgekit.errors import InputError

HINT = "the artifact was damaged or edited after `edgekit convert`; copy it again or re-export it"


def listed_files(directory: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's file entries, each a plain file name inside ``directory`` (else one InputError)."""
    where = Path(directory) / "manifest.json"
    entries = manifest.get("files")
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise InputError(f"{where}: 'files' is not a list", HINT)
    out = []
    for e in entries:
        if not (isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("bytes"), int)
                and isinstance(e.get("sha256"), str)):
            raise InputError(f"{where}: a 'files' entry lacks path / bytes / sha256", HINT)
        name = e["path"]
        if not name or Path(name).name != name or name in (".", "..") or "\0" in name:
            raise InputError(f"{where} names {name!r}, which is not a file inside the artifact directory", HINT)
        out.append(e)
    return out


def check_files(directory: Path, manifest: dict[str, Any], deep: bool = False) -> list[dict[str, Any]]:
    """Compare the artifact's files with the manifest: sizes, and with ``deep`` their sha256. Returns the entries."""
    directory = Path(directory)
    entries = listed_files(directory, manifest)
    for e in entries:
        p = directory / e["path"]
        if not p.is_file():
            raise InputError(f"{p} is listed in the manifest but missing", HINT)
        size = p.stat().st_size
        if size != e["bytes"]:
            raise InputError(f"{p} is {size} bytes; its manifest says {e['bytes']}", HINT)
    if deep:
        for e in entries:
            p = directory / e["path"]
            if digest(p) != e["sha256"].lower():
                raise InputError(f"{p} does not match the sha256 in its manifest", HINT)
    return entries


def digest(path: Path) -> str:
    """sha256 of ``path``, remembered per (absolute path, size, mtime)."""
    from edgekit.atomic import read_json_or_none, write_atomic
    from edgekit.cache import cache_dir, sha256_file

    st = Path(path).stat()
    key = hashlib.sha256(f"{Path(path).resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:32]
    entry = cache_dir("verified") / f"{key}.json"
    known = read_json_or_none(entry)
    if isinstance(known, dict) and isinstance(known.get("sha256"), str):
        return known["sha256"]
    value = sha256_file(path)
    try:
        write_atomic(entry, json.dumps({"path": str(path), "sha256": value}))
    except InputError:
        pass  # a cache that cannot be written only costs the next check its time
    return value


def verify(path: str | os.PathLike) -> dict[str, Any]:
    """``edgekit verify``: the artifact directory at ``path`` against its manifest, hashes included."""
    from edgekit.manifest import read_manifest

    p = Path(path)
    if not p.is_dir():
        raise InputError(f"{p} is not an artifact directory", "pass the directory `edgekit convert -o` wrote")
    manifest = read_manifest(p)
    if manifest is None:
        raise InputError(f"{p} has no manifest.json to verify against", "only artifacts written by `edgekit convert` carry one")
    entries = check_files(p, manifest, deep=True)
    if not entries:
        raise InputError(f"{p / 'manifest.json'} lists no files to verify", HINT)
    return {"path": str(p), "files": len(entries), "bytes": sum(e["bytes"] for e in entries)}
