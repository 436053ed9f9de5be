"""The manifest written beside every artifact: what it is, where it came from, how good it is."""

from __future__ import annotations

import json
import platform
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from edgekit.cache import sha256_file

MANIFEST = "manifest.json"
SCHEMA = 1
_TOOLS = ("edgekit-ml", "gguf", "llama-cpp-python", "numpy", "torch", "transformers", "onnx", "onnxruntime", "coremltools")


def tool_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _TOOLS:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def file_entries(directory: Path) -> list[dict[str, Any]]:
    return [
        {"path": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(Path(directory).iterdir())
        if p.is_file() and p.name != MANIFEST
    ]


def write_manifest(directory: Path, data: dict[str, Any]) -> Path:
    body = {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **data,
            "tools": tool_versions(), "files": file_entries(directory)}
    path = Path(directory) / MANIFEST
    path.write_text(json.dumps(body, indent=2) + "\n")
    return path


def read_manifest(directory: Path) -> dict[str, Any] | None:
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        from edgekit.errors import InputError

        raise InputError(f"{path} is not valid JSON ({exc})", "re-export the artifact") from None
