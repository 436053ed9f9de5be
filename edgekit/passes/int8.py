"""``int8``: weight-only 8-bit block quantization, the numbers of llama.cpp's Q8_0.

One fp16 scale per 32 weights, integers ``round(w / (max|w| / 127))`` in [-127, 127], every matrix
including the embedding / output head. These are exactly the ``q8_0`` pass's numbers (a GGUF file of
this recipe is a Q8_0 file); the separate name says what the recipe is for formats with no "Q8_0"
(ONNX packs them into 8-bit MatMulNBits, Core ML into blockwise int8). Weight-only on purpose:
ONNX Runtime's dynamic int8 quantization, which also quantizes activations per tensor, took this
model's perplexity from 15.2 to 46.
"""

from __future__ import annotations

from edgekit.passes.rtn import Q8_0Pass


class Int8Pass(Q8_0Pass):
    name = "int8"
    description = "8-bit weight-only, blocks of 32 with fp16 scales (the Q8_0 numbers)"
    # embedding / output head included: every matrix at 8 bits

    def apply(self, model, ctx) -> dict:
        record = super().apply(model, ctx)
        return {**record, "pass": self.name, "numbers": "q8_0", "activations": "float (weight-only)"}
