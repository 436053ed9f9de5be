"""Mistral: Llama's layout with sliding-window attention on every layer.

GGUF writes it as ``llama``; llama.cpp's llama architecture attends to the whole context, so a GGUF
of a windowed Mistral equals transformers only while the context fits the window (the manifest says so).
"""

from __future__ import annotations

from typing import Any

from edgekit.architectures.llama import Llama
from edgekit.architectures.spec import DecoderSpec


class Mistral(Llama):
    name = "mistral"
    hf_model_types = ("mistral",)
    hf_class = "MistralForCausalLM"
    hf_config_class = "MistralConfig"
    description = "Mistral (sliding-window attention on every layer)"
    gguf_ignores_window = True

    def rope_scalings(self) -> tuple[str, ...]:
        return ()

    def hf_switches(self, cfg: dict[str, Any]) -> dict[str, Any]:
        w = cfg.get("sliding_window")
        return {"sliding_window": int(w)} if w else {}

    def hf_config_extra(self, spec: DecoderSpec) -> dict[str, Any]:
        return {"sliding_window": spec.sliding_window}


ARCHITECTURE = Mistral()
