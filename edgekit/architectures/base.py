"""What an architecture says once: its spec from a Hugging Face config and from GGUF metadata, its
checkpoint names, its GGUF layout, and what a format cannot hold.

The base class is Llama's layout; an architecture module overrides only what differs (see
``llama.py`` ... ``phi3.py``). Tensors inside edgekit use the neutral roles of
:mod:`edgekit.architectures.layout`; this class maps them to and from Hugging Face names
(``sanitize`` / ``to_hf_state``) and GGUF names (``gguf_tensors``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from edgekit.architectures import layout as L
from edgekit.architectures.spec import DecoderSpec
from edgekit.errors import UnsupportedArchitectureError

# neutral role -> Hugging Face suffix inside ``model.layers.{i}.`` (Llama's names; Gemma overrides)
HF_LAYER_NAMES = {
    L.ATTN_NORM: "input_layernorm.weight",
    L.MLP_NORM: "post_attention_layernorm.weight",
    L.Q_NORM: "self_attn.q_norm.weight",
    L.K_NORM: "self_attn.k_norm.weight",
    **{f"{r}.{kind}": f"self_attn.{r[-1]}_proj.{kind}" for r in (L.Q, L.K, L.V, L.O) for kind in ("weight", "bias")},
    **{f"{r}.weight": f"mlp.{r.split('.')[1]}_proj.weight" for r in (L.GATE, L.UP, L.DOWN)},
}
HF_GLOBAL_NAMES = {L.EMBED: "model.embed_tokens.weight", L.FINAL_NORM: "model.norm.weight", L.HEAD: "lm_head.weight"}


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: its name, the neutral tensors it holds (rows concatenated, in order),
    and the head count llama.cpp's q/k row permutation uses (None: rows as they are)."""

    name: str
    parts: tuple[str, ...]
    permute_heads: int | None = None


class GGUFMeta:
    """Typed access to a GGUF's ``{arch}.*`` metadata through gguf's reader."""

    def __init__(self, reader, arch: str, file_name: str = "model.gguf"):
        self.reader, self.arch, self.file_name = reader, arch, file_name
        self.tensor_names = {t.name for t in reader.tensors}

    def get(self, key: str, default: Any = None) -> Any:
        f = self.reader.get_field(key.format(arch=self.arch) if "{arch}" in key else f"{self.arch}.{key}")
        if f is None:
            return default
        v = f.contents()
        return v.item() if isinstance(v, np.generic) else v

    def require(self, key: str) -> Any:
        v = self.get(key)
        if v is None:
            from edgekit.errors import InputError

            raise InputError(f"{self.file_name}: GGUF metadata {self.arch}.{key} is missing", "the file is incomplete")
        return v

    def tensor(self, name: str) -> np.ndarray | None:
        from gguf.quants import dequantize

        for t in self.reader.tensors:
            if t.name == name:
                return dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
        return None


def gguf_name(kind: str, i: int | None = None, suffix: str = "weight") -> str:
    """The GGUF name of a tensor kind (``ATTN_Q``...), from gguf's own table."""
    import gguf

    base = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[kind]]
    return (base.format(bid=i) if i is not None else base) + (f".{suffix}" if suffix else "")


class Architecture:
    """A decoder architecture (Llama's layout by default). Subclasses set the class attributes and
    override the hooks that differ."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "decoder"
    hf_model_types: ClassVar[tuple[str, ...]] = ()
    hf_class: ClassVar[str] = ""  # transformers class of the float reference
    hf_config_class: ClassVar[str] = ""
    gguf_arch: ClassVar[str] = ""  # general.architecture this architecture is written as
    gguf_permute_qk: ClassVar[bool] = False  # llama.cpp's "llama" rotates adjacent pairs: permute q/k rows
    gguf_norm_names: ClassVar[dict[str, str]] = {L.ATTN_NORM: "ATTN_NORM", L.MLP_NORM: "FFN_NORM"}
    gguf_full_width_heads: ClassVar[bool] = False  # llama.cpp derives head_dim from hidden / heads
    gguf_always_key_length: ClassVar[bool] = False  # write attention.key_length even when it is hidden / heads
    gguf_ignores_window: ClassVar[bool] = False  # llama.cpp runs this architecture without its sliding window
    description: ClassVar[str] = ""
    # config switches edgekit does not model: refused in one line when true (key -> what it would mean)
    hf_refused: ClassVar[dict[str, str]] = {}

    # ------------------------------------------------------------------ Hugging Face side

    def spec_from_hf(self, cfg: dict[str, Any]) -> DecoderSpec:
        self.check_hf_config(cfg)
        heads = int(cfg["num_attention_heads"])
        base = dict(
            vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]), num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            rope_theta=float(cfg.get("rope_theta", 10000.0)), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            max_position=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), arch=self.name,
        )
        base.update(self.hf_switches(cfg))
        return DecoderSpec(**base)

    def refuse_switches(self, cfg: dict[str, Any]) -> None:
        for key, what in self.hf_refused.items():
            if cfg.get(key):
                raise UnsupportedArchitectureError(f"{self.name}: {what} ({key}=true) is not supported",
                                                   f"released {self.name} models have it off")

    def check_hf_config(self, cfg: dict[str, Any]) -> None:
        """Refuse, in one line, what edgekit does not build for this architecture."""
        self.refuse_switches(cfg)
        act = cfg.get("hidden_act") or cfg.get("hidden_activation")
        if act not in (None, "silu"):
            raise UnsupportedArchitectureError(f"{self.name}: activation {act!r} is not supported", "SiLU-gated MLPs are")
        if cfg.get("mlp_bias"):
            raise UnsupportedArchitectureError(f"{self.name}: MLP biases are not supported")
        rs = cfg.get("rope_scaling")
        if rs and (rs.get("rope_type") or rs.get("type")) not in self.rope_scalings():
            kind = rs.get("rope_type") or rs.get("type")
            raise UnsupportedArchitectureError(
                f"{self.name}: rope scaling {kind!r} is not supported", f"supported: {', '.join(self.rope_scalings()) or 'none'}")

    def rope_scalings(self) -> tuple[str, ...]:
        return ()

    def hf_switches(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """Spec fields beyond Llama's, read from the config."""
        return {}

    def to_hf_config(self, spec: DecoderSpec) -> dict[str, Any] | None:
        """A config transformers reads back into the same model (None when it cannot express the spec)."""
        cfg = {
            "architectures": [self.hf_class], "model_type": self.hf_model_types[0], "vocab_size": spec.vocab_size,
            "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
            "num_hidden_layers": spec.num_layers, "num_attention_heads": spec.num_heads,
            "num_key_value_heads": spec.num_kv_heads, "head_dim": spec.head_dim, "rope_theta": spec.rope_theta,
            "rms_norm_eps": spec.rms_norm_eps, "max_position_embeddings": spec.max_position,
            "tie_word_embeddings": spec.tie_word_embeddings, "hidden_act": "silu", "torch_dtype": "float32",
        }
        if spec.rope_scaling and spec.rope_scaling.get("rope_type") == "freq_factors":
            return None  # factors read from a GGUF: no transformers config says that
        cfg["rope_scaling"] = spec.rope_scaling
        return cfg | self.hf_config_extra(spec)

    def hf_config_extra(self, spec: DecoderSpec) -> dict[str, Any]:
        return {}

    def hf_layer_names(self) -> dict[str, str]:
        return HF_LAYER_NAMES

    def hf_name(self, name: str) -> str:
        """The Hugging Face name of a neutral tensor name."""
        if name in HF_GLOBAL_NAMES:
            return HF_GLOBAL_NAMES[name]
        i, rest = name.split(".", 2)[1], name.split(".", 2)[2]
        return f"model.layers.{i}.{self.hf_layer_names()[rest]}"

    def sanitize(self, hf: dict[str, np.ndarray], spec: DecoderSpec) -> dict[str, np.ndarray]:
        """Hugging Face checkpoint tensors -> neutral names (missing tensors raise KeyError with the HF name)."""
        out, used = {}, set()
        for name in L.tensor_names(spec):
            key = self.hf_name(name)
            if key not in hf and name == L.HEAD:
                key = self.hf_name(L.EMBED)
            out[name] = hf[key]
            used.add(key)
        # a tensor the spec has no place for means a switch edgekit does not model: refuse, never drop it
        tied_head = {HF_GLOBAL_NAMES[L.HEAD]} if spec.tie_word_embeddings else set()
        unused = sorted(k for k in set(hf) - used - tied_head if not k.endswith("rotary_emb.inv_freq"))
        if unused:
            from edgekit.errors import InputError

            raise InputError(f"the checkpoint has tensors edgekit's {self.name} does not use ({', '.join(unused[:3])}"
                             f"{'...' if len(unused) > 3 else ''})", "this variant of the architecture is not supported")
        return self.fold_norms(out, spec, +1)

    def to_hf_state(self, tensors: dict[str, np.ndarray], spec: DecoderSpec) -> dict[str, np.ndarray]:
        """Neutral tensors -> a state dict the transformers class loads (inverse of :meth:`sanitize`)."""
        t = self.fold_norms(dict(tensors), spec, -1)
        return {self.hf_name(n): a for n, a in t.items()}

    def fold_norms(self, t: dict[str, np.ndarray], spec: DecoderSpec, sign: int) -> dict[str, np.ndarray]:
        """Architectures whose norms compute x * (1 + w) store w; edgekit keeps the multiplier."""
        return t

    # ------------------------------------------------------------------ GGUF side

    def gguf_tensors(self, spec: DecoderSpec, rows: dict[str, int] | None = None) -> list[GGUFTensor]:
        """The GGUF tensors of a model of ``spec``. ``rows`` (tensor -> rows) gives real head counts
        after pruning for the q/k permutation."""
        rows = rows or {}
        out = [GGUFTensor(gguf_name("TOKEN_EMBD"), (L.EMBED,))]
        for i in range(spec.num_layers):
            out += self.gguf_layer(spec, i, rows)
        out.append(GGUFTensor(gguf_name("OUTPUT_NORM"), (L.FINAL_NORM,)))
        if not spec.tie_word_embeddings:
            out.append(GGUFTensor(gguf_name("OUTPUT"), (L.HEAD,)))
        return out

    def gguf_layer(self, spec: DecoderSpec, i: int, rows: dict[str, int]) -> list[GGUFTensor]:
        p = L.prefix(i)

        def heads(role: str, default: int) -> int | None:
            if not self.gguf_permute_qk:
                return None
            n = rows.get(p + role + ".weight")
            return n // spec.head_dim if n else default

        out = [GGUFTensor(gguf_name(self.gguf_norm_names[L.ATTN_NORM], i), (p + L.ATTN_NORM,))]
        for role, kind, h in ((L.Q, "ATTN_Q", spec.num_heads), (L.K, "ATTN_K", spec.num_kv_heads), (L.V, "ATTN_V", None)):
            out.append(GGUFTensor(gguf_name(kind, i), (p + role + ".weight",), heads(role, h) if h else None))
            if spec.attn_bias:
                out.append(GGUFTensor(gguf_name(kind, i, "bias"), (p + role + ".bias",), heads(role, h) if h else None))
        if spec.qk_norm:
            out += [GGUFTensor(gguf_name("ATTN_Q_NORM", i), (p + L.Q_NORM,)),
                    GGUFTensor(gguf_name("ATTN_K_NORM", i), (p + L.K_NORM,))]
        out.append(GGUFTensor(gguf_name("ATTN_OUT", i), (p + L.O + ".weight",)))
        for norm in (L.POST_ATTN_NORM, L.MLP_NORM, L.POST_MLP_NORM):
            if norm in L.layer_norms(spec):
                out.append(GGUFTensor(gguf_name(self.gguf_norm_names[norm], i), (p + norm,)))
        out += [GGUFTensor(gguf_name(k, i), (p + r + ".weight",)) for r, k in ((L.GATE, "FFN_GATE"), (L.UP, "FFN_UP"), (L.DOWN, "FFN_DOWN"))]
        return out

    def gguf_extra_tensors(self, spec: DecoderSpec) -> dict[str, np.ndarray]:
        """Tensors a GGUF of this architecture needs besides the weights (e.g. rope frequency factors)."""
        return {}

    def gguf_refusal(self, spec: DecoderSpec) -> str | None:
        """Why llama.cpp's runtime cannot compute this spec as transformers does (None: it can)."""
        if self.gguf_full_width_heads and spec.num_heads * spec.head_dim != spec.hidden_size:
            return f"llama.cpp's {self.gguf_arch} assumes heads x head_dim == hidden size"
        if abs(spec.softmax_scale - spec.head_dim ** -0.5) > 1e-9:
            return f"llama.cpp's {self.gguf_arch} scales attention by 1/sqrt(head_dim), this model does not"
        return None

    def gguf_caveat(self, spec: DecoderSpec) -> str | None:
        """Where llama.cpp computes this spec as transformers does only in part (kept in the manifest)."""
        if self.gguf_ignores_window and spec.sliding_window and spec.sliding_window < spec.max_position:
            return (f"llama.cpp's {self.gguf_arch} ignores the {spec.sliding_window}-token sliding window: "
                    f"outputs equal transformers' up to {spec.sliding_window} tokens of context")
        return None

    def write_gguf_metadata(self, writer, spec: DecoderSpec) -> None:
        writer.add_context_length(spec.max_position)
        writer.add_embedding_length(spec.hidden_size)
        writer.add_block_count(spec.num_layers)
        writer.add_feed_forward_length(spec.intermediate_size)
        writer.add_head_count(spec.num_heads)
        writer.add_head_count_kv(spec.num_kv_heads)
        writer.add_rope_freq_base(spec.rope_theta)
        writer.add_layer_norm_rms_eps(spec.rms_norm_eps)
        writer.add_rope_dimension_count(spec.rotary_dim)
        writer.add_vocab_size(spec.vocab_size)
        if self.gguf_always_key_length or spec.head_dim * spec.num_heads != spec.hidden_size:
            writer.add_key_length(spec.head_dim)
            writer.add_value_length(spec.head_dim)

    def spec_from_gguf(self, meta: GGUFMeta) -> DecoderSpec:
        heads = int(meta.require("attention.head_count"))
        hidden = int(meta.require("embedding_length"))
        tokens = meta.reader.get_field("tokenizer.ggml.tokens")
        vocab = meta.get("vocab_size") or (len(tokens.data) if tokens else None)
        head_dim = int(meta.get("attention.key_length") or hidden // heads)
        base = dict(
            vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(meta.require("feed_forward_length")),
            num_layers=int(meta.require("block_count")), num_heads=heads,
            num_kv_heads=int(meta.get("attention.head_count_kv") or heads), head_dim=head_dim,
            rope_theta=float(meta.get("rope.freq_base", 10000.0)),
            rms_norm_eps=float(meta.get("attention.layer_norm_rms_epsilon", 1e-5)),
            max_position=int(meta.get("context_length", 2048)),
            tie_word_embeddings=gguf_name("OUTPUT") not in meta.tensor_names, arch=self.name,
        )
        base.update(self.gguf_switches(meta, base))
        return DecoderSpec(**base)

    def gguf_switches(self, meta: GGUFMeta, base: dict[str, Any]) -> dict[str, Any]:
        scaling = meta.get("rope.scaling.type")
        if scaling not in (None, "none"):
            if scaling == "linear":
                return {"rope_scaling": {"rope_type": "linear", "factor": float(meta.require("rope.scaling.factor"))}}
            raise UnsupportedArchitectureError(f"{meta.file_name}: rope scaling {scaling!r} is not supported")
        return {}

    # ------------------------------------------------------------------ what formats cannot hold

    def format_refusal(self, fmt: str, spec: DecoderSpec) -> str | None:
        if fmt == "gguf":
            return self.gguf_refusal(spec)
        return None

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "hf_model_types": list(self.hf_model_types),
                "gguf_arch": self.gguf_arch, "description": self.description}
