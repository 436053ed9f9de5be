"""Qwen3: per-head RMSNorm on q and k before rotary (qk-norm), an explicit head_dim, no biases by default."""

from __future__ import annotations

from typing import Any

from edgekit.architectures.base import Architecture
from edgekit.architectures.spec import DecoderSpec
from edgekit.errors import UnsupportedArchitectureError


class Qwen3(Architecture):
    name = "qwen3"
    hf_model_types = ("qwen3",)
    hf_class = "Qwen3ForCausalLM"
    hf_config_class = "Qwen3Config"
    gguf_arch = "qwen3"
    gguf_always_key_length = True
    description = "Qwen3 (qk-norm, explicit head_dim)"

    def check_hf_config(self, cfg: dict[str, Any]) -> None:
        super().check_hf_config(cfg)
        if cfg.get("use_sliding_window"):
            raise UnsupportedArchitectureError(f"{self.name}: use_sliding_window=true is not supported")
        if cfg.get("attention_bias"):  # transformers then biases o_proj too, which llama.cpp's qwen3 cannot hold
            raise UnsupportedArchitectureError(f"{self.name}: attention_bias=true is not supported",
                                               "released Qwen3 models have no attention biases")

    def hf_switches(self, cfg: dict[str, Any]) -> dict[str, Any]:
        return {"qk_norm": True}

    def hf_config_extra(self, spec: DecoderSpec) -> dict[str, Any]:
        return {"attention_bias": False, "use_sliding_window": False}

    def gguf_switches(self, meta, base: dict[str, Any]) -> dict[str, Any]:
        return super().gguf_switches(meta, base) | {"qk_norm": True}


ARCHITECTURE = Qwen3()
