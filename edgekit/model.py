"""Core types: the architecture spec, the float model, and format-neutral compressed tensors.

Passes decide the numbers and record them here (integers, scales, block size); exporters only pack
these numbers into their container (GGUF today; ONNX and Core ML pack the very same arrays).
Tensor names are edgekit's neutral roles (:mod:`edgekit.architectures.layout`, e.g. ``layers.0.attn.q.weight``),
with weights stored ``[out_features, in_features]`` and q/k rows in Hugging Face's rotate-half order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgekit.architectures.layout import LOWRANK_A, LOWRANK_B, linear, GATE, K, Q
from edgekit.architectures.spec import DecoderSpec


@dataclass
class BlockQuant:
    """Symmetric block-wise integer weights: ``W[r, c] = scales[r, c // block_size] * q[r, c]``.

    ``q`` holds signed integers in ``[-2**(bits-1), 2**(bits-1) - 1]`` (int8 storage) and ``scales``
    the per-block scales as float16, exactly as they are stored. This is the format-neutral form every
    exporter packs: GGUF Q4_0 / Q8_0 blocks, ONNX MatMulNBits (zero point 2**(bits-1)), Core ML
    blockwise shift-scale.
    """

    q: np.ndarray
    scales: np.ndarray
    bits: int
    block_size: int

    def __post_init__(self) -> None:
        rows, cols = self.q.shape
        if cols % self.block_size:
            raise ValueError(f"{cols} columns are not a multiple of the block size {self.block_size}")
        if self.scales.shape != (rows, cols // self.block_size):
            raise ValueError(f"scales shape {self.scales.shape} does not match q {self.q.shape}")
        lo, hi = -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        if self.q.size and (self.q.min() < lo or self.q.max() > hi):
            raise ValueError(f"integers outside [{lo}, {hi}] for {self.bits}-bit weights")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]

    @property
    def bits_per_weight(self) -> float:
        return self.bits + 16 / self.block_size

    def dequantize(self) -> np.ndarray:
        rows, cols = self.q.shape
        s = self.scales.astype(np.float32)[:, :, None]
        blocks = self.q.reshape(rows, cols // self.block_size, self.block_size).astype(np.float32)
        return (blocks * s).reshape(rows, cols)


@dataclass
class BlockCodebook:
    """Non-uniform block weights: ``W[r, c] = scales[r, c // block_size] * levels[idx[r, c]]``.

    ``levels`` is a fixed codebook named by ``codebook`` (GGUF's IQ4_NL grid: 16 integers in
    [-127, 113]); ``idx`` holds the 4-bit indices (uint8) and ``scales`` the fp16 block scales as stored.
    Formats that hold only uniform integers (ONNX MatMulNBits) cannot hold it and say so.
    """

    idx: np.ndarray
    scales: np.ndarray
    levels: np.ndarray
    block_size: int
    codebook: str

    def __post_init__(self) -> None:
        rows, cols = self.idx.shape
        if cols % self.block_size:
            raise ValueError(f"{cols} columns are not a multiple of the block size {self.block_size}")
        if self.scales.shape != (rows, cols // self.block_size):
            raise ValueError(f"scales shape {self.scales.shape} does not match idx {self.idx.shape}")
        if self.idx.size and int(self.idx.max()) >= len(self.levels):
            raise ValueError(f"indices beyond the {len(self.levels)}-entry codebook")

    @property
    def bits(self) -> int:
        return int(np.ceil(np.log2(len(self.levels))))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.idx.shape)  # type: ignore[return-value]

    @property
    def bits_per_weight(self) -> float:
        return self.bits + 16 / self.block_size

    def dequantize(self) -> np.ndarray:
        rows, cols = self.idx.shape
        s = self.scales.astype(np.float32)[:, :, None]
        v = np.asarray(self.levels, dtype=np.float32)[self.idx.astype(np.int64)]
        return (v.reshape(rows, cols // self.block_size, self.block_size) * s).reshape(rows, cols)


@dataclass
class Cast:
    """A tensor kept in floating point, stored as ``dtype`` ("f32" or "f16")."""

    dtype: str

    @property
    def bits_per_weight(self) -> float:
        return {"f32": 32.0, "f16": 16.0}[self.dtype]


Encoding = BlockQuant | BlockCodebook | Cast


class EncodedTensors:
    """What every model with ``tensors`` (float32 by name) and ``encodings`` (how each is stored) shares."""

    tensors: dict[str, np.ndarray]
    encodings: dict[str, Encoding]

    def encoding(self, name: str) -> Encoding:
        return self.encodings.get(name, Cast("f32"))

    def effective_weight(self, name: str) -> np.ndarray:
        """The weight as a runtime will compute with it (dequantized, or rounded to fp16)."""
        enc = self.encoding(name)
        if isinstance(enc, (BlockQuant, BlockCodebook)):
            return enc.dequantize()
        if enc.dtype == "f16":
            return self.tensors[name].astype(np.float16).astype(np.float32)
        return self.tensors[name]

    def num_parameters(self) -> int:
        return int(sum(t.size for t in self.tensors.values()))

    def bits_per_weight(self) -> float:
        total = sum(t.size * self.encoding(n).bits_per_weight for n, t in self.tensors.items())
        return total / max(1, self.num_parameters())


@dataclass
class Model(EncodedTensors):
    """A decoder of any registered architecture (``spec.arch``): float weights plus, after compression passes, each tensor's encoding.

    ``tensors`` always holds float32 arrays (the weights a pass produced, possibly transformed);
    ``encodings`` says how each is stored (missing means float32). ``tokenizer`` holds the vocabulary
    in llama.cpp's GGUF form (keys ``tokenizer.*``), which carries the chat template too.
    """

    spec: DecoderSpec
    tensors: dict[str, np.ndarray]
    tokenizer: dict[str, Any]
    name: str = "model"
    encodings: dict[str, Encoding] = field(default_factory=dict)
    kind = "decoder"

    def output_head_name(self) -> str:
        """The matrix that projects to the vocabulary (the embedding when tied): kept at 8 bits by 4-bit recipes."""
        return self.spec.output_head_name()

    def input_grams(self, sequences: list[list[int]], progress=None) -> dict[str, Any]:
        """Mean ``x x^T`` of each linear weight's input over ``sequences``, by weight name (lookups have none)."""
        from edgekit.architectures.layout import input_key, is_linear_weight
        from edgekit.architectures.torch_decoder import collect_input_grams

        grams = collect_input_grams(self, sequences, progress)
        return {n: grams[input_key(n)] for n in self.linear_names() if is_linear_weight(n)}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "architecture": self.spec.arch, "parameters": self.num_parameters(),
                "spec": self.spec.to_dict()}

    def tensor_order(self) -> list[str]:
        """Every tensor present, in the spec's order; a factorized linear lists its two factors in its place."""
        names = []
        for n in self.spec.tensor_names():
            if n in self.tensors:
                names.append(n)
                continue
            factors = self.lowrank_factors(n[: -len(".weight")]) if n.endswith(".weight") else None
            if factors:
                names += list(factors)
        return names

    def weights_bpw(self) -> float:
        """Bits per weight over the 2-D weights (linears and embedding) as encoded: the format-neutral
        figure ``--target-bpw`` budgets (block scales included, file headers not)."""
        names = self.linear_names()
        total = sum(self.tensors[n].size for n in names)
        return sum(self.tensors[n].size * self.encoding(n).bits_per_weight for n in names) / max(1, total)

    def linear_names(self) -> list[str]:
        """The 2-D matrices that quantization passes may encode (not the norms), factors of low-rank layers included."""
        return [n for n in self.tensor_order() if self.tensors[n].ndim == 2]

    def lowrank_factors(self, base: str) -> tuple[str, str] | None:
        """``(A, B)`` names when the linear ``base`` (e.g. ``layers.0.mlp.up``) is factorized.

        ``y = (x @ A^T) @ B^T`` with A ``[rank, in]`` applied first and B ``[out, rank]``; ``base.weight``
        is then absent. Exporters that cannot express two matrices in place of one refuse such models.
        """
        a, b = base + LOWRANK_A, base + LOWRANK_B
        return (a, b) if a in self.tensors and b in self.tensors else None

    def is_factorized(self) -> bool:
        return any(n.endswith(LOWRANK_A) for n in self.tensors)

    def layer_widths(self, i: int) -> dict[str, int]:
        """Layer ``i``'s real widths, read from its tensors (structured pruning may make layers differ)."""
        hd = self.spec.head_dim

        def rows(base: str) -> int:
            f = self.lowrank_factors(base)
            return int(self.tensors[f[1] if f else base + ".weight"].shape[0])

        return {"heads": rows(linear(i, Q)) // hd, "kv_heads": rows(linear(i, K)) // hd,
                "intermediate": rows(linear(i, GATE))}

    def is_uniform(self) -> bool:
        """True when every layer has the spec's widths (what formats with one width per model need)."""
        s = self.spec
        want = {"heads": s.num_heads, "kv_heads": s.num_kv_heads, "intermediate": s.intermediate_size}
        return all(self.layer_widths(i) == want for i in range(s.num_layers))
