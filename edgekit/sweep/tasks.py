"""The work of a sweep, as plain functions of plain arguments (JSON-able in, JSON-able out), so the same
function runs in a local worker process or as a Ray task: build a shared structural prefix, convert one
candidate, measure one candidate on one device. Each writes its result atomically into the content-addressed
cache and returns it; a result already there is returned without recomputing."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

RESULT = "result.json"


def thread_budget(threads: int) -> None:
    """Keep one task to its share of the cores: BLAS / OpenMP pools and torch read these before they start."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "EDGEKIT_THREADS"):  # the last: llama.cpp / ORT
        os.environ[var] = str(threads)
    try:
        import torch

        torch.set_num_threads(threads)
    except Exception:  # noqa: BLE001 - no torch (a measuring worker) or already fixed
        pass


def _done(folder: Path) -> dict[str, Any] | None:
    from edgekit.atomic import read_json_or_none

    r = read_json_or_none(folder / RESULT)
    return r if isinstance(r, dict) and r.get("ok") is not None else None


def _finish(folder: Path, result: dict[str, Any]) -> dict[str, Any]:
    from edgekit.atomic import write_atomic

    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / RESULT, json.dumps(result, indent=2))
    return result


def _errors(fn):
    """A candidate that fails is a result (ok: false, the one-line reason), never an exception that stops the sweep."""
    def run(folder: str, *args, **kw):
        folder_p = Path(folder)
        cached = _done(folder_p)
        if cached is not None:
            return cached | {"cached": True}
        t0 = time.perf_counter()
        try:
            out = fn(folder_p, *args, **kw)
            out = {"ok": True, **out}
        except Exception as exc:  # noqa: BLE001 - recorded per candidate
            from edgekit.errors import EdgekitError

            msg = exc.one_line() if isinstance(exc, EdgekitError) else f"{type(exc).__name__}: {str(exc)[:300]}"
            out = {"ok": False, "error": msg}
        out["seconds"] = time.perf_counter() - t0
        out["pid"] = os.getpid()
        return _finish(folder_p, out) | {"cached": False}
    run.__name__ = fn.__name__
    run.__qualname__ = fn.__qualname__
    return run


@_errors
def build_prefix(folder: Path, model: str | None, structural: list[dict], calib_generated: int | None, threads: int,
                 eval_tokens: int) -> dict[str, Any]:
    """The structural passes once (pruning with its recovery, low-rank), kept as an f32 GGUF: the float source of
    every storage pass tried on it."""
    thread_budget(threads)
    from edgekit import recipes
    from edgekit.pipeline import ConvertRequest, convert

    recipe = recipes.check(recipes.Recipe("sweep-prefix", [*structural, {"pass": "fp32"}]))
    out = folder / "artifact"
    manifest = convert(ConvertRequest(model, "gguf", None, out, force=True, recipe=recipe, calib_generated=calib_generated,
                                      eval_tokens=eval_tokens))
    source = out / manifest["artifact"]["file"]
    if calib_generated != 0:
        # every storage pass on this prefix calibrates on text the prefix's float model writes: write it once here,
        # not in each of the conversions that would otherwise all generate the same samples side by side
        from edgekit import calibration as cal
        from edgekit.sources import resolve

        cal.generated_sequences(resolve(str(source)), cal.settings_for(calib_generated or cal.default_tokens()))
    return {"source": str(source), "manifest_quality": manifest.get("quality")}


@_errors
def convert_candidate(folder: Path, source: str | None, passes: list[dict], fmt: str, calib_generated: int | None,
                      threads: int, eval_tokens: int) -> dict[str, Any]:
    thread_budget(threads)
    from edgekit import recipes
    from edgekit.pipeline import ConvertRequest, convert

    recipe = recipes.check(recipes.Recipe("sweep", passes))
    out = folder / "artifact"
    manifest = convert(ConvertRequest(source, fmt, None, out, force=True, recipe=recipe, calib_generated=calib_generated,
                                      eval_tokens=eval_tokens))
    return {"artifact": str(out), "size_bytes": manifest.get("size_bytes"), "bits_per_weight": manifest.get("bits_per_weight")}


@_errors
def measure_candidate(folder: Path, artifact: str, device: str, reference: str | None, profiles: list[str], reps: int,
                      eval_tokens: int, decode_tokens: int, threads: int | None, timeout_s: float) -> dict[str, Any]:
    """Measure on ``device`` ("host", or "agent:NAME"), quality against ``reference`` (the sweep's source), with the
    predictions for ``profiles`` from the same measurement."""
    from edgekit.harness.speed import SpeedConfig

    cfg = SpeedConfig(reps=reps, decode_tokens=decode_tokens, n_threads=threads)
    ref = reference or "default"
    if device == "host":
        from edgekit.profile import profile

        r = profile(artifact, reference=ref, speed_cfg=cfg, eval_tokens=eval_tokens, targets=profiles)
    else:
        from edgekit.agent.remote import profile_on_device

        r = profile_on_device(artifact, device.removeprefix("agent:"), reference=ref, speed_cfg=cfg, eval_tokens=eval_tokens,
                              targets=profiles, timeout_s=timeout_s)
    return {"profile": r}
