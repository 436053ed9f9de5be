"""Qwen3: per-head RMSNorm on q and k before rotary (qk-norm), an explicit head_dim, no biases by default."""

from __future__ import annotations

from typing import Any

from edgekit.architectures.base import Architecture
from edgekit.architectures.spec import DecoderSpec


class Qwen3(Architecture):
    name = "qwen3"
    hf_model_types = ("qwen3",)
    hf_class = "Qwen3ForCausalLM"
    hf_config_class = "Qwen3Config"
    gguf_arch = "qwen3"
    gguf_always_key_length = True
    # attention_bias in transformers also biases o_proj, which llama.cpp's qwen3 cannot hold
    hf_refused = {"use_sliding_window": "sliding-window attention", "attention_bias": "attention biases"}
    description = "Qwen3 (qk-norm, explicit head_dim)"

    def hf_switches(self, cfg: dict[str, Any]) -> dict[str, Any]:
        return {"qk_norm": True}

    def hf_config_extra(self, spec: DecoderSpec) -> dict[str, Any]:
        return {"attention_bias": False, "use_sliding_window": False}

    def gguf_switches(self, meta, base: dict[str, Any]) -> dict[str, Any]:
        return super().gguf_switches(meta, base) | {"qk_norm": True}


ARCHITECTURE = Qwen3()
