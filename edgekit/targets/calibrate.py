"""``edgekit calibrate``: measure artifacts on this machine and fit the predictor's efficiency factors."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from edgekit.cache import cache_dir
from edgekit.harness.quality import read_text
from edgekit.harness.speed import SpeedConfig, measure
from edgekit.session import resolve_artifact
from edgekit.targets import predict as pr
from edgekit.targets.facts import artifact_facts
from edgekit.targets.host import host_figures

# Three storage types with three different kernels per runtime: enough to fit one factor per type.
# GGUF (llama.cpp) F16 / Q8_0 / Q4_0; ONNX (ONNX Runtime) F16 / MatMulNBits 8 / MatMulNBits 4.
DEFAULT_RECIPES = {"gguf": ("f16", "q8_0", "q4_0"), "onnx": ("f16", "q8_0", "q4_0")}
CALIBRATION_CONFIG = SpeedConfig(reps=5, long_context=1024)


def default_artifacts(log: Callable[[str], None], progress, formats: tuple[str, ...] = tuple(DEFAULT_RECIPES)) -> list[Path]:
    """The embedded model at the default recipes of each format, converted once into the cache."""
    from edgekit.pipeline import ConvertRequest, convert

    root = cache_dir("calibration-artifacts")
    out = []
    for fmt in formats:
        for quant in DEFAULT_RECIPES[fmt]:
            d = root / (quant if fmt == "gguf" else f"{fmt}-{quant}")  # GGUF keeps the cache layout it had
            if not (d / "manifest.json").exists():
                log(f"converting the default model to {fmt} {quant} for calibration")
                convert(ConvertRequest(None, fmt, quant, d, force=True, progress=progress))
            out.append(d)
    return out


def measure_points(artifacts: list[str | Path], cfg: SpeedConfig = CALIBRATION_CONFIG,
                   progress=lambda d, a, b: None) -> list[dict[str, Any]]:
    text, _ = read_text(None)
    from edgekit.session import artifact_kind

    points = []
    for i, a in enumerate(artifacts):
        file, _, _ = resolve_artifact(a)
        facts = artifact_facts(file)
        if artifact_kind(file) == "encoder":  # texts/s and latency per batch, not tokens
            from edgekit.harness.embedding import EmbedSpeedConfig, read_sentences
            from edgekit.harness.embedding import measure as measure_encoder
            from edgekit.targets import encoder_predict as ep

            speed = measure_encoder(str(file), read_sentences()[0], EmbedSpeedConfig(reps=cfg.reps))
            points.append(ep.point_from_measurement(facts, speed, Path(str(a)).name) | {"speed": speed, "encoder": True})
        else:
            speed = measure(str(file), text, cfg)
            speed["name"] = str(a)
            points.append(pr.point_from_speed(facts, speed) | {"speed": speed})
        progress("measuring calibration artifacts", i + 1, len(artifacts))
    return points


def calibrate(artifacts: list[str] | None = None, remeasure_host: bool = False,
              log: Callable[[str], None] = lambda s: None, progress=lambda d, a, b: None) -> list[pr.Calibration]:
    host = host_figures(remeasure_host)
    paths = list(artifacts) if artifacts else default_artifacts(log, progress)
    points = measure_points(paths, progress=progress)
    groups: dict[tuple[str, str, bool], list[dict]] = {}
    for p in points:
        groups.setdefault((p["facts"]["runtime"], p["facts"]["format"], bool(p.get("encoder"))), []).append(p)
    cals = []
    for (_, _, encoder), group in groups.items():
        if encoder:
            from edgekit.targets import encoder_predict as ep

            cal = ep.fit([{k: v for k, v in p.items() if k not in ("speed", "encoder")} for p in group], host)
            ep.save(cal)
        else:
            cal = pr.fit(group, host)
            pr.save(cal)
        cals.append(cal)
    return cals


def calibration_for(facts, speed: dict[str, Any] | None = None, host: dict[str, Any] | None = None) -> tuple[pr.Calibration, str]:
    """The stored factors for the artifact's runtime/format or, failing that, a fit from its own measurement."""
    cal = pr.load(facts.runtime, facts.format)
    if cal is not None:
        return cal, cal.describe()
    if speed is None:
        from edgekit.errors import EdgekitError

        raise EdgekitError(f"no calibration for {facts.runtime}/{facts.format}", "run `edgekit calibrate` first")
    host = host or host_figures()
    cal = pr.fit([pr.point_from_speed(facts, speed)], host)
    if "long_context" not in speed:
        # one context measured: how the time splits between weights and KV cache is not identifiable
        # from it (any split fits one point), so both stream at one efficiency, solved from that point
        (ctx, tok_s), = pr.point_from_speed(facts, speed)["decode"]
        # F32 included: in a tiny all-F32 model the F32 bytes are the whole stream and can be read
        # faster than the copy rate (they sit in cache), so leaving them at 1.0 would make x negative
        streamed = sum(facts.bytes_by_type.values()) + facts.kv_bytes_per_token * ctx
        if streamed > 0:
            x = host["read_bandwidth_bytes_s"] / tok_s / streamed
            cal.x = {t: x for t in facts.bytes_by_type}
            cal.x_kv = cal.x_shared = x
    return cal, (f"{facts.runtime}/{facts.format} fitted from this artifact alone "
                 "(run `edgekit calibrate` for per-type factors)")
