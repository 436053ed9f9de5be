"""Collect what ``edgekit report`` plots: per artifact its manifest, host measurement and predictions."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from edgekit.errors import EdgekitError, InputError


def collect(dirs: list[str | Path], targets: list[str] | None = None, measure_missing: bool = True,
            profile_dirs: list[str] | None = None, context: int = 1024, prompt_tokens: int = 128,
            progress: Callable[[str, int, int], None] = lambda d, a, b: None, remeasure: bool = False) -> dict[str, Any]:
    from edgekit.harness.quality import read_text
    from edgekit.profile import host_info, load_profile_result, save_profile_result
    from edgekit.session import resolve_artifact, runtime_of
    from edgekit.targets import predict as pr
    from edgekit.targets.calibrate import calibration_for
    from edgekit.targets.cloud import simulate
    from edgekit.targets.device_calibration import calibration_for_profile
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
        file, named, manifest = resolve_artifact(d)
        rt = runtime_of(file, named)
        kind = rt.kind(file)
        entry: dict[str, Any] = {
            "name": Path(d).name, "dir": str(d), "format": rt.format, "runtime": rt.name, "kind": kind,
            "recipe": (manifest or {}).get("recipe", {}).get("quant"), "size_bytes": (manifest or {}).get("size_bytes"),
            "bits_per_weight": (manifest or {}).get("bits_per_weight"), "quality": (manifest or {}).get("quality"),
            "measured": None, "predicted_host": None, "targets": {},
        }
        artifacts.append(entry)
        progress("collecting artifacts", i + 1, len(dirs))
        try:
            facts = artifact_facts(file)
        except EdgekitError as exc:  # still listed, with the reason it has no predictions
            entry["predictions_note"] = f"skipped: {exc.one_line()}"
            continue
        entry.update(size_bytes=facts.size_bytes, bits_per_weight=8 * facts.size_bytes / max(1, facts.parameters))
        why = rt.unavailable_reason()
        measured = None if remeasure else load_profile_result(file)
        if why:
            entry["measured_note"] = f"not measured: {why}"
            measured = None
        elif (measured is None or (kind == "encoder" and "tokens" not in measured)) and measure_missing:
            measured = _measure(file, kind, text)
            save_profile_result(file, measured)
        entry["quality"] = entry["quality"] or (measured or {}).get("quality")
        from edgekit.agent.remote import device_results

        entry["devices"] = {dev: _device_row(r) for dev, r in device_results(file).items()}  # `profile --device`
        if kind == "encoder":
            _encoder_entry(entry, facts, measured, names, profiles, host)
            continue
        if measured:
            entry["measured"] = {k: measured.get(k) for k in ("decode_tok_s", "ttft_ms", "prefill_tok_s", "peak_rss_bytes", "load_s", "measured_at")}
            cal, how = calibration_for(facts, measured, host)
            st = measured["settings"]
            entry["predicted_host"] = pr.predict(facts, cal, pr.host_machine(host), int(st["prompt_tokens"] + st["decode_tokens"] / 2),
                                                 st["prompt_tokens"], measured.get("n_ctx"))
        else:
            cal = pr.load(facts.runtime, facts.format)
            how = cal.describe() if cal else f"uncalibrated ({facts.runtime}/{facts.format}: nothing measured here)"
            if cal is None:
                unc = 1 / pr.UNCALIBRATED_EFFICIENCY
                cal = pr.Calibration(facts.runtime, facts.format, {}, unc, {}, unc, 0.0, 0.0, {})
        entry["calibration"] = how
        for n in names:
            p = profiles[n]
            if p.is_cloud():
                cloud.setdefault(n, simulate(facts, p, prompt_tokens))
                continue
            own = calibration_for_profile(p, facts)  # a device measured through `edgekit calibrate --device`
            entry["targets"][n] = pr.predict(facts, own or cal, pr.profile_machine(p), context, prompt_tokens) | {"kind": p.kind}
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


def _device_row(r: dict[str, Any]) -> dict[str, Any]:
    """What the report shows of a measurement made on a device through `edgekit agent`."""
    d = r.get("device") or {}
    energy = d.get("energy") or {}
    q = r.get("quality") or {}
    return {"decode_tok_s": r.get("decode_tok_s"), "ttft_ms": r.get("ttft_ms"), "prefill_tok_s": r.get("prefill_tok_s"),
            "peak_rss_bytes": r.get("peak_rss_bytes"), "load_s": r.get("load_s"), "kld_mean": q.get("kld_mean"),
            "top1_agreement": q.get("top1_agreement"), "joules_per_token": energy.get("joules_per_token"),
            "predicted_decode_tok_s": (r.get("predicted_device") or {}).get("decode_tok_s"),
            "cpu": ((d.get("facts") or {}).get("cpu") or {}).get("model"), "measured_at": r.get("measured_at"),
            "roofline_decode_percent": (r.get("roofline_percent") or {}).get("decode")}


def _measure(file: Path, kind: str, text: str) -> dict[str, Any]:
    if kind == "encoder":
        from edgekit.harness.embedding import EmbedSpeedConfig, measure, read_sentences

        return measure(str(file), read_sentences()[0], EmbedSpeedConfig(reps=3)) | {"kind": "encoder"}
    from edgekit.harness.speed import SpeedConfig, measure

    return measure(str(file), text, SpeedConfig(reps=3))


def _encoder_entry(entry: dict[str, Any], facts, measured: dict | None, names: list[str], profiles: dict, host) -> None:
    """Texts/s and latency per batch: measured here, predicted here and per target device."""
    from edgekit.targets import encoder_predict as ep
    from edgekit.targets import predict as pr

    cal = ep.load(facts.runtime, facts.format)
    how = cal.describe() if cal else None
    if measured:
        entry["measured"] = {k: measured.get(k) for k in ("texts_s", "batch_latency_ms", "single_latency_ms",
                                                          "peak_rss_bytes", "load_s", "measured_at")}
        entry["measured"]["batch_size"] = measured["settings"]["batch_size"]
        if cal is None:
            cal, how = ep.fit([ep.point_from_measurement(facts, measured, entry["name"])], host), "fitted from this encoder's own measurement"
        tokens = float(measured["tokens"]["median"])
        # the host prediction at the measured calls' own sizes, so it compares with the measurement
        tok = measured["tokens"]
        hm = pr.host_machine(host)
        single = ep.predict(facts, cal, hm, float(tok["single_median"]), (1,))
        batch = ep.predict(facts, cal, hm, float(tok["batch_padded_median"]), (int(measured["settings"]["batch_size"]),))
        entry["predicted_host"] = {"single_latency_ms": single["latency_ms"], "batch_latency_ms": batch["latency_ms"],
                                   "calibration": batch["calibration"]}
    else:
        cal = cal or ep.uncalibrated(facts)
        how = how or f"uncalibrated ({facts.runtime}/{facts.format} encoder: nothing measured here)"
        tokens = ep.typical_tokens(facts)
    entry["calibration"] = how
    entry["tokens_per_text"] = tokens
    for n in names:
        p = profiles[n]
        if not p.is_cloud():  # cloud baselines are priced per generated token: decoders only
            entry["targets"][n] = ep.predict(facts, cal, pr.profile_machine(p), tokens) | {"kind": p.kind}
