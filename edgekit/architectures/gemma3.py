"""Gemma 3 (text): four norms per layer computing x * (1 + w), GeGLU with tanh GELU, qk-norm, the input
embedding scaled by sqrt(hidden) (the tied head is not), and interleaved sliding / global layers with
two rope bases and a softmax scale of ``query_pre_attn_scalar ** -0.5``.

edgekit keeps every norm's multiplier ``1 + w`` (folded when reading, unfolded for transformers), which
is also what a Gemma GGUF stores. GGUF names: Hugging Face ``post_attention_layernorm`` is
``post_attention_norm``, ``pre_feedforward_layernorm`` is ``ffn_norm``, ``post_feedforward_layernorm`` is
``post_ffw_norm``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgekit.architectures import layout as L
from edgekit.architectures.base import HF_LAYER_NAMES, Architecture, GGUFMeta
from edgekit.architectures.spec import FULL, SLIDING, DecoderSpec
from edgekit.errors import UnsupportedArchitectureError


class Gemma3(Architecture):
    name = "gemma3"
    hf_model_types = ("gemma3_text",)
    hf_class = "Gemma3ForCausalLM"
    hf_config_class = "Gemma3TextConfig"
    gguf_arch = "gemma3"
    gguf_always_key_length = True
    hf_refused = {"attention_bias": "attention biases", "use_bidirectional_attention": "bidirectional attention"}
    gguf_norm_names = {L.ATTN_NORM: "ATTN_NORM", L.POST_ATTN_NORM: "ATTN_POST_NORM", L.MLP_NORM: "FFN_PRE_NORM",
                       L.POST_MLP_NORM: "FFN_POST_NORM"}
    description = "Gemma 3 text (270M, 1B, ...): (1+w) sandwich norms, GeGLU, sliding/global layers"

    def rope_scalings(self) -> tuple[str, ...]:
        return ("linear",)

    def check_hf_config(self, cfg: dict[str, Any]) -> None:
        self.refuse_switches(cfg)
        act = cfg.get("hidden_activation") or cfg.get("hidden_act")
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise UnsupportedArchitectureError(f"{self.name}: activation {act!r} is not supported", "gelu_pytorch_tanh is")
        if cfg.get("final_logit_softcapping"):
            raise UnsupportedArchitectureError(f"{self.name}: final_logit_softcapping is not supported",
                                               "released Gemma 3 models have it unset")
        rs = cfg.get("rope_scaling")
        if rs and (rs.get("rope_type") or rs.get("type")) != "linear":
            raise UnsupportedArchitectureError(f"{self.name}: rope scaling {rs!r} is not supported", "linear is")
        if not cfg.get("sliding_window"):
            raise UnsupportedArchitectureError(f"{self.name}: sliding_window is unset",
                                               "Gemma 3's local layers need their window (512 on 270m / 1b)")

    def hf_switches(self, cfg: dict[str, Any]) -> dict[str, Any]:
        n = int(cfg["num_hidden_layers"])
        types = cfg.get("layer_types")
        if not types:
            pattern = int(cfg.get("sliding_window_pattern", 6))
            types = [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n)]
        rs = cfg.get("rope_scaling")
        return {
            "qk_norm": True, "sandwich_norms": True, "activation": "gelu_tanh",
            "embed_scale": float(np.float32(int(cfg["hidden_size"]) ** 0.5)),
            "attn_scale": float(cfg.get("query_pre_attn_scalar", cfg.get("head_dim", 256))) ** -0.5,
            "sliding_window": int(cfg["sliding_window"]),
            "layer_types": tuple(types), "rope_local_theta": float(cfg.get("rope_local_base_freq", 10000.0)),
            "rope_scaling": {"rope_type": "linear", "factor": float(rs["factor"])} if rs else None,
        }

    def to_hf_config(self, spec: DecoderSpec) -> dict[str, Any] | None:
        cfg = super().to_hf_config(spec)
        if cfg is None:
            return None
        cfg.pop("hidden_act")
        return cfg | {
            "hidden_activation": "gelu_pytorch_tanh", "sliding_window": spec.sliding_window or spec.max_position,
            "layer_types": list(spec.layer_types or [FULL] * spec.num_layers),
            "rope_local_base_freq": spec.rope_local_theta or spec.rope_theta,
            "query_pre_attn_scalar": spec.softmax_scale ** -2,
            "final_logit_softcapping": None, "attn_logit_softcapping": None, "attention_bias": False,
        }

    def hf_layer_names(self) -> dict[str, str]:
        return HF_LAYER_NAMES | {
            L.POST_ATTN_NORM: "post_attention_layernorm.weight", L.MLP_NORM: "pre_feedforward_layernorm.weight",
            L.POST_MLP_NORM: "post_feedforward_layernorm.weight",
        }

    def fold_norms(self, t: dict[str, np.ndarray], spec: DecoderSpec, sign: int) -> dict[str, np.ndarray]:
        norms = {L.FINAL_NORM} | {L.prefix(i) + n for i in range(spec.num_layers) for n in L.layer_norms(spec)}
        return {n: (a + np.float32(sign)).astype(np.float32) if n in norms else a for n, a in t.items()}

    def write_gguf_metadata(self, writer, spec: DecoderSpec) -> None:
        import gguf

        super().write_gguf_metadata(writer, spec)
        writer.add_sliding_window(int(spec.sliding_window or spec.max_position))
        writer.add_rope_freq_base_swa(float(spec.rope_local_theta or spec.rope_theta))
        writer.add_sliding_window_pattern([spec.is_sliding(i) for i in range(spec.num_layers)])
        rs = spec.rope_scaling or {}
        if rs.get("rope_type") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rs["factor"]))

    def gguf_switches(self, meta: GGUFMeta, base: dict[str, Any]) -> dict[str, Any]:
        n = base["num_layers"]
        window = meta.get("attention.sliding_window")
        pattern = meta.get("attention.sliding_window_pattern")
        if isinstance(pattern, list):
            sliding = [bool(x) for x in pattern]
        else:  # llama.cpp's default: every sixth layer is global
            period = int(pattern or 6)
            sliding = [i % period < period - 1 for i in range(n)]
        return super().gguf_switches(meta, base) | {
            "qk_norm": True, "sandwich_norms": True, "activation": "gelu_tanh",
            "embed_scale": float(np.float32(base["hidden_size"] ** 0.5)),
            "attn_scale": float(base["head_dim"]) ** -0.5,  # what llama.cpp's gemma3 computes with
            # llama.cpp runs every layer as global when the window is absent or 0
            "sliding_window": int(window) if window else None,
            "layer_types": tuple(SLIDING if s else FULL for s in sliding) if window else None,
            "rope_local_theta": float(meta.get("rope.freq_base_swa") or 10000.0),
        }


ARCHITECTURE = Gemma3()
