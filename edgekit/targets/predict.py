"""Roofline prediction calibrated by what was measured on this machine.

Decode is bandwidth-bound: the seconds per token times the bandwidth equal the bytes streamed, each
weight type weighted by how efficiently its kernel streams (``x_type`` >= 1, the inverse of the
fraction of roofline reached), plus the KV cache read at the current context (``x_kv``):

    t_decode * B = sum_type bytes_type * x_type + kv_bytes_per_token * context * x_kv

Prefill is compute-bound, with the same idea for FLOPs (``y_type``, ``y_attn``):

    t_prefill(P) * C = sum_type 2 * params_type * P * y_type + attn_flops * P^2 / 2 * y_attn

The factors are fitted per (runtime, format) from host measurements (non-negative least squares, so
no factor can go negative); B and C are the host's measured copy bandwidth and matmul throughput
when fitting (all-thread read bandwidth; numpy's f32 GEMM), and the device profile's figures when
predicting (published copy bandwidth, else datasheet bandwidth x COPY_OVER_PEAK_DEFAULT). Peak memory is weights + the KV
cache allocated for the context + a runtime overhead fitted on the host.

A weight type must be calibrated before it is predicted: kernel efficiencies differ about 2x between
types here (benchmarks/bench_targets.py holds one type out and misses by 20-30%), so a type never
measured gets only the shared factor, and the prediction says which calibration it rests on.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.cache import cache_dir
from edgekit.targets.facts import ArtifactFacts

# A device profile with only a datasheet bandwidth streams at a fraction of it; published copy
# bandwidths run from ~35% (Raspberry Pi 5: 6 of 17 GB/s) to ~90% (x86 servers) of peak.
COPY_OVER_PEAK_DEFAULT = 0.6
# Runtimes never calibrated here (e.g. CUDA on a GPU) get the middle of the published 30-95% range.
UNCALIBRATED_EFFICIENCY = 0.6


@dataclass
class Calibration:
    runtime: str
    format: str
    x: dict[str, float]  # decode: inverse bandwidth efficiency per weight type
    x_kv: float
    y: dict[str, float]  # prefill: inverse compute efficiency per weight type
    y_attn: float
    mem_overhead_bytes: float
    load_overhead_s: float
    host: dict[str, Any]
    points: list[dict[str, Any]] = field(default_factory=list)
    fitted: str = ""
    # resident bytes beyond the file, per byte of each weight type: runtimes repack some types into
    # an interleaved copy (llama.cpp's CPU backend repacks Q4_0 for its SIMD kernels)
    mem_extra: dict[str, float] = field(default_factory=dict)
    x_shared: float = 0.0  # the factor a weight type never measured here gets
    y_shared: float = 0.0
    prefill_overhead_s: float = 0.0  # fixed cost of one prompt evaluation
    device: str = ""  # set when fitted from measurements on a device through `edgekit agent`

    def describe(self) -> str:
        """Which calibration a prediction rests on: runtime/format, when, and the artifacts measured."""
        names = [Path(str(p.get("name") or "?")).name for p in self.points]
        where = f" measured on device {self.device}" if self.device else ""
        return (f"{self.runtime}/{self.format} fitted {self.fitted or '(not fitted)'}{where} on {len(names)} artifacts "
                f"({', '.join(names)})")

    def efficiencies(self) -> dict[str, Any]:
        return {"decode": {t: 1 / v for t, v in self.x.items() if v > 0},
                "prefill": {t: 1 / v for t, v in self.y.items() if v > 0}}

    def _x(self, typ: str, table: dict[str, float], shared: float = 0.0) -> float:
        if typ in table:
            return table[typ]
        return shared or (statistics.median(table.values()) if table else 1 / UNCALIBRATED_EFFICIENCY)


def uncalibrated(runtime: str, fmt: str) -> Calibration:
    """Factors for a runtime never measured: every byte and FLOP at UNCALIBRATED_EFFICIENCY."""
    unc = 1 / UNCALIBRATED_EFFICIENCY
    return Calibration(runtime, fmt, {}, unc, {}, unc, 0.0, 0.0, {})


def _solve_nonneg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """min ||a x - b|| subject to x >= 0. scipy's bounded least squares (BVLS) rather than its
    ``nnls``: the latter aborts the process on under-determined systems (one artifact, two types)."""
    try:
        from scipy.optimize import lsq_linear
    except ImportError:
        from edgekit.errors import MissingDependencyError

        raise MissingDependencyError("fitting the predictor needs scipy", "pip install 'edgekit-ml[report]'") from None

    return lsq_linear(a, b, bounds=(0, np.inf), method="bvls").x


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # noqa: D103 (name kept: non-negative least squares)
    # scale columns so the solver sees comparable magnitudes
    scale = np.maximum(np.abs(a).max(axis=0), 1e-30)
    return _solve_nonneg(a / scale, b) / scale


def _fit_shrunk(rows: list[list[float]], rhs: list[float], n_types: int, shrink: float = 0.002) -> np.ndarray:
    """Non-negative least squares where the first ``n_types`` factors are pulled toward one shared
    value: a type measured only as a small share of some artifact (the Q8_0 output head inside a Q4_0
    file) cannot take an absurd value, and a type never measured falls back to the shared one."""
    a = np.array(rows, float)
    b = np.array(rhs, float)
    scale = np.maximum(np.abs(a).max(axis=0), 1e-30)
    a = a / scale
    # unknowns: [per-type..., other terms..., shared]; penalty rows sqrt(w) * (x_t - shared) = 0
    w = np.sqrt(shrink) * np.abs(b).mean()
    a = np.hstack([a, np.zeros((len(a), 1))])
    pen = np.zeros((n_types, a.shape[1]))
    for t in range(n_types):
        pen[t, t] = w / scale[t]
        pen[t, -1] = -w
    sol = _solve_nonneg(np.vstack([a, pen]), np.concatenate([b, np.zeros(n_types)]))
    return np.concatenate([sol[:-1] / scale, sol[-1:]])


def fit(points: list[dict[str, Any]], host: dict[str, Any]) -> Calibration:
    """Fit factors from measurement points: each {"facts": ArtifactFacts dict, "decode": [(ctx, tok_s)],
    "prefill": [(P, seconds)], "peak_rss_bytes", "n_ctx", "load_s"}."""
    bw = host["read_bandwidth_bytes_s"]
    c = host["compute_flops"]["f32"]
    types = sorted({t for p in points for t in p["facts"]["bytes_by_type"] if t != "F32"})
    rows, rhs = [], []
    for p in points:
        f = p["facts"]
        for ctx, tok_s in p["decode"]:
            rows.append([f["bytes_by_type"].get(t, 0) for t in types] + [f["kv_bytes_per_token"] * ctx])
            # F32 norms are a few hundred KB: streamed at the read rate, not fitted
            rhs.append(bw / tok_s - f["bytes_by_type"].get("F32", 0))
    sol = _fit_shrunk(rows, rhs, len(types))
    x = {t: float(v) for t, v in zip(types, sol[: len(types)])}
    x_kv, x_shared = float(sol[len(types)]), float(sol[-1])

    ptypes = sorted({t for p in points for t in p["facts"]["params_by_type"]})
    rows, rhs = [], []
    for p in points:
        f = p["facts"]
        for n, secs in p["prefill"]:
            rows.append([2 * f["params_by_type"].get(t, 0) * n for t in ptypes]
                        + [f["attn_flops_per_token_per_ctx"] * n * n / 2, c])  # last: a fixed per-call cost
            rhs.append(secs * c)
    sol = _fit_shrunk(rows, rhs, len(ptypes))
    y = {t: float(v) for t, v in zip(ptypes, sol[: len(ptypes)])}
    y_attn, prefill_overhead, y_shared = float(sol[len(ptypes)]), float(sol[len(ptypes) + 1]), float(sol[-1])

    # memory: the runtime's fixed overhead is what the leanest artifact needs beyond its file and KV
    # cache; what other artifacts need beyond that is attributed to their weight types
    resid = [p["peak_rss_bytes"] - p["facts"]["size_bytes"] - p["facts"]["kv_bytes_per_token"] * p["n_ctx"] for p in points]
    overhead = float(min(resid))
    mtypes = sorted({t for p in points for t in p["facts"]["bytes_by_type"] if t != "F32"})
    extra = _nnls(np.array([[p["facts"]["bytes_by_type"].get(t, 0) for t in mtypes] for p in points], float),
                  np.array([r - overhead for r in resid], float))
    loads = [p["load_s"] for p in points]
    return Calibration(points[0]["facts"]["runtime"], points[0]["facts"]["format"], x, x_kv, y, y_attn,
                       overhead, float(min(loads)), host, points,
                       time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       {t: float(v) for t, v in zip(mtypes, extra)}, x_shared, y_shared, prefill_overhead)


def point_from_speed(facts: ArtifactFacts, speed: dict[str, Any]) -> dict[str, Any]:
    """A calibration point from one `edgekit.harness.speed` result."""
    st = speed["settings"]
    short_ctx = st["prompt_tokens"] + st["decode_tokens"] / 2
    decode = [(short_ctx, speed["decode_tok_s"])]
    prefill = [(st["prefill_tokens"], st["prefill_tokens"] / speed["prefill_tok_s"])]
    # TTFT = prefill of the prompt + one decode step
    prefill.append((st["prompt_tokens"], speed["ttft_ms"] / 1000 - 1 / speed["decode_tok_s"]))
    if "long_context" in speed:
        lc = speed["long_context"]
        decode.append((lc["prompt_tokens"] + st["decode_tokens"] / 2, lc["decode_tok_s"]))
        prefill.append((lc["prompt_tokens"], lc["ttft_ms"] / 1000 - 1 / lc["decode_tok_s"]))
    return {"name": speed.get("name"), "facts": facts.to_dict(), "decode": decode, "prefill": prefill,
            "peak_rss_bytes": speed["peak_rss_bytes"], "n_ctx": speed["n_ctx"], "load_s": speed["load_s"]}


# ---------------------------------------------------------------- storage of fitted factors


def calibration_path():
    return cache_dir() / "calibration.json"


def store(key: str, entry: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The stored calibration under ``key`` ("runtime/format", or ".../encoder"); with ``entry``, replace it."""
    from edgekit.atomic import read_json_or_none, write_atomic

    path = calibration_path()
    data = read_json_or_none(path) if path.exists() else {}
    if not isinstance(data, dict):
        data = {}  # a damaged store: what it held is measured again by `edgekit calibrate`
    if entry is not None:
        data[key] = entry
        write_atomic(path, json.dumps(data, indent=2))
    return data.get(key)


def save(cal: Calibration) -> None:
    store(f"{cal.runtime}/{cal.format}", asdict(cal))


def load(runtime: str, fmt: str) -> Calibration | None:
    entry = store(f"{runtime}/{fmt}")
    return Calibration(**entry) if entry else None


# ---------------------------------------------------------------- prediction


@dataclass
class Machine:
    """The two roofline ceilings and memory of whatever is predicted for (host or a profile)."""

    name: str
    kind: str
    bandwidth_bytes_s: float
    compute_flops: float
    storage_read_bytes_s: float | None
    memory_budget_bytes: float | None
    cpu_kernels: bool  # runs the CPU kernels the host calibrates (CPU and mobile CPUs; not GPUs)
    notes: list[str] = field(default_factory=list)
    runtimes: tuple[str, ...] | None = None  # what the device runs (None: anything, the host)
    power_w: float | None = None  # the profile's stated power while decoding

    def runs_calibrated(self, cal: "Calibration", runtime: str) -> bool:
        """True when ``cal`` holds factors measured here for ``runtime`` and this machine runs its kernels."""
        return (bool(cal.points) and cal.runtime == runtime and self.cpu_kernels
                and (self.runtimes is None or runtime in self.runtimes))

    @property
    def calibrated_runtimes(self) -> tuple[str, ...]:
        """The runtimes ``edgekit calibrate`` stored factors for that this machine runs."""
        if not self.cpu_kernels:
            return ()
        return tuple(n for n in stored_runtimes() if self.runtimes is None or n in self.runtimes)


def stored_runtimes() -> tuple[str, ...]:
    """Runtimes with factors fitted here by ``edgekit calibrate`` (any format)."""
    path = calibration_path()
    if not path.exists():
        return ()
    # keys are "runtime/format" (decoders) and "runtime/format/encoder"; an encoder fit says nothing of decoding
    return tuple(sorted({key.split("/")[0] for key in json.loads(path.read_text()) if key.count("/") == 1}))


def host_machine(host: dict[str, Any]) -> Machine:
    return Machine("host", "cpu", host["read_bandwidth_bytes_s"], host["compute_flops"]["f32"], None,
                   host["ram_bytes"], True)


def profile_machine(profile) -> Machine:
    notes = []
    copy = profile.get("copy_bandwidth")
    if copy is not None:
        bw = profile.bandwidth_bytes_s()
    else:
        bw = profile.peak_bandwidth_bytes_s() * COPY_OVER_PEAK_DEFAULT
        notes.append(f"bandwidth: datasheet x {COPY_OVER_PEAK_DEFAULT} (assumed copy/peak; no measured copy figure)")
    # CPU-class devices run the same CPU kernels the host calibrated (for the runtimes they list);
    # GPU-class devices do not
    cpu = profile.kind in ("cpu", "mobile")
    if not cpu:
        notes.append(f"{profile.kind}: GPU kernels are not calibrated on this host; efficiency {UNCALIBRATED_EFFICIENCY} assumed")
    dtype = "f32" if cpu else "f16"
    power = profile.get("power")
    return Machine(profile.name, profile.kind, bw, profile.compute_flops(dtype), profile.storage_read_bytes_s(),
                   profile.memory_budget_bytes(), cpu, notes, tuple(profile.runtimes), power.si() if power else None)


def predict(facts: ArtifactFacts, cal: Calibration, m: Machine, context: int, prompt_tokens: int,
            n_ctx: int | None = None) -> dict[str, Any]:
    """Predicted load time, TTFT, prefill and decode speed, and peak memory of ``facts`` on ``m``."""
    calibrated = m.runs_calibrated(cal, facts.runtime)
    unc = 1 / UNCALIBRATED_EFFICIENCY

    def xt(t):
        return cal._x(t, cal.x, cal.x_shared) if calibrated else unc

    def yt(t):
        return cal._x(t, cal.y, cal.y_shared) if calibrated else unc

    x_kv = cal.x_kv if calibrated else unc
    y_attn = cal.y_attn if calibrated else unc
    # F32 norms stream at the read rate unless a fit gave them a factor of their own
    stream = sum(b * (cal.x.get("F32", 1.0) if t == "F32" and calibrated else 1.0 if t == "F32" else xt(t))
                 for t, b in facts.bytes_by_type.items())
    t_decode = (stream + facts.kv_bytes_per_token * context * x_kv) / m.bandwidth_bytes_s
    p = prompt_tokens
    flops = sum(2 * n * p * yt(t) for t, n in facts.params_by_type.items()) + facts.attn_flops_per_token_per_ctx * p * p / 2 * y_attn
    t_prefill = flops / m.compute_flops + (cal.prefill_overhead_s if calibrated else 0.0)
    n_ctx = n_ctx or max(context, 2048)
    memory = (facts.size_bytes + facts.kv_bytes_per_token * n_ctx + cal.mem_overhead_bytes
              + sum(b * cal.mem_extra.get(t, 0.0) for t, b in facts.bytes_by_type.items()))
    load = cal.load_overhead_s + (facts.size_bytes / m.storage_read_bytes_s if m.storage_read_bytes_s else 0.0)
    roofline_decode = m.bandwidth_bytes_s / (facts.bytes_per_token + facts.kv_bytes_per_token * context)
    out = {
        "decode_tok_s": 1 / t_decode,
        "ttft_ms": (t_prefill + t_decode) * 1000,
        "prefill_tok_s": p / t_prefill,
        "load_s": load,
        "peak_memory_bytes": memory,
        "roofline_decode_tok_s": roofline_decode,
        "context": context,
        "prompt_tokens": p,
        "n_ctx": n_ctx,
        "calibrated": calibrated,
    }
    if m.power_w:  # energy = stated power x time per token (the profile's power figure says what it covers)
        out["energy_j_per_token"] = m.power_w * t_decode
    if m.memory_budget_bytes is not None:
        out["memory_budget_bytes"] = m.memory_budget_bytes
        out["fits"] = memory <= m.memory_budget_bytes
    notes = list(m.notes)
    if m.runtimes is not None and facts.runtime not in m.runtimes:
        notes.append(f"{m.name} does not list the {facts.runtime} runtime: figures are hypothetical")
    if not calibrated and m.kind in ("cpu", "mobile"):
        notes.append(f"uncalibrated: no {facts.runtime} speed on this machine's kind was fitted here; "
                     f"efficiency {UNCALIBRATED_EFFICIENCY} assumed")
    if notes:
        out["notes"] = notes
    out["calibration"] = cal.describe() if calibrated else f"uncalibrated ({facts.runtime}/{facts.format})"
    return out


def roofline_percent(facts: ArtifactFacts, speed: dict[str, Any], host: dict[str, Any]) -> dict[str, float]:
    """How close measured host figures come to the host's roofline ceilings (in %)."""
    st = speed["settings"]
    ctx = st["prompt_tokens"] + st["decode_tokens"] / 2
    decode_ceiling = host["read_bandwidth_bytes_s"] / (facts.bytes_per_token + facts.kv_bytes_per_token * ctx)
    prefill_ceiling = host["compute_flops"]["f32"] / (2 * sum(facts.params_by_type.values()))
    return {"decode": 100 * speed["decode_tok_s"] / decode_ceiling, "prefill": 100 * speed["prefill_tok_s"] / prefill_ceiling}
