"""The manifest written beside every artifact: what it is, where it came from, how good it is.

:class:`Manifest` is the one typed form: the pipeline fills it and writes it (:meth:`Manifest.write`),
and everything that reads an artifact directory goes through :func:`read_manifest`, which checks the
schema and the required fields so a hand-edited or truncated manifest is one clear error line.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from edgekit.cache import sha256_file

MANIFEST = "manifest.json"
SCHEMA = 2  # 2: "model.kind"; encoders and decoders share one layout
READS = (1, 2)
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


@dataclass
class Manifest:
    """What ``edgekit convert`` records about an artifact (all JSON-able)."""

    artifact: dict[str, Any]  # format, file, runtime, and what the exporter reports
    source: dict[str, Any]  # kind, path, sha256, model_kind
    model: dict[str, Any]  # name, kind, architecture, parameters, spec (and after passes)
    recipe: dict[str, Any]  # name, label, quant, passes (records), calibration
    size_bytes: int
    bits_per_weight: float
    quality: dict[str, Any] | None  # None where the runtime cannot run on this host
    validation: dict[str, Any]
    timings_s: dict[str, float] = field(default_factory=dict)
    plan: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for optional in ("plan", "warnings"):
            if not d[optional]:
                del d[optional]
        return d

    def write(self, directory: Path) -> dict[str, Any]:
        """Write ``manifest.json`` into ``directory`` (after every other file: it lists their hashes)."""
        body = {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **self.to_dict(),
                "tools": tool_versions(), "files": file_entries(directory)}
        (Path(directory) / MANIFEST).write_text(json.dumps(body, indent=2) + "\n")
        return body


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of an artifact directory (None when it has none), checked against the schema."""
    from edgekit.errors import InputError

    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    hint = "re-export the artifact with `edgekit convert`"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise InputError(f"{path} is not valid JSON ({type(exc).__name__})", hint) from None
    if not isinstance(data, dict):
        raise InputError(f"{path} is not a JSON object", hint)
    if data.get("schema") not in READS:
        raise InputError(f"{path} has manifest schema {data.get('schema')!r}; this edgekit reads {', '.join(map(str, READS))}",
                         hint)
    # what opening the artifact needs must be there; what else is there must have its type
    art = data.get("artifact")
    if not (isinstance(art, dict) and isinstance(art.get("file"), str) and art.get("format")):
        raise InputError(f"{path} lacks artifact.file / artifact.format", hint)
    src = data.get("source")
    if src is not None and not (isinstance(src, dict) and {"kind", "path", "sha256"} <= set(src)):
        raise InputError(f"{path}: source must record kind, path and sha256", hint)
    wrong = [k for k, t in (("model", dict), ("recipe", dict), ("quality", dict), ("validation", dict),
                            ("size_bytes", int), ("bits_per_weight", (int, float))) if data.get(k) is not None
             and not isinstance(data[k], t)]
    if wrong:
        raise InputError(f"{path}: {', '.join(wrong)} {'has' if len(wrong) == 1 else 'have'} the wrong type", hint)
    if Path(art["file"]).name != art["file"]:  # a manifest must not point outside its own directory
        raise InputError(f"{path}: artifact.file {art['file']!r} is not a file name", hint)
    return data
