"""Float storage: float16 for every matrix (norms stay float32, as llama.cpp's F16 files do), or float32."""

from __future__ import annotations

from edgekit.model import Cast, Model
from edgekit.passes import Pass, PassContext


class F16Pass(Pass):
    name = "f16"
    description = "float16 weights (norms float32)"
    kinds = frozenset({"decoder", "encoder"})
    tolerance = {"kld_mean": 5e-3, "cosine_distance_mean": 1e-4, "cosine_distance_worst": 1e-3}
    dtype = "f16"

    def apply(self, model: Model, ctx: PassContext) -> dict:
        # float32 is the absence of an encoding: nothing to record per tensor
        names = model.linear_names() if self.dtype != "f32" else []
        for n in names:
            model.encodings[n] = Cast(self.dtype)
        return {"pass": self.name, "tensors": len(names)}


class F32Pass(F16Pass):
    """No compression: every tensor stays float32 (``--quant fp32``, the float reference as an artifact)."""

    name, description, dtype = "fp32", "float32 weights (no quantization)", "f32"
    tolerance = {"kld_mean": 1e-3, "cosine_distance_mean": 1e-5, "cosine_distance_worst": 1e-4}
