"""``edgekit.load``: pick the runtime for an artifact and open a session. No torch on this path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekit.errors import InputError
from edgekit.manifest import read_manifest
from edgekit.registry import RUNTIMES


def resolve_artifact(path: str | Path) -> tuple[Path, str | None, dict | None]:
    """(model file, runtime name or None, manifest or None) for a directory or a file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{p} does not exist", "pass an artifact directory written by `edgekit convert` or a model file")
    if p.is_dir() and _runtime_for_suffix(p) is None:  # a directory that is itself a model (.mlpackage) is a file here
        manifest = read_manifest(p)
        if manifest:
            art = manifest["artifact"]
            return p / art["file"], art.get("runtime"), manifest
        candidates = [c for c in sorted(p.iterdir()) if _runtime_for_suffix(c) is not None]
        if len(candidates) != 1:
            raise InputError(f"{p} has no manifest.json and {len(candidates)} model files", "pass the model file itself")
        return candidates[0], None, None
    return p, None, None


def _runtime_for_suffix(path: Path) -> str | None:
    for name in RUNTIMES.names():
        cls = RUNTIMES.get(name)
        if path.suffix.lower() in getattr(cls, "suffixes", ()):
            return name
    return None


def load(path: str | Path, runtime: str | None = None, **options: Any):
    file, named, _ = resolve_artifact(path)
    name = runtime or named or _runtime_for_suffix(file)
    if name is None:
        raise InputError(f"no runtime opens {file.name}", f"known runtimes: {', '.join(RUNTIMES.names())}")
    return RUNTIMES.get(name).open(file, **options)
