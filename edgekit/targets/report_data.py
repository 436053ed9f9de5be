"""Collect what ``edgekit report`` plots: per artifact its manifest, host measurement and predictions."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from edgekit.errors import InputError


def collect(dirs: list[str | Path], targets: list[str] | None = None, measure_missing: bool = True,
            profile_dirs: list[str] | None = None, context: int = 1024, prompt_tokens: int = 128,
            progress: Callable[[str, int, int], None] = lambda d, a, b: None, remeasure: bool = False) -> dict[str, Any]:
    from edgekit.harness.quality import read_text
    from edgekit.harness.speed import SpeedConfig, measure
    from edgekit.profile import host_info, load_profile_result, save_profile_result
    from edgekit.session import resolve_artifact
    from edgekit.targets import predict as pr
    from edgekit.targets.calibrate import calibration_for
    from edgekit.targets.cloud import simulate
    from edgekit.targets.facts import artifact_facts
    from edgekit.targets.host import host_figures
    from edgekit.targets.profiles import load_profiles

    profiles = load_profiles(profile_dirs)
    names = targets or sorted(profiles)
    unknown = [n for n in names if n not in profiles]
    if unknown:
        raise InputError(f"unknown target(s) {', '.join(unknown)}", f"known: {', '.join(sorted(profiles))}")
    host = host_figures()
    text, _ = read_text(None)
    artifacts, cloud = [], {}
    for i, d in enumerate(dirs):
        file, _, manifest = resolve_artifact(d)
        facts = artifact_facts(file)
        measured = None if remeasure else load_profile_result(file)
        if measured is None and measure_missing:
            measured = measure(str(file), text, SpeedConfig(reps=3))
            save_profile_result(file, measured)
        entry: dict[str, Any] = {
            "name": Path(d).name, "dir": str(d), "format": facts.format,
            "recipe": (manifest or {}).get("recipe", {}).get("quant"), "size_bytes": facts.size_bytes,
            "bits_per_weight": 8 * facts.size_bytes / max(1, facts.parameters),
            "quality": (manifest or {}).get("quality") or (measured or {}).get("quality"),
            "measured": None, "predicted_host": None, "targets": {},
        }
        cal = None
        if measured:
            entry["measured"] = {k: measured.get(k) for k in ("decode_tok_s", "ttft_ms", "prefill_tok_s", "peak_rss_bytes", "load_s", "measured_at")}
            cal, _ = calibration_for(facts, measured, host)
            st = measured["settings"]
            entry["predicted_host"] = pr.predict(facts, cal, pr.host_machine(host), int(st["prompt_tokens"] + st["decode_tokens"] / 2),
                                                 st["prompt_tokens"], measured.get("n_ctx"))
        else:
            cal, _ = calibration_for(facts)
        for n in names:
            p = profiles[n]
            if p.is_cloud():
                cloud.setdefault(n, simulate(facts, p, prompt_tokens))
                continue
            entry["targets"][n] = pr.predict(facts, cal, pr.profile_machine(p), context, prompt_tokens) | {"kind": p.kind}
        artifacts.append(entry)
        progress("collecting artifacts", i + 1, len(dirs))
    hi = host_info()
    return {
        "title": "edgekit report",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": hi | {"copy_bandwidth_gbs": host["read_bandwidth_bytes_s"] / 1e9,
                      "compute_f32_gflops": host["compute_flops"]["f32"] / 1e9},
        "artifacts": artifacts,
        "cloud": cloud,
        "context": context,
        "prompt_tokens": prompt_tokens,
    }
