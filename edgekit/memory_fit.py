"""Will it fit? A session's peak resident memory, predicted before anything is allocated.

``edgekit.load`` and ``edgekit profile`` run :func:`guard` (``edgekit serve``: :func:`check_total`) first and
refuse, in one line, a model that would not fit the memory available (or ``max_memory``)::

    total = weights + parallel x (KV cache + runtime overhead)

- weights, counted once: llama.cpp memory-maps the GGUF, so sessions on one file share its pages, and
  parallel ONNX sessions share one InferenceSession. ONNX Runtime holds more than the file: its own copies
  of the initializers (prepacked or converted to float32) while and after it builds the session.
- KV cache: ``kv_bytes_per_token x n_ctx`` per session (llama.cpp allocates it when the context is made;
  the ONNX session grows into it as the context fills).
- runtime overhead, per session: compute buffers, the tokenizer, the runtime library, plus the attention
  scratch that grows with the context (scores of one layer: n_ctx x batch x heads; at n_ctx 32768 it is as big
  as the KV cache) and llama.cpp's interleaved copy of the weight types its CPU kernels repack.

The overhead comes from ``edgekit calibrate`` when it stored one for the runtime and format (its peak is the
measuring process's whole high-water mark, so it is conservative by the interpreter's size), else from the
defaults below, measured on this project's 2-core AMD EPYC (AVX2) host with llama-cpp-python 0.3.36 and
onnxruntime 1.32: a fresh process imports edgekit, reads VmRSS, opens the artifact with ``edgekit.load``,
runs a prompt of 95-97% of n_ctx and 8 decode steps, and reads VmHWM. Measured peaks (MB; prediction in brackets):

    SmolLM2-135M Q4_1 GGUF  n_ctx 256: 166 (164)   512: 185 (181)   2048: 256 (262)   8192: 579 (586)
    SmolLM2 GGUF Q4_0 / IQ4_NL / Q4_K_M, n_ctx 2048: 309 / 307 / 271 (309 / 308 / 277)
    tiny GGUF F32 (2 layers, 4 heads, 15 MB)  n_ctx 2048: 94 (100)   8192: 184 (190)   32768: 526 (549)
    SmolLM2 ONNX q4_0  n_ctx 512: 310 (347)   2048: 456 (455)   8192: 889 (888);  q8_0 2048: 524 (522);  f16 2048: 969 (974)
    tiny ONNX F32 / q4_0, n_ctx 512: 128 / 100 (128 / 101);  MiniLM-L6 int8 encoder, 32 texts of 256 tokens: 350 (353)

The defaults were fitted to these same runs, so the brackets show the fit, not a held-out test. Opening a
session and a short prompt stay below the peak (SmolLM2 at 2048: ~190 MB against 256): the scratch is
allocated but only touched as the context fills, and a guard must allow for the full context.

Importing this module and estimating never imports torch, transformers or scipy (apps embed it).
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgekit.errors import InputError, MemoryFitError

MB = 10**6
MiB = 1 << 20
DEFAULT_N_CTX = 2048  # when the session class declares no integer n_ctx default (decoders open 2048)
N_BATCH = 512  # tokens evaluated per chunk: llama.cpp's n_ubatch and the ONNX session's n_batch default
LLAMACPP_CTX_PAD = 256  # llama.cpp rounds n_ctx up to a multiple of 256 (its KV cache and the session's n_ctx)

# llama.cpp: the growth beyond file, KV cache and scratch, 48-60 MB for SmolLM2 and the tiny model alike
# (library ~22 MB, vocabulary, compute buffers of the non-attention ops)
LLAMACPP_SESSION_BYTES = 56 * MB
# attention scratch per (context token x batch position): per head the f32 scores (4 bytes) and the f16
# copy the CPU backend makes of them for the scores x V product (2), plus the f32 mask (4) shared by heads.
# llama.cpp reports the f32 part as its "compute buffer" ((heads + 1) x n_ctx x n_ubatch x 4 at long contexts)
LLAMACPP_SCRATCH_PER_HEAD = 6
LLAMACPP_SCRATCH_FIXED = 4
# types llama.cpp's CPU backend repacks into an interleaved copy (anonymous memory, per session; the file
# pages stay mapped): measured 0.89 x their bytes for Q4_0 and IQ4_NL; Q4_K is in the same repack table
# (too small a share of the Q4_K_M file here to measure on its own)
LLAMACPP_REPACKED = {"Q4_0": 0.9, "IQ4_NL": 0.9, "Q4_K": 0.9}

# ONNX Runtime decoders: the fixed part (runtime and tokenizer imports, session, arena, tokenizer), fitted
# on the tiny and SmolLM2 artifacts above together with the per-type copies below
ORT_SESSION_BYTES = 88 * MB
ORT_SCRATCH_PER_HEAD = 5.3  # GroupQueryAttention's f32 scores and its temporaries, fitted from n_ctx 2048 -> 8192
# resident bytes beyond the file per byte of each weight type, shared by the sessions of one InferenceSession:
# MatMulNBits prepacks its blocks; float16 matrices are converted to float32 for the CPU kernels
ORT_LOADED = {"NBITS4": 1.4, "NBITS8": 0.9, "F16": 1.75, "F32": 1.65}
# ONNX Runtime encoders: batches of 32 texts padded to max_length; activations per text x token x hidden unit
ORT_ENCODER_SESSION_BYTES = 64 * MB
ORT_ENCODER_BATCH = 32
ORT_ENCODER_ACTIVATION = 80
# a runtime never measured here (Core ML): file + KV cache + this guess
OTHER_SESSION_BYTES = 128 * MB

Q4_0_BITS = 4.5  # bits per weight of a q4_0 build (18 bytes per 32 weights), for the "smaller build" hint


# ---------------------------------------------------------------- the estimate


@dataclass
class MemoryEstimate:
    """Predicted peak resident bytes of ``parallel`` sessions of one artifact at ``n_ctx``."""

    weights_bytes: int  # once, however many sessions
    kv_bytes_per_session: int  # kv_bytes_per_token x n_ctx
    overhead_bytes_per_session: int  # compute buffers, attention scratch, tokenizer, repacked weights
    parallel: int
    n_ctx: int | None  # None for encoders
    basis: str  # "calibrated llamacpp/gguf overhead" or "default overhead"
    artifact: str = ""  # the model file's name, for messages
    _model: Any = field(default=None, repr=False, compare=False)  # what the hint recomputes alternatives from

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.parallel * (self.kv_bytes_per_session + self.overhead_bytes_per_session)

    def parts(self) -> str:
        """``weights 94 MiB + 2 x (KV cache for n_ctx=2048 45 MiB + runtime 105 MiB)``."""
        session = f"runtime {_mib(self.overhead_bytes_per_session)}"
        if self.kv_bytes_per_session:
            session = f"KV cache for n_ctx={self.n_ctx} {_mib(self.kv_bytes_per_session)} + {session}"
        if self.parallel > 1:
            session = f"{self.parallel} x ({session})"
        return f"weights {_mib(self.weights_bytes)} + {session}"

    def describe(self) -> str:
        """``weights 94 MiB + 2 x (KV cache for n_ctx=2048 45 MiB + runtime 105 MiB) = 398 MiB``."""
        return f"{self.parts()} = {_mib(self.total_bytes)}"


@dataclass
class _Model:
    """What the estimate depends on, read once from the artifact; the hint re-evaluates it at other settings."""

    name: str
    runtime: str
    format: str
    kind: str
    size: int
    parameters: int
    bytes_by_type: dict[str, int]
    kv_per_token: int
    heads: float  # attention heads of one layer (whose scores are the scratch)
    context: int | None  # the longest context the session opens (ONNX max_position, Core ML context)
    default_n_ctx: int
    hidden: int
    max_length: int  # encoders: tokens per text
    cal: Any  # the stored Calibration, or None

    def n_ctx(self, n_ctx: int | None) -> int:
        """The context the session will really have: its default, clamped as it clamps, padded as llama.cpp pads."""
        n = int(n_ctx or self.default_n_ctx)
        if n < 1:
            raise InputError(f"n_ctx must be at least 1, not {n}", "e.g. n_ctx=2048")
        if self.context:
            n = min(n, self.context)
        if self.runtime == "llamacpp":
            n = -(-n // LLAMACPP_CTX_PAD) * LLAMACPP_CTX_PAD
        return n

    def _scratch(self, n: int) -> float:
        per = {"llamacpp": LLAMACPP_SCRATCH_PER_HEAD * self.heads + LLAMACPP_SCRATCH_FIXED,
               "onnxruntime": ORT_SCRATCH_PER_HEAD * self.heads}.get(self.runtime, 0.0)
        return per * n * min(N_BATCH, n)

    def at(self, n_ctx: int | None = None, parallel: int = 1, kv_type: str | None = None) -> MemoryEstimate:
        if int(parallel) < 1:
            raise InputError(f"parallel must be at least 1, not {parallel}", "e.g. parallel=1")
        calibrated = self.cal is not None and bool(self.cal.points) and self.kind == "decoder"
        if calibrated:
            extra = self.cal.mem_extra
        else:
            extra = {"llamacpp": LLAMACPP_REPACKED, "onnxruntime": ORT_LOADED}.get(self.runtime, {})
        copies = sum(b * extra.get(t, 0.0) for t, b in self.bytes_by_type.items())
        # llama.cpp repacks per Llama (per session); ONNX sessions share one InferenceSession's copies
        shared, per_session = (0.0, copies) if self.runtime == "llamacpp" else (copies, 0.0)
        if self.kind == "encoder":
            n, kv = None, 0
            overhead = (ORT_ENCODER_SESSION_BYTES + ORT_ENCODER_BATCH * self.max_length * self.hidden * ORT_ENCODER_ACTIVATION
                        if self.runtime == "onnxruntime" else OTHER_SESSION_BYTES)
        else:
            n = self.n_ctx(n_ctx)
            from edgekit.targets.facts import kv_type_factor

            kv = self.kv_per_token * kv_type_factor(self.runtime, kv_type) * n
            if calibrated:
                # the calibration's peak already holds the scratch of the contexts it measured at
                measured = max((int(c) for p in self.cal.points for c, _ in p.get("decode", [])), default=0)
                overhead = self.cal.mem_overhead_bytes + max(0.0, self._scratch(n) - self._scratch(measured))
            else:
                base = {"llamacpp": LLAMACPP_SESSION_BYTES, "onnxruntime": ORT_SESSION_BYTES}.get(self.runtime,
                                                                                                  OTHER_SESSION_BYTES)
                overhead = base + self._scratch(n)
        basis = f"calibrated {self.runtime}/{self.format} overhead" if calibrated else "default overhead"
        return MemoryEstimate(int(self.size + shared), int(kv), int(overhead + per_session), int(parallel), n, basis,
                              self.name, self)


def estimate(path: str | Path, n_ctx: int | None = None, parallel: int = 1, kv_type: str | None = None) -> MemoryEstimate:
    """The predicted peak of ``parallel`` sessions of the artifact at ``path`` opened with ``n_ctx`` (default:
    the session's own, 2048 for decoders, clamped to the longest context the artifact holds). Reads only
    the artifact's header or graph; an artifact whose facts cannot be read is one :class:`InputError`."""
    from edgekit.session import resolve_artifact, runtime_of

    file, named, _ = resolve_artifact(path)
    return _read(file, runtime_of(file, named)).at(n_ctx, parallel, kv_type)


def _read(file: Path, rt) -> _Model:
    from edgekit.contracts import Runtime
    from edgekit.targets import predict

    kind = rt.kind(file)
    header = None
    if rt.format == "gguf" and getattr(rt.facts, "__func__", None) is Runtime.facts.__func__:
        from edgekit.formats.gguf_header import check

        # the built-in facts, from a header read in milliseconds instead of gguf's reader's seconds; a malformed
        # one (a block count of 2^31 would have the estimate allocate per-layer lists of that length) is refused
        header = check(file)
    if header is not None:
        from edgekit.targets.facts import gguf_facts

        facts = gguf_facts(file, reader=header)
    elif rt.format == "onnx" and rt.name == "onnxruntime" and "onnx" not in sys.modules:
        return _read_onnx_light(file, rt, kind, predict)
    else:
        facts = rt.facts(file)
    context = facts.extra.get("context")
    return _Model(file.name, rt.name, rt.format, kind, int(facts.size_bytes), int(facts.parameters),
                  dict(facts.bytes_by_type), int(getattr(facts, "kv_bytes_per_token", 0) or 0), _heads(file, facts, header),
                  int(context) if context else None, _session_n_ctx(rt, kind) or int(context or DEFAULT_N_CTX),
                  int(facts.hidden_size or 0), int(facts.extra.get("max_length") or 0), predict.load(rt.name, rt.format))


# the storage type an edgekit ONNX artifact's matrices have, by the manifest's recipe quant
_ONNX_QUANT_TYPE = {"int4": "NBITS4", "q4_0": "NBITS4", "int8": "NBITS8", "q8_0": "NBITS8", "f16": "F16", "fp16": "F16",
                    "fp32": "F32", "f32": "F32"}


def _read_onnx_light(file: Path, rt, kind: str, predict) -> _Model:
    """An edgekit ONNX artifact's estimate from its files' sizes, ``onnx_config.json`` and the manifest, without
    the ``onnx`` package: apps load through ONNX Runtime alone (the [runtime] install has no onnx), and parsing
    the graph there would cost a heavy import on every load. Every byte is taken to be of the recipe's main
    type (the 8-bit head of a 4-bit recipe then counts ORT's 4-bit copy factor: a slight overestimate)."""
    import json

    from edgekit.formats.onnx import CONFIG

    cfg = CONFIG.read(file, kind)
    size = sum(p.stat().st_size for p in file.parent.iterdir() if p.is_file() and p.name.startswith(file.name))
    quant = None
    manifest = file.parent / "manifest.json"
    if manifest.is_file():
        try:
            quant = (json.loads(manifest.read_text()).get("recipe") or {}).get("quant")
        except (OSError, ValueError, RecursionError):
            quant = None
    typ = _ONNX_QUANT_TYPE.get(str(quant), max(ORT_LOADED, key=ORT_LOADED.get))  # unknown: the largest copy
    if kind == "encoder":
        return _Model(file.name, rt.name, rt.format, kind, size, 0, {typ: size}, 0, 0.0, None, 0,
                      int(cfg.get("hidden_size") or cfg["dim"]), int(cfg["max_length"]), predict.load(rt.name, rt.format))
    kv = 2 * sum(int(h) for h in cfg["layer_kv_heads"]) * int(cfg["head_dim"]) * 4  # float32 cache (onnx_facts)
    hidden = int(cfg.get("hidden_size") or 0)
    context = int(cfg["max_position"])
    return _Model(file.name, rt.name, rt.format, kind, size, 0, {typ: size}, kv, hidden / 64 if hidden else 0.0, context,
                  _session_n_ctx(rt, kind) or context, hidden, 0, predict.load(rt.name, rt.format))


def _session_n_ctx(rt, kind: str) -> int | None:
    """The ``n_ctx`` default of the session class ``rt`` opens for ``kind`` (None: it opens the exported context)."""
    session = rt.sessions.get(kind)
    if isinstance(session, str):  # "module:Class", as Runtime.open imports it
        module, _, attr = session.partition(":")
        session = getattr(importlib.import_module(module), attr)
    param = inspect.signature(session).parameters.get("n_ctx") if session is not None else None
    return param.default if param is not None and isinstance(param.default, int) else None


def _heads(file: Path, facts, header) -> float:
    """Attention heads per layer: the GGUF's head count, or what an ONNX graph's attention FLOPs imply
    (4 x heads x head_dim per layer and context token); hidden / 64 (the usual head size) otherwise."""
    if header is not None:
        arch = header.value("general.architecture")
        heads = header.value(f"{arch}.attention.head_count", 0)
        return float(max(heads) if isinstance(heads, list) else heads or 0)
    if facts.format == "onnx" and facts.extra.get("kind") == "decoder":
        from edgekit.formats.onnx import CONFIG

        head_dim = int(CONFIG.read(file, "decoder")["head_dim"])
        return facts.attn_flops_per_token_per_ctx / (4 * head_dim * int(facts.extra["num_layers"]))
    return (facts.hidden_size or 0) / 64


# ---------------------------------------------------------------- what is available, and the check


def available_bytes() -> int:
    """Memory a new session can take now: psutil's ``available`` (free memory plus page cache the kernel can
    drop), or less when this process's cgroup (a container) has a memory limit closer to being reached."""
    import psutil

    avail = int(psutil.virtual_memory().available)
    room = _cgroup_room()
    return min(avail, room) if room is not None else avail


def _cgroup_room() -> int | None:
    """cgroup v2 ``memory.max - memory.current`` of this process's cgroup (None without a limit). The page
    cache the kernel would reclaim first (``inactive_file``) counts as room, as it does in ``available``."""
    dirs = [Path("/sys/fs/cgroup")]
    try:
        own = Path("/proc/self/cgroup").read_text().splitlines()
        dirs[:0] = [Path("/sys/fs/cgroup") / line[3:].lstrip("/") for line in own if line.startswith("0::")]
    except OSError:
        pass
    for d in dirs:
        try:
            limit = (d / "memory.max").read_text().strip()
            if limit == "max":
                return None
            used = int((d / "memory.current").read_text())
            try:
                stat = dict(line.split()[:2] for line in (d / "memory.stat").read_text().splitlines())
                used -= int(stat.get("inactive_file", 0))
            except (OSError, ValueError, RecursionError):
                pass
            return max(0, int(limit) - used)
        except (OSError, ValueError, RecursionError):
            continue
    return None


_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1024**3, "gb": 1000**3, "gib": 1024**3, "t": 1024**4, "tb": 1000**4, "tib": 1024**4}


def parse_bytes(value: int | float | str | None) -> int | None:
    """``max_memory`` as bytes: an int, or "512MB" (decimal), "2GiB" / "2g" (binary), "123456"; None stays None."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value > 0:
            return int(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS and float(m.group(1)) > 0:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise InputError(f"max_memory {value!r} is not a size", "pass bytes or a size such as '512MB', '2GiB'")


def _limit(max_memory) -> tuple[int, str]:
    limit = parse_bytes(max_memory)
    return (limit, " (max_memory)") if limit is not None else (available_bytes(), "")


def check_fits(path: str | Path, n_ctx: int | None = None, parallel: int = 1, max_memory: int | str | None = None,
               ) -> MemoryEstimate:
    """The estimate, when it fits ``max_memory`` (bytes or "2GiB"; default: :func:`available_bytes`); else one
    :class:`MemoryFitError` saying what it needs, what there is, and what would fit."""
    limit, where = _limit(max_memory)
    est = estimate(path, n_ctx, parallel)
    _require(est, limit, where)
    return est


def guard(file: Path, rt, n_ctx: int | None = None, max_memory: int | str | None = None,
          kv_type: str | None = None) -> MemoryEstimate | None:
    """What ``edgekit.load`` and ``edgekit profile`` run before opening ``file`` with runtime ``rt``: a bad
    ``max_memory`` and a model that does not fit are errors; a runtime that cannot run here (Core ML off
    macOS) and facts that cannot be read skip the check (the runtime's own open then says what is wrong)."""
    limit, where = _limit(max_memory)
    if rt.unavailable_reason():
        return None
    try:
        model = _read(Path(file), rt)
    except Exception:  # noqa: BLE001 (unreadable facts must not stop a load the runtime may still manage)
        return None
    est = model.at(n_ctx, 1, kv_type)
    _require(est, limit, where)
    return est


def check_total(estimates: list[MemoryEstimate], names: list[str], max_memory: int | str | None = None,
                bypass: str = "pass check_memory=False") -> int:
    """Several models in one process (``edgekit serve``): their sum must fit; the total, or one MemoryFitError."""
    limit, where = _limit(max_memory)
    total = sum(e.total_bytes for e in estimates)
    if total <= limit:
        return total
    if len(estimates) == 1:
        _require(replace(estimates[0], artifact=names[0] if names else estimates[0].artifact), limit, where, bypass)
    listed = ", ".join(f"{n} ~{_mib(e.total_bytes)}" for n, e in zip(names, estimates))
    big = max(estimates, key=lambda e: e.total_bytes)
    room = limit - (total - big.total_bytes)  # what the biggest may take beside the others
    ways = _ways(big, room) if room > 0 else []
    raise MemoryFitError(f"the {len(estimates)} models need ~{_mib(total)} together ({listed}) but only {_mib(limit)} "
                         f"is available{where}", "; ".join(["serve fewer models", *ways, f"or {bypass}"]))


def _require(est: MemoryEstimate, limit: int, where: str, bypass: str = "pass check_memory=False") -> None:
    if est.total_bytes <= limit:
        return
    ways = _ways(est, limit)
    raise MemoryFitError(f"{est.artifact or 'the model'} needs ~{_mib(est.total_bytes)} ({est.parts()}) but only "
                         f"{_mib(limit)} is available{where}",
                         "; ".join([*ways, f"or {bypass}"]) if ways else f"free memory, or {bypass}")


def _ways(est: MemoryEstimate, limit: int) -> list[str]:
    """What would fit in ``limit``: a shorter context, fewer parallel sessions, else a 4-bit build."""
    m: _Model | None = est._model
    if m is None:
        return []
    fits = []
    if est.n_ctx and est.kv_bytes_per_session:  # the largest power of two from 256 that fits
        ctxs = [c for c in (1 << k for k in range(8, 31)) if c < est.n_ctx and m.at(c, est.parallel).total_bytes <= limit]
        if ctxs:
            fits.append(f"n_ctx={ctxs[-1]} (~{_mib(m.at(ctxs[-1], est.parallel).total_bytes)})")
    if est.parallel > 1:
        fewer = [p for p in range(1, est.parallel) if m.at(est.n_ctx, p).total_bytes <= limit]
        if fewer:
            fits.append(f"parallel={fewer[-1]} (~{_mib(m.at(est.n_ctx, fewer[-1]).total_bytes)})")
    if fits:
        return ["it would fit with " + " or with ".join(fits)]
    bits = 8 * m.size / m.parameters if m.parameters else 0
    if bits > Q4_0_BITS + 0.5:  # a 4-bit build of the same model: the weights scaled by bits per weight
        q4 = "NBITS4" if m.format == "onnx" else "Q4_0"
        size = int(m.parameters * Q4_0_BITS / 8)
        small = replace(m, size=size, bytes_by_type={q4: size}).at(est.n_ctx, est.parallel)
        return [f"a q4_0 build ({Q4_0_BITS} bits per weight, this one has {bits:.1f}) would need ~{_mib(small.total_bytes)}"]
    return []


def _mib(n: float) -> str:
    if n < 10 * MiB:
        return f"{n / MiB:.1f} MiB"
    return f"{n / MiB:.0f} MiB" if n < 10 * 1024 * MiB else f"{n / (1024 * MiB):.1f} GiB"


__all__ = ["MemoryEstimate", "estimate", "available_bytes", "check_fits", "check_total", "parse_bytes", "guard"]
