"""Llama (Llama 2 / 3.x, TinyLlama, SmolLM): the base layout, plus Llama 3's rope scaling.

In GGUF the ``llama`` architecture rotates adjacent pairs (rope type NORM), so q/k rows are permuted
from Hugging Face's rotate-half order, as llama.cpp's converter does. Llama 3.x scaling is written as
the ``rope_freqs`` tensor of per-frequency divisors llama.cpp reads.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgekit.architectures.base import Architecture, GGUFMeta, gguf_name
from edgekit.architectures.spec import DecoderSpec


class Llama(Architecture):
    name = "llama"
    hf_model_types = ("llama",)
    hf_class = "LlamaForCausalLM"
    hf_config_class = "LlamaConfig"
    gguf_arch = "llama"
    gguf_permute_qk = True
    hf_refused = {"attention_bias": "attention biases (Qwen2's are supported)"}
    description = "Llama 2 / 3.x, TinyLlama, SmolLM (rope scaling llama3 and linear)"

    def rope_scalings(self) -> tuple[str, ...]:
        return ("llama3", "linear")

    def hf_switches(self, cfg: dict[str, Any]) -> dict[str, Any]:
        rs = cfg.get("rope_scaling")
        if not rs:
            return {}
        kind = rs.get("rope_type") or rs.get("type")
        keep = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return {"rope_scaling": {"rope_type": kind, **{k: rs[k] for k in keep if k in rs}}}

    def gguf_extra_tensors(self, spec: DecoderSpec) -> dict[str, np.ndarray]:
        rs = spec.rope_scaling or {}
        if rs.get("rope_type") in ("llama3", "freq_factors"):
            plain = DecoderSpec(**{**spec.to_dict(), "rope_scaling": None})
            return {gguf_name("ROPE_FREQS"): (plain.inv_freq() / spec.inv_freq()).astype(np.float32)}
        return {}

    def write_gguf_metadata(self, writer, spec: DecoderSpec) -> None:
        import gguf

        super().write_gguf_metadata(writer, spec)
        rs = spec.rope_scaling or {}
        if rs.get("rope_type") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rs["factor"]))

    def gguf_switches(self, meta: GGUFMeta, base: dict[str, Any]) -> dict[str, Any]:
        out = super().gguf_switches(meta, base)
        factors = meta.tensor(gguf_name("ROPE_FREQS"))
        if factors is not None:
            out["rope_scaling"] = {"rope_type": "freq_factors", "factors": [float(f) for f in factors]}
        return out


ARCHITECTURE = Llama()
