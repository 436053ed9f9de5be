"""``edgekit profile``: speed and memory in a clean process, quality against the float reference."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Callable

from edgekit.errors import InputError
from edgekit.harness.quality import EvalConfig, read_text
from edgekit.harness.speed import SpeedConfig, measure
from edgekit.session import resolve_artifact


def host_info() -> dict[str, Any]:
    import psutil

    return {"machine": platform.machine(), "system": platform.system(), "python": platform.python_version(),
            "cores_logical": psutil.cpu_count(), "cores_physical": psutil.cpu_count(logical=False),
            "ram_bytes": psutil.virtual_memory().total, "processor": platform.processor() or None}


def _reference_source(manifest: dict | None, reference: str | None):
    from edgekit.sources import resolve

    if reference is not None:
        return resolve(reference), None
    if not manifest:
        return None, "no manifest and no --reference: quality needs a float reference"
    src = manifest["source"]
    try:
        source = resolve(None if src["kind"] == "default" else src["path"])
    except InputError as exc:
        return None, f"the source model is not available ({exc.message}); pass --reference"
    if source.sha256 != src["sha256"]:
        return None, f"the source at {source.path} changed since export (hash differs); pass --reference"
    return source, None


def profile(artifact: str | Path, eval_text: str | None = None, reference: str | None = None,
            speed_cfg: SpeedConfig = SpeedConfig(), quality: bool = True, eval_tokens: int = 4096,
            progress: Callable[[str, int, int], None] = lambda d, a, b: None) -> dict[str, Any]:
    file, runtime, manifest = resolve_artifact(artifact)
    fmt = (manifest or {}).get("artifact", {}).get("format") or file.suffix.lstrip(".").lower()
    text, label = read_text(eval_text, "eval")
    result: dict[str, Any] = {"artifact": str(file), "format": fmt, "size_bytes": file.stat().st_size}
    if fmt == "gguf":
        from edgekit.converters.gguf_layout import gguf_weight_stats

        stats = gguf_weight_stats(file)
        result.update(bits_per_weight=stats["bits_per_weight"], parameters=stats["parameters"],
                      tensor_types=stats["tensor_types"])
    elif manifest:
        result["bits_per_weight"] = manifest.get("bits_per_weight")
    if manifest:
        result["recipe"] = manifest.get("recipe", {}).get("quant")

    progress("speed and memory (separate process)", 0, 1)
    speed = measure(str(file), text, speed_cfg)
    progress("speed and memory (separate process)", 1, 1)
    result.update(speed)

    result["quality"] = None
    if quality:
        source, why = _reference_source(manifest, reference)
        if source is None:
            result["quality_note"] = why
        else:
            import edgekit
            from edgekit.evaluate import measure_quality
            from edgekit.sources import load_reference

            ref = load_reference(source, progress)
            with edgekit.load(file) as session:
                result["quality"] = measure_quality(session, ref, source.sha256, text, label,
                                                    EvalConfig(max_tokens=eval_tokens), progress)
    result["host"] = host_info()
    return result
