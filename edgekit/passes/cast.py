"""Half-precision storage for every matrix (norms stay float32, as llama.cpp's F16 files do)."""

from __future__ import annotations

from edgekit.model import Cast, Model
from edgekit.passes import Pass, PassContext


class F16Pass(Pass):
    name = "f16"
    description = "float16 weights (norms float32)"
    kinds = frozenset({"decoder", "encoder"})
    tolerance = {"kld_mean": 5e-3, "cosine_distance_mean": 1e-4, "cosine_distance_worst": 1e-3}

    def apply(self, model: Model, ctx: PassContext) -> dict:
        names = model.linear_names()
        for n in names:
            model.encodings[n] = Cast("f16")
        return {"pass": self.name, "tensors": len(names)}


class F32Pass(Pass):
    """No compression: every tensor stays float32 (``--quant fp32``, the float reference as an artifact)."""

    name = "fp32"
    description = "float32 weights (no quantization)"
    kinds = frozenset({"decoder", "encoder"})
    tolerance = {"kld_mean": 1e-3, "cosine_distance_mean": 1e-5, "cosine_distance_worst": 1e-4}

    def apply(self, model: Model, ctx: PassContext) -> dict:
        return {"pass": self.name, "tensors": 0}
