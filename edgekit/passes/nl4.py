"""``nl4``: data-aware 4-bit weights on GGUF's IQ4_NL grid (a fixed non-uniform codebook, 4.5 bits/weight).

The same GPTQ error compensation and activation-weighted scale search as ``int4``
(:func:`edgekit.passes.int4.gptq_quantize`), with each weight rounded to the nearest of IQ4_NL's 16
levels times its block's fp16 scale instead of to an integer in [-8, 7]. The levels are denser near
zero, where most weights are, so the same bits lose less. Only formats with a codebook container hold
it (GGUF's IQ4_NL; ONNX's MatMulNBits has uniform integers only, and the pipeline says so before any
work). The output head stays Q8_0, as in ``int4``.
"""

from __future__ import annotations

from edgekit.passes import PassContext
from edgekit.passes.int4 import Int4Pass


class NL4Pass(Int4Pass):
    name = "nl4"
    description = "data-aware 4-bit on GGUF's IQ4_NL codebook (GPTQ + activation-weighted scale search), output head Q8_0"
    kinds = frozenset({"decoder"})
    codebook = "iq4_nl"
    grid_name = "nl4"

    def apply(self, model, ctx: PassContext) -> dict:
        return {**super().apply(model, ctx), "pass": self.name, "container": "IQ4_NL"}
