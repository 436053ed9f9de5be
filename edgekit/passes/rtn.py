"""Round-to-nearest block quantizers with llama.cpp's exact arithmetic (Q4_0 and Q8_0).

These reproduce ``quantize_row_q4_0_ref`` / ``quantize_row_q8_0_ref`` from ggml in float32, so an
edgekit ``q4_0`` file is what ``llama-quantize ... Q4_0`` makes from the same float weights (a test
compares the bytes). They exist in edgekit, rather than calling gguf's quantizer, because every
exporter needs the integers and scales themselves, not GGUF bytes.
"""

from __future__ import annotations

import numpy as np

from edgekit.model import BlockQuant, Model
from edgekit.passes import Pass, PassContext, is_output_head

BLOCK = 32


def _blocks(w: np.ndarray, block: int) -> np.ndarray:
    rows, cols = w.shape
    return np.ascontiguousarray(w, dtype=np.float32).reshape(rows, cols // block, block)


def quantize_q4_0(w: np.ndarray, block: int = BLOCK) -> BlockQuant:
    """ggml Q4_0: d = (value of largest magnitude) / -8; q = min(15, trunc(x/d + 8.5)) - 8."""
    b = _blocks(w, block)
    idx = np.abs(b).argmax(axis=-1)[..., None]
    d = np.take_along_axis(b, idx, axis=-1) / np.float32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    x = (b * inv).astype(np.float32) + np.float32(8.5)
    q = np.minimum(np.trunc(x), 15).astype(np.int8) - 8
    return BlockQuant(q.reshape(w.shape), d[..., 0].astype(np.float16), bits=4, block_size=block)


def quantize_q8_0(w: np.ndarray, block: int = BLOCK) -> BlockQuant:
    """ggml Q8_0: d = max|x| / 127; q = roundf(x / d) (half away from zero)."""
    b = _blocks(w, block)
    d = np.abs(b).max(axis=-1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    x = (b * inv).astype(np.float32)
    q = (np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))).astype(np.int8)
    return BlockQuant(q.reshape(w.shape), d[..., 0].astype(np.float16), bits=8, block_size=block)


class Q8_0Pass(Pass):
    name = "q8_0"
    description = "8-bit round-to-nearest, blocks of 32 (llama.cpp Q8_0)"
    kinds = frozenset({"decoder", "encoder"})
    # encoders: cos >= 0.99 on average
    tolerance = {"kld_mean": 2e-2, "cosine_distance_mean": 0.01, "cosine_distance_worst": 0.05}

    def apply(self, model: Model, ctx: PassContext) -> dict:
        names = model.linear_names()
        for n in names:
            model.encodings[n] = quantize_q8_0(model.tensors[n])
        return {"pass": self.name, "tensors": len(names), "block_size": BLOCK}


class Q4_0Pass(Pass):
    """Plain round-to-nearest Q4_0, for comparison with the data-aware ``int4``.

    Like llama-quantize's Q4_0 on a model whose rows are not a multiple of 256, the tensor that
    projects to the vocabulary (the tied embedding) stays at Q8_0: it is what quality is most
    sensitive to, and llama.cpp makes the same choice.
    """

    name = "q4_0"
    description = "4-bit round-to-nearest, blocks of 32 (llama.cpp Q4_0), output head Q8_0"
    kinds = frozenset({"decoder", "encoder"})
    # encoders: cos >= 0.97 on average
    tolerance = {"kld_mean": 0.6, "cosine_distance_mean": 0.03, "cosine_distance_worst": 0.15}

    def apply(self, model: Model, ctx: PassContext) -> dict:
        names = model.linear_names()
        for n in names:
            w = model.tensors[n]
            model.encodings[n] = quantize_q8_0(w) if is_output_head(model, n) else quantize_q4_0(w)
        return {"pass": self.name, "tensors": len(names), "block_size": BLOCK, "output_head": "q8_0"}
