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
    if p.is_dir() and runtime_for(p) is None:  # a directory that is itself a model (.mlpackage) is a file here
        manifest = read_manifest(p)
        if manifest:
            art = manifest["artifact"]
            return p / art["file"], art.get("runtime"), manifest
        candidates = [c for c in sorted(p.iterdir()) if runtime_for(c) is not None]
        if len(candidates) != 1:
            raise InputError(f"{p} has no manifest.json and {len(candidates)} model files", "pass the model file itself")
        return candidates[0], None, None
    return p, None, None


def runtime_for(path: Path) -> str | None:
    """The registered runtime that claims ``path`` (highest priority first), or None."""
    claimed = []
    for name in RUNTIMES.names():
        cls = RUNTIMES.get(name)
        if cls.claims(path):
            claimed.append((-cls.priority, name))
    return min(claimed)[1] if claimed else None


def runtime_of(file: Path, named: str | None = None):
    """The runtime class for a resolved model file (``named``: what its manifest says)."""
    name = named or runtime_for(file)
    if name is None:
        raise InputError(f"no runtime opens {file.name}", f"known runtimes: {', '.join(RUNTIMES.names())}")
    return RUNTIMES.get(name)


def artifact_kind(path: str | Path) -> str:
    """"decoder" or "encoder", as the artifact's own runtime reads it from the artifact's files."""
    file, named, _ = resolve_artifact(path)
    return runtime_of(file, named).kind(file)


def load(path: str | Path, runtime: str | None = None, **options: Any):
    file, named, _ = resolve_artifact(path)
    return (RUNTIMES.get(runtime) if runtime else runtime_of(file, named)).open(file, **options)
