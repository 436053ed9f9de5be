"""Speed of a sentence encoder on a device: texts/s and latency per batch, from a roofline calibrated here.

An encoder runs a whole batch at once, so it is compute-bound: a batch of ``n`` texts padded to
``L`` tokens costs

    t(n, L) * C = (2 * P * n * L + A * n * L^2) * y   +   (weight bytes / B) * C   +   t0 * C

with P the matrix parameters (2 FLOPs each per token), A the attention FLOPs per token per context
token (QK^T and attention x V: 4 x hidden per layer), C the machine's f32 compute, B its bandwidth
(the weights are streamed once per batch), ``y`` >= 1 the inverse of the compute efficiency reached and
``t0`` a fixed cost per call (session dispatch, tokenization). ``y`` and ``t0`` are fitted from what
``edgekit profile`` measures for an encoder here (one text, full batches, whole passes): two numbers from
three kinds of measurement, so the fit is over-determined. A device gets the host's ``y`` (the same CPU
kernels) and ``t0`` scaled by its compute relative to the host's (the per-call work is CPU work too).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.targets.facts import ArtifactFacts
from edgekit.targets import predict as pr
from edgekit.targets.predict import UNCALIBRATED_EFFICIENCY, Machine, _solve_nonneg

BATCHES = (1, 32)  # the batch sizes every encoder prediction reports


@dataclass
class EncoderCalibration:
    runtime: str
    format: str
    y: float  # inverse compute efficiency of the whole forward pass
    overhead_s: float  # fixed cost per call, on the host
    host_compute_flops: float
    points: list[dict[str, Any]] = field(default_factory=list)
    fitted: str = ""
    mem_overhead_bytes: float = 0.0  # resident memory beyond the weights (runtime, arena), measured here

    def describe(self) -> str:
        names = [str(p.get("name")) for p in self.points]
        return (f"{self.runtime}/{self.format} encoder fitted {self.fitted or '(not fitted)'} on "
                f"{len(names)} measurement(s) ({', '.join(names)})")

    @property
    def key(self) -> str:
        return f"{self.runtime}/{self.format}/encoder"


def batch_flops(facts: ArtifactFacts, n: int, tokens: float) -> float:
    return 2 * sum(facts.params_by_type.values()) * n * tokens + facts.attn_flops_per_token_per_ctx * n * tokens ** 2


def weight_bytes(facts: ArtifactFacts) -> int:
    return facts.bytes_per_token


def point_from_measurement(facts: ArtifactFacts, speed: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    """Calls (n texts, padded length, seconds) from one ``harness.embedding`` result that records token counts."""
    tok = speed.get("tokens")
    if not tok:
        from edgekit.errors import EdgekitError

        raise EdgekitError("this encoder measurement records no token counts", "profile the encoder again with this edgekit")
    calls = [(1, float(tok["single_median"]), speed["single_latency_ms"] / 1000),
             (int(speed["settings"]["batch_size"]), float(tok["batch_padded_median"]), speed["batch_latency_ms"] / 1000)]
    passes = [(b["n"], b["padded"]) for b in tok["batches"]]  # one pass over the set: calls summed
    return {"name": name or speed.get("name"), "facts": facts.to_dict(), "calls": calls,
            "pass": {"batches": passes, "seconds": tok["texts"] / speed["texts_s"]},
            "peak_rss_bytes": speed.get("peak_rss_bytes")}


def fit(points: list[dict[str, Any]], host: dict[str, Any]) -> EncoderCalibration:
    """Non-negative least squares for (y, t0), each call's equation divided by its own time so that
    the one-text latency (milliseconds) weighs as much as a whole pass (seconds)."""
    c, bw = host["compute_flops"]["f32"], host["read_bandwidth_bytes_s"]
    rows, rhs = [], []
    for p in points:
        f = ArtifactFacts(**{k: v for k, v in p["facts"].items() if k != "bytes_per_token"})
        wb = weight_bytes(f) / bw
        for n, length, secs in p["calls"]:
            rows.append([batch_flops(f, n, length) / c / secs, 1 / secs])
            rhs.append(1 - wb / secs)
        ps = p["pass"]
        if ps["seconds"]:
            flops = sum(batch_flops(f, n, length) for n, length in ps["batches"])
            k = len(ps["batches"])
            rows.append([flops / c / ps["seconds"], k / ps["seconds"]])
            rhs.append(1 - k * wb / ps["seconds"])
    y, t0 = _solve_nonneg(np.array(rows, float), np.array(rhs, float))
    resid = [p["peak_rss_bytes"] - p["facts"]["size_bytes"] for p in points if p.get("peak_rss_bytes")]
    return EncoderCalibration(points[0]["facts"]["runtime"], points[0]["facts"]["format"], float(y), float(t0), c,
                              points, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), float(max(0, min(resid, default=0))))


def uncalibrated(facts: ArtifactFacts) -> EncoderCalibration:
    return EncoderCalibration(facts.runtime, facts.format, 1 / UNCALIBRATED_EFFICIENCY, 0.0, 0.0)


def predict(facts: ArtifactFacts, cal: EncoderCalibration, m: Machine, tokens: float,
            batches: tuple[int, ...] = BATCHES) -> dict[str, Any]:
    """Latency per batch and texts/s at ``tokens`` tokens per text, for each batch size, on ``m``."""
    # the host's fit applies to CPU-class machines that run this runtime (the host runs anything)
    calibrated = bool(cal.points) and m.cpu_kernels and (m.runtimes is None or facts.runtime in m.runtimes)
    y = cal.y if calibrated else 1 / UNCALIBRATED_EFFICIENCY
    t0 = cal.overhead_s * cal.host_compute_flops / m.compute_flops if calibrated and cal.host_compute_flops else 0.0
    per_batch = {}
    for n in batches:
        secs = batch_flops(facts, n, tokens) * y / m.compute_flops + weight_bytes(facts) / m.bandwidth_bytes_s + t0
        per_batch[str(n)] = {"latency_ms": 1000 * secs, "texts_s": n / secs}
    # weights + what the runtime held beyond them here (activations of a batch of short texts are small)
    memory = facts.size_bytes + (cal.mem_overhead_bytes if calibrated else 0.0)
    out: dict[str, Any] = {
        "kind": m.kind, "model_kind": "encoder", "tokens_per_text": tokens, "batches": per_batch,
        "texts_s": per_batch[str(max(batches))]["texts_s"], "latency_ms": per_batch[str(min(batches))]["latency_ms"],
        "load_s": facts.size_bytes / m.storage_read_bytes_s if m.storage_read_bytes_s else None,
        "peak_memory_bytes": memory, "calibrated": calibrated,
        "calibration": cal.describe() if calibrated else f"uncalibrated ({facts.runtime}/{facts.format} encoder)",
    }
    notes = list(m.notes)
    if not calibrated:
        notes.append(f"uncalibrated: compute efficiency {UNCALIBRATED_EFFICIENCY} assumed, no per-call overhead")
    if m.runtimes is not None and facts.runtime not in m.runtimes:
        notes.append(f"{m.name} does not list the {facts.runtime} runtime: figures are hypothetical")
    if not calibrated:
        notes.append("peak memory counts the weights only (no runtime overhead measured)")
    out["notes"] = notes
    if m.memory_budget_bytes is not None:
        out["memory_budget_bytes"] = m.memory_budget_bytes
        out["fits"] = memory <= m.memory_budget_bytes
    return out


def save(cal: EncoderCalibration) -> None:
    pr.store(cal.key, asdict(cal))


def load(runtime: str, fmt: str) -> EncoderCalibration | None:
    entry = pr.store(f"{runtime}/{fmt}/encoder")
    return EncoderCalibration(**entry) if entry else None


def typical_tokens(facts: ArtifactFacts) -> float:
    """Tokens per text when nothing was measured: the shipped evaluation sentences' median would need
    the artifact's tokenizer, so take a typical sentence of 16 tokens, capped by the model's length."""
    return float(min(16, int(facts.extra.get("max_length") or 16)))


def encoder_predictions(file, measured: dict[str, Any], targets: list[str], profiles: dict) -> dict[str, Any]:
    """What ``edgekit profile`` adds for an encoder: predicted host figures, and per target texts/s and
    latency per batch at the measured sentences' median token count."""
    from edgekit.errors import EdgekitError
    from edgekit.targets import predict as pr
    from edgekit.targets.facts import artifact_facts
    from edgekit.targets.host import host_figures

    try:
        facts = artifact_facts(file)
        host = host_figures()
        cal = load(facts.runtime, facts.format)
        how = cal.describe() if cal else "fitted from this encoder's own measurement"
        cal = cal or fit([point_from_measurement(facts, measured, Path(str(file)).parent.name)], host)
    except EdgekitError as exc:
        return {"predictions_note": f"skipped: {exc.one_line()}"}
    tokens = float(measured["tokens"]["median"])
    out: dict[str, Any] = {"calibration": how, "predicted_host": predict(facts, cal, pr.host_machine(host), tokens)}
    if targets:
        out["targets"] = {}
    for name in targets:
        if name == "host":
            out["targets"]["host"] = out["predicted_host"]
            continue
        prof = profiles[name]
        if prof.is_cloud():  # cloud baselines model decoders (price per generated token)
            out.setdefault("cloud_note", f"{name}: cloud baselines are simulated for decoders only")
            continue
        out["targets"][name] = predict(facts, cal, pr.profile_machine(prof), tokens) | {"kind": prof.kind}
    return out
