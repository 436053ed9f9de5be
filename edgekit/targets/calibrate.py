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

# Three storage types with three different kernels: enough to fit one factor per type.
DEFAULT_RECIPES = ("f16", "q8_0", "q4_0")
CALIBRATION_CONFIG = SpeedConfig(reps=5, long_context=1024)


def default_artifacts(log: Callable[[str], None], progress) -> list[Path]:
    """The embedded model at the default recipes, converted once into the cache."""
    from edgekit.convert import convert

    root = cache_dir("calibration-artifacts")
    out = []
    for quant in DEFAULT_RECIPES:
        d = root / quant
        if not (d / "manifest.json").exists():
            log(f"converting the default model to {quant} for calibration")
            convert(None, "gguf", quant, d, force=True, progress=progress)
        out.append(d)
    return out


def measure_points(artifacts: list[str | Path], cfg: SpeedConfig = CALIBRATION_CONFIG,
                   progress=lambda d, a, b: None) -> list[dict[str, Any]]:
    text, _ = read_text(None)
    points = []
    for i, a in enumerate(artifacts):
        file, _, _ = resolve_artifact(a)
        facts = artifact_facts(file)
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
    groups: dict[tuple[str, str], list[dict]] = {}
    for p in points:
        groups.setdefault((p["facts"]["runtime"], p["facts"]["format"]), []).append(p)
    cals = []
    for group in groups.values():
        cal = pr.fit(group, host)
        pr.save(cal)
        cals.append(cal)
    return cals


def calibration_for(facts, speed: dict[str, Any] | None = None, host: dict[str, Any] | None = None) -> tuple[pr.Calibration, str]:
    """The stored factors for the artifact's runtime/format or, failing that, a fit from its own measurement."""
    cal = pr.load(facts.runtime, facts.format)
    if cal is not None:
        return cal, f"calibrated {cal.fitted} on {len(cal.points)} artifacts"
    if speed is None:
        from edgekit.errors import EdgekitError

        raise EdgekitError(f"no calibration for {facts.runtime}/{facts.format}", "run `edgekit calibrate` first")
    host = host or host_figures()
    cal = pr.fit([pr.point_from_speed(facts, speed)], host)
    return cal, "fitted from this artifact alone (run `edgekit calibrate` for per-type factors)"
