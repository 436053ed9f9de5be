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
            progress: Callable[[str, int, int], None] = lambda d, a, b: None, targets: list[str] = (),
            context: int | None = None, prompt_tokens: int | None = None, cloud_url: str | None = None,
            profile_dirs: list[str] | None = None) -> dict[str, Any]:
    file, runtime, manifest = resolve_artifact(artifact)
    from edgekit.runtimes.onnxruntime_encoder import is_encoder_artifact

    if is_encoder_artifact(file):  # encoders: embedding cosine, texts/s, latency per batch
        from edgekit.harness.embedding import profile_encoder

        result = profile_encoder(file, manifest, eval_text, reference, speed_cfg.reps, quality, progress=progress)
        result["host"] = host_info()
        save_profile_result(file, result)
        return result
    from edgekit.registry import RUNTIMES
    from edgekit.session import _runtime_for_suffix

    rt_name = runtime or _runtime_for_suffix(file)
    rt = RUNTIMES.get(rt_name) if rt_name else None
    why = getattr(rt, "unavailable_reason", lambda: None)()
    if why:  # the runtime does not exist on this OS (Core ML off macOS): size, bits/weight, predictions
        return rt.unmeasured_profile(file, manifest, why, list(targets), profile_dirs, context, prompt_tokens)
    if targets:  # fail on an unknown target before minutes of measuring
        from edgekit.targets.profiles import get_profile

        profiles = {t: get_profile(t, profile_dirs) for t in targets if t != "host"}
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
        result["recipe_label"] = manifest.get("recipe", {}).get("label", result["recipe"])

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
    save_profile_result(file, result)
    result.update(predictions(file, speed, text, targets, context, prompt_tokens, profiles if targets else {}, cloud_url))
    return result


def _profile_cache(file: Path) -> Path:
    from edgekit.cache import cache_dir, sha256_file

    return cache_dir("profiles") / f"{sha256_file(file)[:24]}.json"


def save_profile_result(file: Path, result: dict[str, Any]) -> None:
    """Keep the latest measured figures per artifact (by content hash) for `edgekit report`."""
    import json

    import time

    _profile_cache(file).write_text(json.dumps(result | {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))


def load_profile_result(file: Path) -> dict[str, Any] | None:
    import json

    path = _profile_cache(file)
    return json.loads(path.read_text()) if path.exists() else None


def predictions(file: Path, speed: dict[str, Any], text: str, targets, context, prompt_tokens, profiles,
                cloud_url) -> dict[str, Any]:
    """% of roofline on the host always; predicted figures per target and cloud baselines when asked."""
    from edgekit.targets import predict as pr
    from edgekit.targets.calibrate import calibration_for
    from edgekit.targets.facts import artifact_facts
    from edgekit.targets.host import host_figures

    try:
        facts = artifact_facts(file)
    except InputError:
        return {}
    host = host_figures()
    out: dict[str, Any] = {"roofline_percent": pr.roofline_percent(facts, speed, host)}
    if not targets and not cloud_url:
        return out
    cal, how = calibration_for(facts, speed, host)
    st = speed["settings"]
    measured_ctx = st["prompt_tokens"] + st["decode_tokens"] / 2
    out["calibration"] = how
    out["predicted_host"] = pr.predict(facts, cal, pr.host_machine(host), int(measured_ctx), st["prompt_tokens"], speed["n_ctx"])
    ctx = context or int(measured_ctx)
    p = prompt_tokens or st["prompt_tokens"]
    out["targets"] = {}
    cloud: dict[str, Any] = {}
    for name in targets:
        if name == "host":
            out["targets"]["host"] = pr.predict(facts, cal, pr.host_machine(host), ctx, p) | {"kind": "cpu"}
            continue
        prof = profiles[name]
        if prof.is_cloud():
            from edgekit.targets.cloud import simulate

            cloud[name] = simulate(facts, prof, p)
            continue
        out["targets"][name] = pr.predict(facts, cal, pr.profile_machine(prof), ctx, p) | {"kind": prof.kind}
    if cloud_url:
        from edgekit.targets.cloud import measure_endpoint

        cloud["endpoint"] = measure_endpoint(cloud_url, text[:2000], max_tokens=st["decode_tokens"])
    if cloud:
        out["cloud"] = cloud
    return out
