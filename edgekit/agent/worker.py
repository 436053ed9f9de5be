"""The agent's job child: ``python -m edgekit.agent.worker`` reads {"artifact_dir", "spec", "storage"} as JSON
on stdin and prints one JSON object per line: progress events, then the result (or one error line).

Speed and memory go through the same harness as ``edgekit profile`` on a host (a fresh process measures
them), quality through the same scoring function against the reference statistics the host sent, so
figures from a device and from the host are the same quantities.
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import EdgekitError, InputError


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def progress(stage: str, done: int, total: int) -> None:
    emit({"event": "progress", "stage": stage, "done": done, "total": total})


def read_quality_inputs(path: Path):
    """(windows, RefStats, EvalConfig, label) from the host's .npz (arrays only: np.load refuses pickles)."""
    from edgekit.harness.quality import EvalConfig, RefStats

    try:
        z = np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)
        ids, lengths = z["window_ids"].astype(np.int64), z["window_lengths"].astype(np.int64)
        stats = RefStats(z["topk_ids"].astype(np.int32), z["topk_logp"].astype(np.float32), z["nll"].astype(np.float32))
        meta = json.loads(bytes(z["meta"]).decode())
    except Exception as exc:  # noqa: BLE001 - any damage is the same bad input
        raise InputError(f"the quality inputs are not a valid edgekit .npz ({type(exc).__name__})",
                         "send them again with `edgekit profile --device`") from None
    if lengths.sum() != len(ids) or (lengths < 2).any() or int((lengths - 1).sum()) != len(stats.nll) \
            or stats.topk_ids.shape != stats.topk_logp.shape or len(stats.topk_ids) != len(stats.nll):
        raise InputError("the quality inputs are inconsistent (windows and statistics differ in length)",
                         "send them again with `edgekit profile --device`")
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    wins = [ids[a:b].tolist() for a, b in zip(bounds, bounds[1:])]
    cfg = EvalConfig(ctx=int(meta["ctx"]), max_tokens=int(meta["max_tokens"]), topk=int(meta["topk"]))
    return wins, stats, cfg, str(meta.get("label", "host text"))


def session_options(spec: dict[str, Any]) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if spec.get("threads"):
        opts["n_threads"] = spec["threads"]
    if spec.get("n_ctx"):
        opts["n_ctx"] = spec["n_ctx"]
    backend = spec.get("backend") or {}
    if backend.get("n_gpu_layers") is not None:
        opts["n_gpu_layers"] = backend["n_gpu_layers"]
    if backend.get("execution_provider") not in (None, "CPUExecutionProvider"):
        raise InputError(f"execution provider {backend['execution_provider']} is not supported by edgekit's ONNX sessions",
                         "they run on CPUExecutionProvider; leave backend.execution_provider unset")
    return opts


def machine_figures(storage: Path) -> dict[str, Any]:
    """This device's copy / read bandwidth and matmul rate, measured once and kept in the agent's storage."""
    from edgekit.atomic import read_json_or_none, write_atomic
    from edgekit.targets.host import measure_host, measure_storage_read

    path = storage / "machine.json"
    figs = read_json_or_none(path)
    if isinstance(figs, dict) and "read_bandwidth_bytes_s" in figs:
        return figs
    progress("measuring this device's bandwidth and compute", 0, 1)
    figs = measure_host()
    figs["storage_read_bytes_s"] = measure_storage_read(storage)
    write_atomic(path, json.dumps(figs, indent=2))
    progress("measuring this device's bandwidth and compute", 1, 1)
    return figs


def run(job: dict[str, Any]) -> dict[str, Any]:
    import edgekit
    from edgekit.agent import device, energy
    from edgekit.harness.quality import read_text, score_session
    from edgekit.harness.speed import SpeedConfig, measure
    from edgekit.profile import host_info
    from edgekit.session import resolve_artifact

    spec, art, storage = job["spec"], Path(job["artifact_dir"]), Path(job["storage"])
    file, runtime, _ = resolve_artifact(art, verify=True)  # the files are those the manifest describes
    out: dict[str, Any] = {"host": host_info(), "device_before": device.snapshot()}
    opts = session_options(spec)
    from edgekit.session import runtime_of

    if "n_gpu_layers" in opts and runtime_of(file, runtime).name != "llamacpp":
        raise InputError("backend.n_gpu_layers is a llama.cpp option; this artifact runs in "
                         f"{runtime_of(file, runtime).name}", "leave it unset for this artifact")
    if "machine" in spec["measure"]:
        out["machine"] = machine_figures(storage)
    if "speed" in spec["measure"]:
        if spec.get("text_blob"):
            text = (storage / "blobs" / spec["text_blob"]).read_text(encoding="utf-8", errors="replace")
        else:
            text, _ = read_text(None)
        cfg = SpeedConfig(prompt_tokens=spec["prompt_tokens"], prefill_tokens=spec["prefill_tokens"],
                          decode_tokens=spec["decode_tokens"], reps=spec["reps"], load_reps=spec["load_reps"],
                          n_threads=spec.get("threads"), long_context=spec["long_context"],
                          session_options={k: v for k, v in opts.items() if k != "n_threads"})
        m = energy.meter()
        progress("speed and memory (separate process)", 0, 1)
        if m:
            m.start()
        speed = measure(str(art), text, cfg, timeout=spec["timeout_s"])
        used = m.stop() if m else None
        progress("speed and memory (separate process)", 1, 1)
        out["speed"] = speed
        out["energy"] = energy.per_token(used, speed)
    if "quality" in spec["measure"]:
        wins, stats, cfg, label = read_quality_inputs(storage / "blobs" / spec["quality"]["blob"])
        with edgekit.load(art, max_memory=spec.get("max_memory_bytes"), **opts) as session:
            out["quality"] = score_session(session, stats, wins, cfg, label, progress)
    out["device_after"] = device.snapshot()
    out["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return out


def main() -> None:
    try:
        job = json.loads(sys.stdin.read())
        emit({"event": "result", "result": run(job)})
    except EdgekitError as exc:
        emit({"event": "error", "error": exc.one_line()})
    except Exception as exc:  # noqa: BLE001 - the agent reports one line; the traceback goes to its log
        import traceback

        traceback.print_exc()
        emit({"event": "error", "error": f"the job failed: {type(exc).__name__}: {str(exc)[:300]}"})


if __name__ == "__main__":
    main()
