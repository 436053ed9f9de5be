"""GGUF exporter: packs a compressed :class:`~edgekit.model.Model` of any registered architecture into a
llama.cpp GGUF file.

Which tensors the file holds (fused ones included), their names, the metadata and the q/k row
permutation come from the architecture (:meth:`Architecture.gguf_tensors` / ``write_gguf_metadata``);
file writing goes through ``gguf.GGUFWriter``. The only hand-written part
is packing edgekit's own integers and scales into GGML block bytes (``pack_q4_0`` / ``pack_q8_0`` /
``pack_iq4_nl``):
gguf's quantizers take floats and choose their own scales, which would discard the numbers a
data-aware pass chose.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgekit import architectures
from edgekit.architectures.base import GGUFTensor
from edgekit.contracts import Capabilities, Exporter
from edgekit.converters.gguf_layout import permute_qk
from edgekit.formats import gguf as fmt
from edgekit.model import BlockCodebook, BlockQuant, Cast, Model


def pack_q4_0(bq: BlockQuant) -> np.ndarray:
    """GGML Q4_0 blocks: fp16 d, then 16 bytes whose low nibbles hold q[0:16] and high nibbles q[16:32], each +8."""
    assert bq.bits == 4 and bq.block_size == 32
    rows, cols = bq.shape
    nb = cols // 32
    nib = (bq.q.reshape(rows, nb, 32).astype(np.int16) + 8).astype(np.uint8)
    qs = nib[..., :16] | (nib[..., 16:] << 4)
    d = bq.scales.astype(np.float16).reshape(rows, nb, 1).view(np.uint8)
    return np.concatenate([d, qs], axis=-1).reshape(rows, nb * 18)


def pack_q8_0(bq: BlockQuant) -> np.ndarray:
    """GGML Q8_0 blocks: fp16 d, then 32 int8 values."""
    assert bq.bits == 8 and bq.block_size == 32
    rows, cols = bq.shape
    nb = cols // 32
    d = bq.scales.astype(np.float16).reshape(rows, nb, 1).view(np.uint8)
    qs = bq.q.reshape(rows, nb, 32).view(np.uint8)
    return np.concatenate([d, qs], axis=-1).reshape(rows, nb * 34)


def pack_iq4_nl(bc: BlockCodebook) -> np.ndarray:
    """GGML IQ4_NL blocks: fp16 d, then 16 bytes of codebook indices laid out as Q4_0's nibbles
    (low nibbles idx[0:16], high nibbles idx[16:32]); llama.cpp computes d * kvalues_iq4nl[idx]."""
    from edgekit.qat import IQ4_NL_LEVELS

    if bc.codebook != "iq4_nl" or bc.block_size != 32 or tuple(int(v) for v in bc.levels) != IQ4_NL_LEVELS:
        raise ValueError("IQ4_NL holds the iq4_nl codebook in blocks of 32 only")
    rows, cols = bc.shape
    nb = cols // 32
    nib = bc.idx.reshape(rows, nb, 32).astype(np.uint8)
    qs = nib[..., :16] | (nib[..., 16:] << 4)
    d = bc.scales.astype(np.float16).reshape(rows, nb, 1).view(np.uint8)
    return np.concatenate([d, qs], axis=-1).reshape(rows, nb * 18)


def pack_tq2_0(bq: BlockQuant) -> np.ndarray:
    """Ternary blocks of 256 as GGML TQ2_0, through gguf's own quantizer (checked to round-trip exactly).

    TQ2_0 stores q+1 in 2 bits and d = max|x| per 256 values: for weights that are already ternary x
    an fp16 scale, d equals that scale and every value comes back exactly. The check makes sure.
    """
    from gguf.quants import dequantize, quantize

    T = __import__("gguf").GGMLQuantizationType.TQ2_0
    w = bq.dequantize()
    packed = quantize(w, T)
    if not np.array_equal(dequantize(packed, T), w):
        raise ValueError("TQ2_0 could not hold these ternary values exactly")
    return packed


def as_q4_0_blocks(bq: BlockQuant) -> BlockQuant:
    """The same ternary values in Q4_0's container (blocks of 32 sharing their block's scale): exact."""
    rep = bq.block_size // 32
    return BlockQuant(bq.q, np.repeat(bq.scales, rep, axis=1), bits=4, block_size=32)


def _permute_rows(bq, heads: int):
    # the q/k permutation moves whole rows, so integers and scales move with them unchanged
    if isinstance(bq, BlockCodebook):
        return BlockCodebook(permute_qk(bq.idx, heads), permute_qk(bq.scales, heads), bq.levels, bq.block_size,
                             bq.codebook)
    return BlockQuant(permute_qk(bq.q, heads), permute_qk(bq.scales, heads), bq.bits, bq.block_size)


def _joined(model: Model, parts: tuple[str, ...]):
    """(encoding, float array) of the rows of ``parts`` stacked: fused GGUF tensors hold several of edgekit's."""
    encs = [model.encoding(p) for p in parts]
    if len(parts) == 1:
        return encs[0], model.tensors[parts[0]]
    first = encs[0]
    if isinstance(first, BlockCodebook):
        if not all(isinstance(e, BlockCodebook) and (e.codebook, e.block_size) == (first.codebook, first.block_size)
                   for e in encs):
            raise ValueError(f"{', '.join(parts)} are stored differently and cannot share one GGUF tensor")
        return (BlockCodebook(np.concatenate([e.idx for e in encs]), np.concatenate([e.scales for e in encs]),
                              first.levels, first.block_size, first.codebook), None)
    if isinstance(first, BlockQuant):
        if not all(isinstance(e, BlockQuant) and (e.bits, e.block_size) == (first.bits, first.block_size) for e in encs):
            raise ValueError(f"{', '.join(parts)} are stored differently and cannot share one GGUF tensor")
        return (BlockQuant(np.concatenate([e.q for e in encs]), np.concatenate([e.scales for e in encs]),
                           first.bits, first.block_size), None)
    if any(e != first for e in encs):
        raise ValueError(f"{', '.join(parts)} are stored differently and cannot share one GGUF tensor")
    return first, np.concatenate([model.tensors[p] for p in parts])


def encode_tensor(model: Model, gt: GGUFTensor) -> tuple[np.ndarray, Any, str]:
    """(array to write, GGML type or None for plain float arrays, type name) for one GGUF tensor."""
    import gguf

    T = gguf.GGMLQuantizationType
    enc, arr = _joined(model, gt.parts)
    heads = gt.permute_heads
    if isinstance(enc, BlockCodebook):
        if heads is not None:
            enc = _permute_rows(enc, heads)
        return pack_iq4_nl(enc), T.IQ4_NL, "IQ4_NL"
    if isinstance(enc, BlockQuant):
        if heads is not None:
            enc = _permute_rows(enc, heads)
        if enc.bits == 4 and enc.block_size == 32:
            return pack_q4_0(enc), T.Q4_0, "Q4_0"
        if enc.bits == 8 and enc.block_size == 32:
            return pack_q8_0(enc), T.Q8_0, "Q8_0"
        if enc.bits == 2 and enc.block_size == 256:
            return pack_tq2_0(enc), T.TQ2_0, "TQ2_0"
        if enc.bits == 2 and enc.block_size % 32 == 0:  # rows TQ2_0's 256-value blocks cannot tile
            return pack_q4_0(as_q4_0_blocks(enc)), T.Q4_0, "Q4_0 (ternary fallback)"
        raise ValueError(f"GGUF has no block type for {enc.bits}-bit blocks of {enc.block_size}")
    if heads is not None:
        arr = permute_qk(arr, heads)
    if isinstance(enc, Cast) and enc.dtype == "f16" and arr.ndim == 2:
        return np.ascontiguousarray(arr, dtype=np.float16), None, "F16"
    return np.ascontiguousarray(arr, dtype=np.float32), None, "F32"


def _file_type(type_names: list[str]) -> int:
    import gguf

    F = gguf.LlamaFileType
    for t, ft in (("TQ2_0", F.MOSTLY_TQ2_0), ("IQ4_NL", F.MOSTLY_IQ4_NL), ("Q4_0", F.MOSTLY_Q4_0), ("Q8_0", F.MOSTLY_Q8_0), ("F16", F.MOSTLY_F16)):
        if t in type_names:
            return int(ft)
    return int(F.ALL_F32)


class GGUFExporter(Exporter):
    """Writes ``model.gguf`` (the architecture's llama.cpp layout, tokenizer and chat template carried over)."""

    name = "gguf"
    filename = fmt.MODEL_FILE
    runtime = "llamacpp"
    # llama.cpp's architectures have one width per model and no factorized linears
    capabilities = Capabilities(kinds=frozenset({"decoder"}), bits=frozenset({2, 4, 8}), codebooks=frozenset({"iq4_nl"}))

    def supports(self, model: Model) -> str | None:
        """None when this exporter can pack ``model``, otherwise the reason it cannot."""
        reason = super().supports(model)
        if reason:
            return f"{reason}; --format onnx holds encoders"
        arch = architectures.of(model.spec)
        refusal = arch.format_refusal(self.name, model.spec)
        if refusal:
            return f"{refusal}; --format onnx can hold it"
        if model.is_factorized():
            return f"llama.cpp's {arch.gguf_arch} architecture has no factorized (low-rank) linear layers; --format onnx can hold them"
        if not model.is_uniform():
            return "layers have different widths after pruning; prune with uniform widths or use --format onnx"
        for n in model.tensors:
            enc = model.encoding(n)
            if isinstance(enc, BlockCodebook) and (enc.codebook != "iq4_nl" or enc.block_size != 32):
                return f"{n}: the {enc.codebook} codebook in blocks of {enc.block_size} has no GGUF type (IQ4_NL: blocks of 32)"
            if not isinstance(enc, BlockQuant):
                continue
            ok = (enc.block_size, enc.bits) in ((32, 4), (32, 8)) or (enc.bits == 2 and enc.block_size % 32 == 0)
            if not ok:
                return f"{n}: {enc.bits}-bit blocks of {enc.block_size} have no GGUF type"
        return None

    def export(self, model: Model, out_dir: Path) -> dict[str, Any]:
        import gguf

        spec = model.spec
        arch = architectures.of(spec)
        path = Path(out_dir) / self.filename
        writer = gguf.GGUFWriter(str(path), arch.gguf_arch)
        writer.add_name(model.name)
        arch.write_gguf_metadata(writer, spec)
        for key, kv in model.tokenizer.items():
            vtype = gguf.GGUFValueType[kv["type"]]
            sub = gguf.GGUFValueType[kv["sub"]] if kv.get("sub") else None
            writer.add_key_value(key, kv["value"], vtype, sub_type=sub)

        types: dict[str, str] = {}
        for name, arr in arch.gguf_extra_tensors(spec).items():
            types[name] = "F32"
            writer.add_tensor(name, arr.astype(np.float32))
        rows = {n: int(t.shape[0]) for n, t in model.tensors.items()}
        for gt in arch.gguf_tensors(spec, rows):
            arr, raw_dtype, tname = encode_tensor(model, gt)
            types[gt.name] = tname
            writer.add_tensor(gt.name, arr, raw_dtype=raw_dtype)
        writer.add_file_type(_file_type(list(types.values())))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        counts: dict[str, int] = {}
        for t in types.values():
            counts[t] = counts.get(t, 0) + 1
        from edgekit.converters.gguf_layout import gguf_weight_stats

        info: dict[str, Any] = {"file": self.filename, "kind": "decoder", "gguf_architecture": arch.gguf_arch,
                                "tensor_types": counts, "bits_per_weight": gguf_weight_stats(path)["bits_per_weight"]}
        caveat = arch.gguf_caveat(spec)
        if caveat:
            info["caveat"] = caveat
        fallback = sorted(n for n, t in types.items() if "fallback" in t)
        if fallback:
            why = "rows not a multiple of TQ2_0's 256-value blocks"
            info["ternary_fallback"] = {"container": "Q4_0 (holds the same ternary values exactly)", "why": why,
                                        "tensors": fallback}
        return info
