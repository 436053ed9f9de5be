"""Put edgekit's own numbers into a Core ML program, and read them back from a saved package.

Passes decide the numbers; this module only packs them. A MIL graph pass, appended to the end of
the conversion's pass pipeline, replaces each tensor's const (found by the parameter name ``w<k>`` the
traced decoder gave it, see :mod:`edgekit.converters.coreml_torch`; encoders find theirs by value)
with a compile-time decompression op built from the encoding's integers and fp16 scales, never from
float weights:

- ``BlockQuant`` 4 or 8 bits -> ``constexpr_blockwise_shift_scale(data=q as int4/int8,
  scale=[out, in/block] fp16)`` (iOS 18): ``W = scale * q``, exactly BlockQuant's definition.
- ``BlockQuant`` 2 bits (ternary {-1, 0, +1}; the class allows -2 too) -> ``constexpr_lut_to_dense``
  with uint2 indices ``q + 2`` and one 4-entry fp16 table ``{-2s, -s, 0, +s}`` per block: Core ML has no
  2-bit linear type, and a table of multiples of ``s`` by powers of two holds every value exactly
  (2 bits + 64/block bits per weight).
- ``Cast("f16")`` (and float32, which an ML program stores as fp16 too): the fp16 const the
  conversion made, left as it is.
- 1-D tensors (RMSNorm weights, q/k norms, q/k/v biases): never block-quantized (a block encoding is
  2-D); stored fp16 like every float tensor. The program computes at fp16 precision, so an fp32 const
  would only be cast to fp16 where it is used; fp16 is what runs, and what the read-back compares
  (``tensor.astype(float16)``, bit for bit). Each stays a separate const under its own name: the
  decoder's pipeline drops :data:`RENAMING_PASSES`, so a bias is an ``add`` after its ``linear`` rather
  than folded into a new, unnamed linear bias. A norm of all ones or a bias of all zeros can vanish
  with the no-op ``mul`` / ``add`` that used it (coremltools' no-op elimination): the decoder
  exporter's read-back lists such tensors as ``elided_identity`` instead of failing on them.

:func:`read_back` opens the saved package's MIL program and rebuilds, for every tensor, the stored
integers and scales (or fp16 values); :func:`check_read_back` compares them with the encodings bit for
bit. Both run on Linux: nothing here needs Core ML's runtime.
"""

from __future__ import annotations

import re
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edgekit.model import BlockQuant, Model

PASS_NAME = "edgekit::pack_edgekit_weights"
_PARAM = re.compile(r"^w(\d+)(?:_|$)")
_job = threading.local()


def const_name(name: str) -> str:
    """The name of the op holding tensor ``name`` (edgekit's neutral name) in the package (MIL names: no dots)."""
    return "edgekit__" + name.replace(".", "_")


def storage_kind(model: Model, name: str) -> str:
    """How ``name`` is stored in the package: "int4", "int8", "lut2" or "fp16"."""
    enc = model.encoding(name)
    if isinstance(enc, BlockQuant):
        return {4: "int4", 8: "int8", 2: "lut2"}.get(enc.bits, f"unsupported{enc.bits}")
    return "fp16"


def unsupported(model, names: list[str] | None = None) -> str | None:
    """Why the tensors' encodings cannot be packed (None when they can)."""
    for n in names if names is not None else model.linear_names():
        enc = model.encoding(n)
        if isinstance(enc, BlockQuant) and enc.bits not in (2, 4, 8):
            return f"{n}: {enc.bits}-bit weights have no exact Core ML form here (2, 4 and 8 bits do)"
    return None


def lut2(bq: BlockQuant) -> tuple[np.ndarray, np.ndarray]:
    """(indices uint8 in 0..3 [out, in], lut fp16 [out, in/block, 4, 1]) for a 2-bit BlockQuant."""
    rows, cols = bq.shape
    s = bq.scales.astype(np.float16)
    if np.any(np.abs(s.astype(np.float32)) * 2 > np.finfo(np.float16).max):
        raise ValueError("a ternary scale is too large for an exact fp16 table entry -2s")
    levels = np.array([-2, -1, 0, 1], dtype=np.float16)  # multiples by powers of two: exact in fp16
    lut = (s[..., None] * levels).astype(np.float16)[..., None]
    return (bq.q.astype(np.int16) + 2).astype(np.uint8), lut


def _compressed_var(mb, types, enc: BlockQuant, name: str, before_op):
    if enc.bits in (4, 8):
        dtype = types.np_int4_dtype if enc.bits == 4 else np.int8
        return mb.constexpr_blockwise_shift_scale(data=enc.q.astype(np.int8).astype(dtype),
                                                  scale=enc.scales.astype(np.float16), before_op=before_op, name=name)
    idx, lut = lut2(enc)
    return mb.constexpr_lut_to_dense(indices=idx.astype(types.np_uint2_dtype), lut=lut, before_op=before_op, name=name)


def _register() -> None:
    """Register the graph pass once (coremltools' registry is global)."""
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY, register_pass

    if PASS_NAME in PASS_REGISTRY:
        return

    @register_pass(namespace="edgekit")
    class pack_edgekit_weights(AbstractGraphPass):  # noqa: N801 (coremltools names passes by class name)
        def apply(self, prog) -> None:
            job = getattr(_job, "current", None)
            if job is None:
                raise RuntimeError("pack_edgekit_weights runs only inside coreml_weights.packing()")
            for func in prog.functions.values():
                _pack_block(func, job)


def by_param_name(names: list[str]):
    """Find a tensor by the parameter name ``w<k>`` the decoder module gave it (``k`` indexes ``names``)."""

    def lookup(op) -> str | None:
        m = _PARAM.match(op.name)
        return names[int(m.group(1))] if m and int(m.group(1)) < len(names) else None

    return lookup


def by_value(model, names: list[str]):
    """Find a tensor by its fp16 value (for modules whose parameter names coremltools rewrites): the
    conversion rounds every float32 const to fp16, so the const holds exactly ``tensor.astype(fp16)``."""
    import hashlib

    index: dict[tuple, str] = {}
    for n in names:
        t = np.ascontiguousarray(model.tensors[n].astype(np.float16))
        index.setdefault((t.shape, hashlib.sha1(t.tobytes()).hexdigest()), n)

    def lookup(op) -> str | None:
        val = op.outputs[0].val
        if val is None or np.ndim(val) != 2:
            return None
        v = np.ascontiguousarray(np.asarray(val).astype(np.float16))
        return index.get((v.shape, hashlib.sha1(v.tobytes()).hexdigest()))

    return lookup


def _pack_block(block, job: dict[str, Any]) -> None:
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    model = job["model"]
    for op in list(block.operations):
        for inner in op.blocks:
            _pack_block(inner, job)
        if op.op_type != "const" or op.name.startswith("edgekit__"):
            continue
        name = job["lookup"](op)
        if name is None:
            continue
        val = op.outputs[0].val
        if val is None or tuple(val.shape) != tuple(model.tensors[name].shape):
            raise RuntimeError(f"const {op.name} does not have the shape of {name}")
        enc = model.encoding(name)
        job["found"].setdefault(name, []).append(op.name)
        new = job["vars"].get(name) if block is job["vars_block"].get(name) else None
        if new is None:  # a tensor the conversion left in two consts is stored once
            with block:
                if isinstance(enc, BlockQuant):
                    new = _compressed_var(mb, types, enc, const_name(name), op)
                else:  # keep the fp16 values the conversion made, under a name read_back can find
                    new = mb.const(val=np.asarray(val), before_op=op, name=const_name(name))
            job["vars"][name], job["vars_block"][name] = new, block
        block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=new,
                                           no_check_var_types=True, force_replace=True)
        block.remove_ops([op])


@contextmanager
def packing(model, lookup) -> Iterator[dict[str, Any]]:
    """Within this block, conversions run with :data:`PASS_NAME` packing ``model``'s encodings into the
    consts ``lookup(op)`` names (a tensor name, or None for consts that are not weights)."""
    _register()
    job = {"model": model, "lookup": lookup, "found": {}, "vars": {}, "vars_block": {}}
    _job.current = job
    try:
        yield job
    finally:
        _job.current = None


# passes that replace a weight's const by a new, unnamed one: ``fuse_linear_bias`` folds a bias add into
# the linear (new weight and bias consts), ``const_deduplication`` drops a tensor whose values equal
# another's (two equal norms). Decoders find every tensor by its parameter name, so they run without them:
# a bias stays an ``add`` after its linear, and each linear keeps its own all-zero fp16 bias const (the
# torch frontend's; about 0.4 MB in a 135M-parameter model, which deduplication would have shared).
RENAMING_PASSES = ("common::fuse_linear_bias", "common::const_deduplication")


def pipeline(keep_names: bool = False):
    """coremltools' default pipeline with the packing pass at its end (after the fp16 cast); with
    ``keep_names``, without :data:`RENAMING_PASSES` (every parameter's const reaches the packing pass)."""
    import coremltools as ct

    pipe = ct.PassPipeline.DEFAULT
    if keep_names:
        pipe.remove_passes(list(RENAMING_PASSES))
    pipe.append_pass(PASS_NAME)
    return pipe


# ---------------------------------------------------------------- reading a saved package back


def load_program(package: str | Path):
    """The MIL program stored in an .mlpackage (weights read from its blob file)."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    package = Path(package)
    spec = ct.utils.load_spec(str(package))
    weights = package / "Data" / "com.apple.CoreML" / "weights"
    return milproto_load(spec, spec.specificationVersion, str(weights)), spec


def _ops(prog) -> list:
    out = []

    def walk(block):
        for op in block.operations:
            out.append(op)
            for b in op.blocks:
                walk(b)

    for f in prog.functions.values():
        walk(f)
    return out


def read_back(prog, names: list[str]) -> dict[str, dict[str, Any]]:
    """For each tensor in ``names``: what the package stores under its name (kind and arrays)."""
    by_name = {op.name: op for op in _ops(prog)}
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        op = by_name.get(const_name(name))
        if op is None:
            continue
        if op.op_type == "constexpr_blockwise_shift_scale":
            data = op.data.val
            kind = "int4" if op.data.dtype == _types().int4 else "int8" if op.data.dtype == _types().int8 else str(op.data.dtype)
            out[name] = {"kind": kind, "q": np.asarray(data).astype(np.int8), "scales": np.asarray(op.scale.val),
                         "offset": None if op.offset is None else op.offset.val}
        elif op.op_type == "constexpr_lut_to_dense":
            out[name] = {"kind": f"lut{op.indices.dtype.get_bitwidth()}", "indices": np.asarray(op.indices.val).astype(np.uint8),
                         "lut": np.asarray(op.lut.val)}
        elif op.op_type == "const":
            out[name] = {"kind": "fp16" if op.outputs[0].dtype == _types().fp16 else "fp32", "values": np.asarray(op.outputs[0].val)}
        else:
            out[name] = {"kind": op.op_type}
    return out


def _types():
    from coremltools.converters.mil.mil import types

    return types


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal bit for bit, except that -0.0 equals +0.0 (a scale of zero may carry either sign)."""
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.kind == "f":
        return bool(np.array_equal(a, b) and np.array_equal(np.isnan(a), np.isnan(b)))
    return bool(np.array_equal(a, b))


def check_read_back(stored: dict[str, dict[str, Any]], model, names: list[str]) -> dict[str, Any]:
    """Compare every stored tensor in ``names`` with ``model``'s encoding; returns a summary, lists mismatches."""
    bad: list[str] = []
    kinds: dict[str, int] = {}
    for name in names:
        got = stored.get(name)
        want = storage_kind(model, name)
        if got is None:
            bad.append(f"{name}: not found in the package")
            continue
        kinds[got["kind"]] = kinds.get(got["kind"], 0) + 1
        if got["kind"] != want:
            bad.append(f"{name}: stored as {got['kind']}, expected {want}")
            continue
        enc = model.encoding(name)
        if want in ("int4", "int8"):
            ok = (got["offset"] is None and _same_bits(got["q"], enc.q.astype(np.int8))
                  and _same_bits(got["scales"], enc.scales.astype(np.float16)))
        elif want == "lut2":
            idx, lut = lut2(enc)
            # compare what the table means, not only its bytes: the dequantized weights must equal
            # BlockQuant's q * s for every element
            ok = _same_bits(got["indices"], idx) and _same_bits(got["lut"], lut)
            if ok:
                ok = _same_bits(_lut_dense(got["indices"], got["lut"]), _blockquant_dense_fp16(enc))
        else:
            ok = _same_bits(got["values"], model.tensors[name].astype(np.float16))
        if not ok:
            bad.append(f"{name}: stored {want} numbers differ from edgekit's")
    return {"tensors": len(names), "bit_exact": not bad, "mismatches": bad, "stored_as": kinds}


def _lut_dense(indices: np.ndarray, lut: np.ndarray) -> np.ndarray:
    rows, cols = indices.shape
    nb = lut.shape[1]
    blocks = indices.reshape(rows, nb, cols // nb)
    return np.take_along_axis(lut[..., 0], blocks.astype(np.int64), axis=-1).reshape(rows, cols)


def _blockquant_dense_fp16(bq: BlockQuant) -> np.ndarray:
    """q * s computed in fp16 (exact for q in {-2..1}: products by powers of two)."""
    rows, cols = bq.shape
    s = bq.scales.astype(np.float16)[..., None]
    return (bq.q.reshape(rows, cols // bq.block_size, bq.block_size).astype(np.float16) * s).reshape(rows, cols)


def require_bit_exact(package_name: str, prog, model, names: list[str]) -> dict:
    """Read ``names`` back from the saved program; raise ValidationError unless all equal edgekit's numbers."""
    from edgekit.errors import ValidationError

    weights = check_read_back(read_back(prog, names), model, names)
    if not weights["bit_exact"]:
        raise ValidationError(package_name, "weights read back from the package: tensors differing from edgekit's numbers",
                              len(weights["mismatches"]), 0, "; ".join(weights["mismatches"][:3]))
    return {k: v for k, v in weights.items() if k != "mismatches"}
