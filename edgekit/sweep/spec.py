"""A sweep spec (TOML): the source model, the search space, the devices, objectives, constraints and strategy.

    [source]
    model = "default"                 # a .gguf, a Hugging Face directory, or the embedded model
    [space]
    quant = ["q8_0", "q4_0", "int4"]  # storage passes
    format = ["gguf", "onnx"]
    prune = [0.0, 0.25]               # fractions of MLP channels; > 0 is recovered for `recover` steps
    recover = [100]
    rank = [0.0]                      # low-rank fraction kept (0: none)
    [devices]
    targets = ["host", "raspberry-pi-5", "iphone-15-pro"]  # "host" is measured, profiles predicted,
                                                            # "agent:NAME" measured through `edgekit agent`
    [objectives]
    minimize = ["size_bytes", "kld_mean"]                   # the Pareto front per device
    [constraints]                                            # per device, on measured or predicted figures
    max_size_mb = 120
    min_decode_tok_s = 20
    max_kld = 0.5
    [strategy]
    kind = "grid"                     # or "random" with trials and seed
    [measure]
    reps = 3
    eval_tokens = 2048
    calib_generated = 4096            # calibration tokens the float model writes (default: edgekit's)

Unknown keys are errors, as in recipes and device profiles.
"""

from __future__ import annotations

import itertools
import math
import random
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit.errors import InputError

SECTIONS = {
    "source": {"model"},
    "space": {"quant", "format", "prune", "recover", "rank"},
    "devices": {"targets"},
    "objectives": {"minimize"},
    "constraints": {"max_size_mb", "max_peak_memory_mb", "min_decode_tok_s", "max_ttft_ms", "max_kld", "min_top1",
                    "max_cosine_distance"},
    "strategy": {"kind", "trials", "seed"},
    "measure": {"reps", "eval_tokens", "decode_tokens", "calib_generated", "timeout_s"},
}
OBJECTIVES = {"size_bytes", "kld_mean", "peak_memory_bytes", "ttft_ms", "neg_decode_tok_s"}
STRATEGIES = ("grid", "random")


@dataclass(frozen=True)
class Candidate:
    """One point of the space: ordered passes and a format."""

    quant: str
    format: str
    prune: float = 0.0
    recover: int = 0
    rank: float = 0.0

    def structural(self) -> list[dict[str, Any]]:
        passes: list[dict[str, Any]] = []
        if self.prune:
            passes.append({"pass": "prune", "mlp": self.prune, **({"recover": self.recover} if self.recover else {})})
        if self.rank:
            passes.append({"pass": "lowrank", "rank": self.rank})
        return passes

    def passes(self) -> list[dict[str, Any]]:
        return self.structural() + [{"pass": self.quant}]

    @property
    def name(self) -> str:
        parts = [self.quant, self.format]
        if self.prune:
            parts.append(f"prune{round(self.prune * 100)}" + (f"r{self.recover}" if self.recover else ""))
        if self.rank:
            parts.append(f"rank{round(self.rank * 100)}")
        return "-".join(parts)


@dataclass
class SweepSpec:
    model: str | None
    quant: list[str]
    format: list[str]
    prune: list[float] = field(default_factory=lambda: [0.0])
    recover: list[int] = field(default_factory=lambda: [0])
    rank: list[float] = field(default_factory=lambda: [0.0])
    targets: list[str] = field(default_factory=lambda: ["host"])
    minimize: list[str] = field(default_factory=lambda: ["size_bytes", "kld_mean"])
    constraints: dict[str, float] = field(default_factory=dict)
    strategy: str = "grid"
    trials: int | None = None
    seed: int = 0
    reps: int = 3
    eval_tokens: int = 2048
    decode_tokens: int = 64
    calib_generated: int | None = None
    timeout_s: float = 3600
    path: str = ""

    def grid(self) -> list[Candidate]:
        out = []
        for q, f, p, r, k in itertools.product(self.quant, self.format, self.prune, self.recover, self.rank):
            if not p and r and len(self.recover) > 1:
                continue  # recovery steps only vary for pruned candidates
            out.append(Candidate(q, f, float(p), int(r) if p else 0, float(k)))
        return list(dict.fromkeys(out))  # the same point once, in spec order

    def candidates(self) -> list[Candidate]:
        grid = self.grid()
        if self.strategy == "grid":
            return grid
        n = min(self.trials or len(grid), len(grid))
        return random.Random(self.seed).sample(grid, n)


def _list(path: Path, key: str, v: Any, kind: type, check=lambda x: True) -> list:
    v = v if isinstance(v, list) else [v]
    ok = bool(v) and all(isinstance(x, kind) and not isinstance(x, bool) and check(x) for x in v)
    if not ok:
        what = "number" if isinstance(kind, tuple) else {"str": "string", "int": "integer"}[kind.__name__]
        raise InputError(f"sweep spec {path}: {key} must be a non-empty list of {what}s in range, got {v!r}",
                         "see examples/sweep.toml")
    return v


def load(path: str | Path) -> SweepSpec:
    """Read and validate a spec: every key known, every value in range, before anything is converted."""
    from edgekit.registry import EXPORTERS, PASSES

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"cannot read sweep spec {path} ({exc.strerror or exc})", "check the path") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"sweep spec {path} is not valid TOML: {exc}", "fix the syntax at that line") from None
    for sec, body in data.items():
        if sec not in SECTIONS:
            raise InputError(f"sweep spec {path}: unknown section [{sec}]", f"known: {', '.join(SECTIONS)}")
        if not isinstance(body, dict):
            raise InputError(f"sweep spec {path}: [{sec}] must be a table", "see examples/sweep.toml")
        for k in body:
            if k not in SECTIONS[sec]:
                raise InputError(f"sweep spec {path}: unknown key {sec}.{k}", f"[{sec}] takes {', '.join(sorted(SECTIONS[sec]))}")
    sp = data.get("space", {})
    if "quant" not in sp or "format" not in sp:
        raise InputError(f"sweep spec {path}: [space] needs quant and format", "e.g. quant = [\"q8_0\", \"int4\"]")
    storage = [n for n in PASSES.names() if not PASSES.get(n).structural]
    quant = _list(path, "space.quant", sp["quant"], str, lambda x: x in storage)
    fmts = _list(path, "space.format", sp["format"], str, lambda x: x in EXPORTERS.names())
    prune = [float(x) for x in _list(path, "space.prune", sp.get("prune", [0.0]), (int, float), lambda x: 0 <= x < 1)]
    recover = _list(path, "space.recover", sp.get("recover", [0]), int, lambda x: 0 <= x <= 100_000)
    rank = [float(x) for x in _list(path, "space.rank", sp.get("rank", [0.0]), (int, float), lambda x: 0 <= x < 1)]
    targets = _list(path, "devices.targets", data.get("devices", {}).get("targets", ["host"]), str)
    minimize = _list(path, "objectives.minimize", data.get("objectives", {}).get("minimize", ["size_bytes", "kld_mean"]), str,
                     lambda x: x in OBJECTIVES)
    cons = {}
    for k, v in data.get("constraints", {}).items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise InputError(f"sweep spec {path}: constraints.{k} must be a non-negative number, got {v!r}", "e.g. max_kld = 0.5")
        cons[k] = float(v)
    st = data.get("strategy", {})
    kind = st.get("kind", "grid")
    if kind not in STRATEGIES:
        raise InputError(f"sweep spec {path}: strategy.kind {kind!r} is unknown", f"use one of {', '.join(STRATEGIES)}")
    ms = data.get("measure", {})
    ints = {k: ms[k] for k in ("reps", "eval_tokens", "decode_tokens", "calib_generated") if k in ms}
    for k, v in ints.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if k == "calib_generated" else 1):
            raise InputError(f"sweep spec {path}: measure.{k} must be a positive integer, got {v!r}", "e.g. reps = 3")
    for k in ("trials", "seed"):
        if k in st and (isinstance(st[k], bool) or not isinstance(st[k], int) or st[k] < 0):
            raise InputError(f"sweep spec {path}: strategy.{k} must be a non-negative integer", "e.g. trials = 20")
    model = data.get("source", {}).get("model")
    if model is not None and not isinstance(model, str):
        raise InputError(f"sweep spec {path}: source.model must be a string", "a path, or \"default\"")
    if model and model != "default" and not Path(model).is_absolute():
        model = str((path.parent / model).resolve())  # relative to the spec, as a user reads it
    spec = SweepSpec(None if model in (None, "default") else model, quant, fmts, prune, recover, rank, targets, minimize,
                     cons, kind, st.get("trials"), st.get("seed", 0), **ints, path=str(path))
    if "timeout_s" in ms:
        spec.timeout_s = float(ms["timeout_s"])
    return spec
