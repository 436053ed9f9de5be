"""Phi-3 / Phi-4-mini: fused ``qkv_proj`` and ``gate_up_proj`` (gate half first) split on read, partial
rotary (Phi-4-mini rotates 0.75 of head_dim), sliding window in transformers. LongRoPE is refused.

GGUF ``phi3`` keeps the fusions: ``attn_qkv`` holds q|k|v rows and ``ffn_up`` holds gate|up rows;
llama.cpp attends to the whole context (no window), so a windowed Phi-3 GGUF equals transformers only
while the context fits the window.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgekit.architectures import layout as L
from edgekit.architectures.base import Architecture, GGUFTensor, gguf_name
from edgekit.architectures.spec import DecoderSpec
from edgekit.errors import UnsupportedArchitectureError

QKV, GATE_UP = "self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight"


class Phi3(Architecture):
    name = "phi3"
    hf_model_types = ("phi3",)
    hf_class = "Phi3ForCausalLM"
    hf_config_class = "Phi3Config"
    gguf_arch = "phi3"
    gguf_full_width_heads = True
    gguf_ignores_window = True
    description = "Phi-3 / Phi-4-mini (fused qkv and gate|up, partial rotary; no LongRoPE)"

    def check_hf_config(self, cfg: dict[str, Any]) -> None:
        rs = cfg.get("rope_scaling")
        if rs:
            raise UnsupportedArchitectureError(
                f"{self.name}: rope scaling {rs.get('rope_type') or rs.get('type')!r} (LongRoPE) is not supported",
                "use a variant without rope_scaling (e.g. a 4k-context Phi-3)")
        super().check_hf_config(cfg)

    def hf_switches(self, cfg: dict[str, Any]) -> dict[str, Any]:
        w = cfg.get("sliding_window")
        return {"partial_rotary": float(cfg.get("partial_rotary_factor", 1.0)),
                "sliding_window": int(w) if w else None,
                "extra": {"original_max_position_embeddings": cfg.get("original_max_position_embeddings")}}

    def hf_config_extra(self, spec: DecoderSpec) -> dict[str, Any]:
        return {"partial_rotary_factor": spec.partial_rotary, "sliding_window": spec.sliding_window,
                "original_max_position_embeddings": spec.extra.get("original_max_position_embeddings") or spec.max_position,
                "pad_token_id": None}

    def sanitize(self, hf: dict[str, np.ndarray], spec: DecoderSpec) -> dict[str, np.ndarray]:
        hf = dict(hf)
        q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        for i in range(spec.num_layers):
            p = f"model.layers.{i}."
            if p + QKV in hf:
                qkv = hf.pop(p + QKV)
                hf[p + "self_attn.q_proj.weight"], hf[p + "self_attn.k_proj.weight"], hf[p + "self_attn.v_proj.weight"] = \
                    qkv[:q], qkv[q:q + kv], qkv[q + kv:]
            if p + GATE_UP in hf:
                gu = hf.pop(p + GATE_UP)
                half = gu.shape[0] // 2
                hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"] = gu[:half], gu[half:]
        return super().sanitize(hf, spec)

    def to_hf_state(self, tensors: dict[str, np.ndarray], spec: DecoderSpec) -> dict[str, np.ndarray]:
        state = super().to_hf_state(tensors, spec)
        for i in range(spec.num_layers):
            p = f"model.layers.{i}."
            state[p + QKV] = np.concatenate([state.pop(p + f"self_attn.{x}_proj.weight") for x in "qkv"])
            state[p + GATE_UP] = np.concatenate([state.pop(p + f"mlp.{x}_proj.weight") for x in ("gate", "up")])
        return state

    def gguf_layer(self, spec: DecoderSpec, i: int, rows: dict[str, int]) -> list[GGUFTensor]:
        p = L.prefix(i)
        return [
            GGUFTensor(gguf_name("ATTN_NORM", i), (p + L.ATTN_NORM,)),
            GGUFTensor(gguf_name("ATTN_QKV", i), tuple(p + r + ".weight" for r in (L.Q, L.K, L.V))),
            GGUFTensor(gguf_name("ATTN_OUT", i), (p + L.O + ".weight",)),
            GGUFTensor(gguf_name("FFN_NORM", i), (p + L.MLP_NORM,)),
            GGUFTensor(gguf_name("FFN_UP", i), (p + L.GATE + ".weight", p + L.UP + ".weight")),
            GGUFTensor(gguf_name("FFN_DOWN", i), (p + L.DOWN + ".weight",)),
        ]

    def write_gguf_metadata(self, writer, spec: DecoderSpec) -> None:
        super().write_gguf_metadata(writer, spec)
        writer.add_rope_scaling_orig_ctx_len(int(spec.extra.get("original_max_position_embeddings") or spec.max_position))

    def gguf_switches(self, meta, base: dict[str, Any]) -> dict[str, Any]:
        if gguf_name("ROPE_FACTORS_LONG") in meta.tensor_names:
            raise UnsupportedArchitectureError(f"{meta.file_name}: LongRoPE factors are not supported")
        rot = int(meta.get("rope.dimension_count") or base["head_dim"])
        return super().gguf_switches(meta, base) | {
            "partial_rotary": rot / base["head_dim"],
            "extra": {"original_max_position_embeddings": meta.get("rope.scaling.original_context_length")}}


ARCHITECTURE = Phi3()
