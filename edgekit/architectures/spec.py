"""The hyper-parameters of a decoder, for every architecture: what torch, llama.cpp, ONNX and Core ML need.

One dataclass covers the six decoder families because they differ by a handful of switches (biases,
qk-norm, sandwich norms, GeGLU, embedding scale, sliding windows, partial rotary, rope scaling); each
architecture module (``edgekit/architectures/<name>.py``) fills it from its Hugging Face config and
GGUF metadata. Norm weights are always kept as the multiplier the norm applies (Gemma's ``1 + w`` is
folded in when reading), so no consumer needs to know about Gemma's offset.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass(frozen=True)
class DecoderSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position: int = 2048
    tie_word_embeddings: bool = True
    arch: str = "llama"
    # architecture switches (defaults are Llama's)
    attn_bias: bool = False  # q/k/v projections carry biases (Qwen2)
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before rotary (Qwen3, Gemma 3)
    sandwich_norms: bool = False  # extra norms after attention and after the MLP (Gemma 3)
    activation: str = "silu"  # gated MLP activation: "silu" or "gelu_tanh" (GeGLU)
    embed_scale: float = 1.0  # the input embedding is multiplied by this (Gemma: sqrt(hidden))
    attn_scale: float | None = None  # softmax scale; None = head_dim ** -0.5
    sliding_window: int | None = None  # keys kept by sliding layers, the current one included
    layer_types: tuple[str, ...] | None = None  # per layer SLIDING / FULL; None = every layer FULL
    rope_local_theta: float | None = None  # rope base of sliding layers (Gemma 3); None = rope_theta
    partial_rotary: float = 1.0  # fraction of head_dim that is rotated (Phi-3 / Phi-4-mini)
    rope_scaling: dict[str, Any] | None = None  # global layers: {"rope_type": "llama3"|"linear"|"freq_factors", ...}
    extra: dict[str, Any] = field(default_factory=dict)  # architecture-specific facts kept for round trips

    def __post_init__(self) -> None:
        if self.layer_types is not None and not isinstance(self.layer_types, tuple):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")
        bad = [f"{k}={getattr(self, k)!r}" for k in sizes if not isinstance(getattr(self, k), int) or getattr(self, k) <= 0]
        if bad:
            raise ValueError(f"sizes must be positive integers: {', '.join(bad)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads} query heads do not share {self.num_kv_heads} key/value heads evenly")
        if self.layer_types is not None and len(self.layer_types) != self.num_layers:
            raise ValueError(f"{len(self.layer_types)} layer types for {self.num_layers} layers")

    # ------------------------------------------------------------------ derived facts

    @property
    def rotary_dim(self) -> int:
        return int(round(self.head_dim * self.partial_rotary))

    @property
    def softmax_scale(self) -> float:
        return float(self.attn_scale) if self.attn_scale is not None else float(self.head_dim ** -0.5)

    def is_sliding(self, i: int) -> bool:
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[i] == SLIDING

    def window(self, i: int) -> int | None:
        """Keys layer ``i`` attends to (the current one included), None for full attention."""
        return self.sliding_window if self.is_sliding(i) else None

    def rope_kind(self, i: int) -> str:
        """"local" for sliding layers with their own rope base, else "global"."""
        return "local" if self.rope_local_theta is not None and self.is_sliding(i) else "global"

    def inv_freq(self, kind: str = "global") -> np.ndarray:
        """Rotary inverse frequencies (float32, ``rotary_dim / 2``), in transformers' order of operations."""
        dim = self.rotary_dim
        base = self.rope_local_theta if kind == "local" and self.rope_local_theta is not None else self.rope_theta
        inv = (1.0 / (float(base) ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))).astype(np.float32)
        if kind == "local" or not self.rope_scaling:
            return inv
        return _scaled(inv, self.rope_scaling)

    def tensor_names(self) -> list[str]:
        """Every tensor of the model, in edgekit's neutral names (see :mod:`edgekit.architectures.layout`)."""
        from edgekit.architectures.layout import tensor_names

        return tensor_names(self)

    def output_head_name(self) -> str:
        from edgekit.architectures.layout import output_head

        return output_head(self)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layer_types"] = list(self.layer_types) if self.layer_types is not None else None
        return d


def _scaled(inv: np.ndarray, rs: dict[str, Any]) -> np.ndarray:
    kind = rs.get("rope_type") or rs.get("type")
    if kind == "linear":
        return (inv / np.float32(rs["factor"])).astype(np.float32)
    if kind == "freq_factors":  # as a GGUF stores it: theta / factor (llama.cpp's rope_freqs tensor)
        return (inv / np.asarray(rs["factors"], dtype=np.float32)).astype(np.float32)
    if kind == "llama3":  # transformers' _compute_llama3_parameters, step for step
        factor, lo, hi = float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old = float(rs["original_max_position_embeddings"])
        lo_wl, hi_wl = old / lo, old / hi
        wavelen = (2 * math.pi / inv).astype(np.float32)
        out = np.where(wavelen > lo_wl, inv / np.float32(factor), inv).astype(np.float32)
        smooth = ((old / wavelen - lo) / (hi - lo)).astype(np.float32)
        smoothed = ((1 - smooth) * out / np.float32(factor) + smooth * out).astype(np.float32)
        medium = ~(wavelen < hi_wl) & ~(wavelen > lo_wl)
        return np.where(medium, smoothed, out).astype(np.float32)
    raise ValueError(f"rope scaling {kind!r} is not supported")


def rope_tables(spec: DecoderSpec, positions: int, kind: str = "global") -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) float32 ``[positions, rotary_dim / 2]`` for GroupQueryAttention-style caches."""
    freqs = np.arange(positions, dtype=np.float32)[:, None] * spec.inv_freq(kind)[None, :]
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)

