"""``edgekit profile OUT --device NAME|URL``: the same measurement as a local profile, run on a device.

The host verifies the artifact, pushes what the device lacks, computes the quality inputs here (evaluation
windows tokenized by the artifact's tokenizer and the reference's top-k statistics, from the same cache a
local profile uses), and the agent runs the speed harness and scores its own runtime's logits against
them. The result has every key a local profile has, ``host`` being the device's, plus ``device``.
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgekit.harness.quality import EvalConfig, read_text
from edgekit.harness.speed import SpeedConfig


def quality_blob(wins: list[list[int]], stats, cfg: EvalConfig, label: str) -> bytes:
    """The quality inputs as an .npz of plain arrays (the agent loads it with allow_pickle=False)."""
    buf = io.BytesIO()
    meta = json.dumps({"ctx": cfg.ctx, "max_tokens": cfg.max_tokens, "topk": cfg.topk, "label": label}).encode()
    np.savez_compressed(buf, window_ids=np.concatenate([np.asarray(w, np.int64) for w in wins]),
                        window_lengths=np.asarray([len(w) for w in wins], np.int64),
                        topk_ids=stats.topk_ids, topk_logp=stats.topk_logp, nll=stats.nll,
                        meta=np.frombuffer(meta, dtype=np.uint8))
    return buf.getvalue()


def speed_spec(cfg: SpeedConfig) -> dict[str, Any]:
    return {"prompt_tokens": cfg.prompt_tokens, "prefill_tokens": cfg.prefill_tokens, "decode_tokens": cfg.decode_tokens,
            "reps": cfg.reps, "load_reps": cfg.load_reps, "long_context": cfg.long_context,
            **({"threads": cfg.n_threads} if cfg.n_threads else {})}


def connect(device: str, token: str | None = None):
    from edgekit.agent.client import AgentClient
    from edgekit.agent.devices import resolve

    name, url, tok = resolve(device, token)
    client = AgentClient(url, tok)
    health = client.health()
    if health.get("agent") != "edgekit":
        from edgekit.errors import InputError

        raise InputError(f"{url} does not answer like an edgekit agent", "check the URL and port")
    return name, client


def measure_on_device(client, artifact: Path, text: str, cfg: SpeedConfig, measure: list[str], quality_bytes: bytes | None,
                      backend: dict | None = None, timeout_s: float = 1800, progress=lambda d, a, b: None,
                      custom_text: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """(push report, job result) of one job on the device."""
    pushed = client.push_artifact(artifact, progress)
    spec: dict[str, Any] = {"artifact": pushed["artifact"], "measure": measure, "timeout_s": timeout_s,
                            **speed_spec(cfg), "backend": backend or {}}
    with tempfile.TemporaryDirectory() as tmp:
        if custom_text:
            spec["text_blob"] = client.upload_bytes(text.encode(), Path(tmp))
        if quality_bytes is not None:
            spec["quality"] = {"blob": client.upload_bytes(quality_bytes, Path(tmp))}
    return pushed, client.run(spec, progress)


def profile_on_device(artifact: str | Path, device: str, token: str | None = None, eval_text: str | None = None,
                      reference: str | None = None, speed_cfg: SpeedConfig | None = None, quality: bool = True,
                      eval_tokens: int = 4096, progress: Callable[[str, int, int], None] = lambda d, a, b: None,
                      targets: list[str] = (), profile_dirs: list[str] | None = None, backend: dict | None = None,
                      timeout_s: float = 1800) -> dict[str, Any]:
    from edgekit import profile as lp
    from edgekit.session import resolve_artifact, runtime_of

    speed_cfg = speed_cfg or SpeedConfig()
    file, runtime, manifest = resolve_artifact(artifact, verify=True)  # a tampered artifact is not pushed
    rt = runtime_of(file, runtime)
    if rt.kind(file) == "encoder":
        from edgekit.errors import InputError

        raise InputError("profiling an encoder on a device is not supported yet", "profile it on the host")
    name, client = connect(device, token)
    facts = client.device()
    profiles = {}
    if targets:
        from edgekit.targets.profiles import get_profile

        profiles = {t: get_profile(t, profile_dirs) for t in targets if t != "host"}
    text, label = read_text(eval_text, "eval")
    fmt = (manifest or {}).get("artifact", {}).get("format") or rt.format
    result = lp.artifact_summary(file, fmt, manifest)

    cfg = EvalConfig(max_tokens=eval_tokens)
    qblob, qextra, qnote = None, {}, None
    if quality:
        ref, why = (lp._explicit_reference(reference), None) if reference is not None else lp._manifest_reference(manifest)
        if ref is None:
            qnote = why
        else:
            inputs = lp.quality_inputs(file, ref, text, cfg, progress)
            if isinstance(inputs, str):
                qnote = inputs
            else:
                wins, stats, qextra, qnote = inputs
                qblob = quality_blob(wins, stats, cfg, label)
    measure = ["speed", "machine"] + (["quality"] if qblob is not None else [])
    artifact_dir = Path(artifact) if Path(artifact).is_dir() else file
    t0 = time.perf_counter()
    pushed, job = measure_on_device(client, artifact_dir, text, speed_cfg, measure, qblob, backend, timeout_s, progress,
                                    custom_text=eval_text is not None)
    speed = job["speed"]
    result.update(speed)
    result["quality"] = (job["quality"] | qextra) if job.get("quality") else None
    if qnote:
        result["quality_note"] = qnote
    result["host"] = job["host"]
    result["device"] = {"name": name, "url": client.url, "facts": facts, "before": job["device_before"],
                        "after": job["device_after"], "energy": job.get("energy"), "machine": job.get("machine"),
                        "push": pushed, "wall_s": time.perf_counter() - t0, "finished_at": job.get("finished_at")}
    result.update(device_predictions(file, speed, job.get("machine"), name, targets, profiles))
    save_device_result(file, name, result)
    return result


def device_predictions(file: Path, speed: dict[str, Any], machine: dict[str, Any] | None, device: str,
                       targets, profiles) -> dict[str, Any]:
    """% of the device's own roofline; the device's calibrated prediction when `edgekit calibrate --device` made
    one; predictions for other targets as a local profile gives them."""
    from edgekit.errors import EdgekitError
    from edgekit.targets import predict as pr
    from edgekit.targets.facts import artifact_facts

    try:
        facts = artifact_facts(file)
    except EdgekitError as exc:
        return {"predictions_note": f"skipped: {exc.one_line()}"}
    out: dict[str, Any] = {}
    if machine:
        out["roofline_percent"] = pr.roofline_percent(facts, speed, machine)
    from edgekit.targets.device_calibration import predict_for_device

    st = speed["settings"]
    own = predict_for_device(device, facts, int(st["prompt_tokens"] + st["decode_tokens"] / 2), st["prompt_tokens"],
                             speed.get("n_ctx"))
    if own is not None:
        out["predicted_device"] = own
    if targets:
        from edgekit.targets.device_calibration import calibration_for_profile

        host_cal = pr.load(facts.runtime, facts.format) or pr.uncalibrated(facts.runtime, facts.format)
        ctx, p = int(st["prompt_tokens"] + st["decode_tokens"] / 2), st["prompt_tokens"]
        out["targets"] = {}
        for t in targets:
            if t == "host" or profiles[t].is_cloud():
                continue
            prof = profiles[t]
            cal = calibration_for_profile(prof, facts) or host_cal
            out["targets"][t] = pr.predict(facts, cal, pr.profile_machine(prof), ctx, p) | {"kind": prof.kind}
    return out


def _device_cache(file: Path, device: str) -> Path:
    from edgekit.cache import cache_dir, sha256_file

    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in device)[:64]
    folder = cache_dir("device-profiles") / safe
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{sha256_file(file)[:24]}.json"


def save_device_result(file: Path, device: str, result: dict[str, Any]) -> None:
    from edgekit.atomic import write_atomic

    write_atomic(_device_cache(file, device), json.dumps(result | {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))


def device_results(file: Path) -> dict[str, dict[str, Any]]:
    """The latest measurement of ``file`` on each device: {device: result} (for `edgekit report`)."""
    from edgekit.atomic import read_json_or_none
    from edgekit.cache import cache_dir, sha256_file

    out = {}
    root = cache_dir("device-profiles")
    name = f"{sha256_file(file)[:24]}.json"
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        r = read_json_or_none(d / name)
        if isinstance(r, dict):
            out[(r.get("device") or {}).get("name", d.name)] = r
    return out


