"""``edgekit calibrate --device NAME``: measure artifacts on a device through its agent, fit the predictor's
efficiency factors for that device, and store the result as a measured device profile.

The profile (``$EDGEKIT_CONFIG_DIR/profiles/NAME.toml``, searched after the built-in profiles) holds the
figures the agent measured there (read bandwidth, f32 matmul rate, RAM, storage read), each with the source
"measured on NAME (URL), DATE"; the fitted factors per runtime/format sit beside it in
``NAME.calibration.json``. Predictions for that profile then rest on the device's own kernels, and say so.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from edgekit.targets import predict as pr


def _toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid TOML basic string


def write_profile(name: str, url: str, facts: dict[str, Any], machine: dict[str, Any], cals: list[pr.Calibration],
                  folder: Path) -> Path:
    from edgekit.atomic import write_atomic

    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    src = f"measured on {name} ({url}), {date}"
    cpu = facts.get("cpu", {})
    runtimes = sorted({c.runtime for c in cals})
    formats = sorted({c.format for c in cals})
    figs = {
        "memory_bandwidth": (machine["read_bandwidth_bytes_s"] / 1e9, "GB/s",
                             f"{src}: {machine['threads_used']}-thread read bandwidth (the predictor's decode ceiling; "
                             "not the datasheet peak)"),
        "copy_bandwidth": (machine["read_bandwidth_bytes_s"] / 1e9, "GB/s", f"{src}: the same read bandwidth, which the "
                           "efficiency factors beside this profile were fitted against"),
        "compute_f32": (machine["compute_flops"]["f32"] / 1e9, "GFLOPS", f"{src}: numpy f32 matrix multiply, all cores"),
        "ram": (facts["ram_total_bytes"] / 1e9, "GB", f"{src}: total RAM the OS reports"),
        "memory_budget": (0.8, "fraction", "assumption: 20% of RAM is left for the OS and other programs"),
        "storage_read": ((machine.get("storage_read_bytes_s") or 100e6) / 1e6, "MB/s",
                         f"{src}: a 256 MiB file read back after dropping it from the page cache" if machine.get("storage_read_bytes_s")
                         else "assumption: 100 MB/s (the device could not drop its page cache to measure storage)"),
    }
    described = f"{cpu.get('model') or facts.get('os', {}).get('machine') or 'device'}, measured through edgekit agent"
    lines = [f"# written by `edgekit calibrate --device {name}`; edit freely, or run it again to re-measure",
             f"name = {_toml_str(name)}", 'kind = "cpu"',
             f"description = {_toml_str(described)}",
             f"runtimes = {json.dumps(runtimes)}", f"formats = {json.dumps(formats)}", "",
             "[measured]", f"device = {_toml_str(name)}", f"url = {_toml_str(url)}", f"date = {_toml_str(date)}",
             f"calibration = {_toml_str(name + '.calibration.json')}", ""]
    for key, (value, unit, source) in figs.items():
        lines += [f"[figures.{key}]", f"value = {value:.6g}", f"unit = {_toml_str(unit)}", f"source = {_toml_str(source)}", ""]
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / f"{name}.calibration.json",
                 json.dumps({f"{c.runtime}/{c.format}": asdict(c) for c in cals}, indent=2))
    path = folder / f"{name}.toml"
    write_atomic(path, "\n".join(lines))
    from edgekit.targets.profiles import load_profile

    load_profile(path)  # what was written reads back under the strict loader
    return path


def calibration_for_profile(prof, facts) -> pr.Calibration | None:
    """The factors `edgekit calibrate --device` fitted on this profile's device for the artifact's runtime/format."""
    measured = getattr(prof, "measured", None)
    if not measured:
        return None
    from edgekit.atomic import read_json_or_none

    data = read_json_or_none(Path(prof.path).parent / measured["calibration"])
    entry = data.get(f"{facts.runtime}/{facts.format}") if isinstance(data, dict) else None
    return pr.Calibration(**entry) if isinstance(entry, dict) else None


def predict_for_device(device: str, facts, context: int, prompt_tokens: int, n_ctx: int | None = None) -> dict[str, Any] | None:
    """The calibrated prediction for ``device`` (a measured profile of that name), or None."""
    from edgekit.errors import InputError
    from edgekit.targets.profiles import get_profile

    try:
        prof = get_profile(device)
    except InputError:
        return None
    cal = calibration_for_profile(prof, facts)
    if cal is None:
        return None
    return pr.predict(facts, cal, pr.profile_machine(prof), context, prompt_tokens, n_ctx) | {"kind": prof.kind}


def calibrate_device(device: str, artifacts: list[str] | None, token: str | None = None,
                     log: Callable[[str], None] = lambda s: None, progress=lambda d, a, b: None) -> dict[str, Any]:
    """Measure ``artifacts`` (default: the embedded model at f16, q8_0 and q4_0 in each format the device runs) on
    the device, fit, and write the measured profile. Returns {"profile", "calibrations", "machine", "points"}."""
    from edgekit.agent.devices import config_dir
    from edgekit.agent.remote import connect, measure_on_device
    from edgekit.harness.quality import read_text
    from edgekit.session import resolve_artifact
    from edgekit.targets.calibrate import CALIBRATION_CONFIG, default_artifacts
    from edgekit.targets.facts import artifact_facts

    name, client = connect(device, token)
    facts = client.device()
    if artifacts:
        paths = [Path(a) for a in artifacts]
    else:
        fmts = tuple(f for f, rt in (("gguf", "llamacpp"), ("onnx", "onnxruntime")) if rt in facts.get("runtimes", {}))
        paths = default_artifacts(log, progress, fmts)
    text, _ = read_text(None)
    machine, points = None, []
    for i, a in enumerate(paths):
        file, _, _ = resolve_artifact(a, verify=True)
        log(f"measuring {a} on {name}")
        _, job = measure_on_device(client, a, text, CALIBRATION_CONFIG, ["speed", "machine"], None, progress=progress)
        machine = machine or job["machine"]
        speed = job["speed"] | {"name": str(a)}
        points.append(pr.point_from_speed(artifact_facts(file), speed) | {"speed": speed})
        progress(f"measuring calibration artifacts on {name}", i + 1, len(paths))
    groups: dict[tuple[str, str], list[dict]] = {}
    for p in points:
        groups.setdefault((p["facts"]["runtime"], p["facts"]["format"]), []).append(p)
    cals = []
    for group in groups.values():
        cal = pr.fit(group, machine)
        cal.device = name
        cals.append(cal)
    path = write_profile(name, client.url, facts, machine, cals, config_dir() / "profiles")
    return {"profile": str(path), "calibrations": cals, "machine": machine, "points": points}
