"""Qwen2 / Qwen2.5: Llama's layout with biases on the q, k and v projections (not o), rope theta 1e6.

GGUF ``qwen2`` rotates halves like Hugging Face (rope type NEOX): no q/k permutation, biases as they are.
"""

from __future__ import annotations

from typing import Any

from edgekit.architectures.base import Architecture
from edgekit.architectures.spec import DecoderSpec


class Qwen2(Architecture):
    name = "qwen2"
    hf_model_types = ("qwen2",)
    hf_class = "Qwen2ForCausalLM"
    hf_config_class = "Qwen2Config"
    gguf_arch = "qwen2"
    gguf_full_width_heads = True
    hf_refused = {"use_sliding_window": "sliding-window attention"}
    description = "Qwen2 / Qwen2.5 (q/k/v biases)"

    def hf_switches(self, cfg: dict[str, Any]) -> dict[str, Any]:
        return {"attn_bias": True}

    def hf_config_extra(self, spec: DecoderSpec) -> dict[str, Any]:
        return {"use_sliding_window": False}

    def gguf_switches(self, meta, base: dict[str, Any]) -> dict[str, Any]:
        return super().gguf_switches(meta, base) | {"attn_bias": True}


ARCHITECTURE = Qwen2()
