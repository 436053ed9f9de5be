"""Run a sweep: candidates from the spec, shared structural prefixes built once, every candidate converted, then
measured per device, all through a content-addressed cache under ``OUT/cache`` so a re-run does only what is
missing and an interrupted sweep resumes.

Cache keys hash what decides the result: the source's sha256, the exact ordered passes with their parameters,
the exporter, edgekit's version, the calibration setting and the evaluation text's sha256 (and, for a
measurement, the device and the measuring settings). Stages run one after another (prefixes, conversions,
measurements) so nothing converts while a device is timed.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

from edgekit.sweep import tasks
from edgekit.sweep.executors import LocalExecutor, RayExecutor, cores
from edgekit.sweep.spec import SweepSpec


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _eval_sha() -> str:
    from edgekit.harness.quality import default_text_path

    return hashlib.sha256(default_text_path("eval").read_bytes()).hexdigest()


def run_sweep(spec: SweepSpec, out: str | Path, workers: int | None = None, ray: str | None = None,
              progress: Callable[[str, int, int], None] = lambda d, a, b: None, log=lambda s: None) -> dict[str, Any]:
    from edgekit import __version__
    from edgekit.sources import resolve
    from edgekit.targets.profiles import get_profile

    out = Path(out).resolve()  # task results name artifacts by path: the same from every worker
    t_start = time.perf_counter()
    src = resolve(spec.model)  # a missing source is one line before any work
    measured = [d for d in spec.targets if d == "host" or d.startswith("agent:")]
    profiles = [d for d in spec.targets if d not in measured]
    for p in profiles:
        get_profile(p)  # an unknown device is one line now
    if not measured:
        measured = ["host"]  # predictions for profiles come from a measurement here
    for d in measured:
        if d.startswith("agent:"):
            from edgekit.agent.devices import resolve as resolve_device

            resolve_device(d.removeprefix("agent:"))
    workers = max(1, workers or 1)
    threads = max(1, cores() // workers)
    executor = RayExecutor(ray, measured, workers) if ray else LocalExecutor(workers)
    cache = out / "cache"
    base = {"source": src.sha256, "version": __version__, "calib_generated": spec.calib_generated, "eval": _eval_sha(),
            "eval_tokens": spec.eval_tokens}
    cands = spec.candidates()
    stats = {"prefixes": {"computed": 0, "cached": 0}, "conversions": {"computed": 0, "cached": 0},
             "measurements": {"computed": 0, "cached": 0}}
    try:
        # 1. shared structural prefixes (the same pruned + recovered model for every storage pass on it)
        prefixes: dict[str, dict] = {}
        for c in cands:
            if c.structural():
                prefixes.setdefault(_key(base, c.structural()), {"structural": c.structural()})
        calls = [(tasks.build_prefix, (str(cache / f"prefix-{k}"), spec.model, v["structural"], spec.calib_generated, threads,
                                       spec.eval_tokens), {"num_cpus": threads}) for k, v in prefixes.items()]
        for v, r in zip(prefixes.values(), executor.map(calls, lambda i, r: progress("structural prefixes", i + 1, len(calls)))):
            v["result"] = r
            stats["prefixes"]["cached" if r.get("cached") else "computed"] += 1
        # 2. conversions
        rows = []
        calls = []
        for c in cands:
            pkey = _key(base, c.structural()) if c.structural() else None
            pre = prefixes[pkey]["result"] if pkey else None
            key = _key(base, c.passes(), c.format)
            row = {"candidate": c.name, "key": key, "quant": c.quant, "format": c.format, "prune": c.prune, "recover": c.recover,
                   "rank": c.rank, "passes": c.passes(), "prefix": pkey}
            rows.append(row)
            if pre is not None and not pre["ok"]:
                row["conversion"] = {"ok": False, "error": f"structural prefix failed: {pre['error']}", "cached": True}
                continue
            source = pre["source"] if pre else spec.model
            # the storage pass alone on the prefix's float model (its structural passes are in the prefix)
            calls.append((row, (tasks.convert_candidate, (str(cache / f"cand-{key}"), source, [{"pass": c.quant}] if pre else c.passes(),
                                                           c.format, spec.calib_generated, threads, spec.eval_tokens),
                                {"num_cpus": threads})))
        results = executor.map([call for _, call in calls], lambda i, r: progress("conversions", i + 1, len(calls)))
        for (row, _), r in zip(calls, results):
            row["conversion"] = r
            stats["conversions"]["cached" if r.get("cached") else "computed"] += 1
        # 3. measurements, one device at a time per device
        for device in measured:
            calls = []
            for row in rows:
                conv = row["conversion"]
                if not conv["ok"]:
                    continue
                mkey = _key(row["key"], device, spec.reps, spec.decode_tokens, profiles, spec.eval_tokens)
                calls.append((row, (tasks.measure_candidate, (str(cache / f"cand-{row['key']}" / f"measure-{mkey}"), conv["artifact"],
                                                               device, spec.model, profiles, spec.reps, spec.eval_tokens,
                                                               spec.decode_tokens, None if device != "host" else cores(),
                                                               spec.timeout_s),
                                    {"num_cpus": cores() if device == "host" else 0.5, "device": device, "exclusive": True})))
            n = len(calls)
            results = executor.map([call for _, call in calls],
                                   lambda i, r, d=device, n=n: progress(f"measuring on {d}", i + 1, n))
            for (row, _), r in zip(calls, results):
                row.setdefault("measurements", {})[device] = r
                stats["measurements"]["cached" if r.get("cached") else "computed"] += 1
    finally:
        executor.close()
    from edgekit.sweep.results import finish

    return finish(spec, out, rows, measured, profiles, stats | {"wall_s": time.perf_counter() - t_start, "executor": executor.name,
                                                                  "workers": workers, "threads_per_task": threads})
