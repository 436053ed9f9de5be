"""edgekit's own tensor names: one neutral layout every decoder architecture is read into.

Architectures differ in how their checkpoints name tensors (Gemma's ``post_attention_layernorm`` is a
different norm from Llama's; Phi-3 fuses q|k|v), so each architecture module maps its Hugging Face and
GGUF names to and from these roles once, and everything else (passes, exporters, the torch module)
works on roles. Weights are ``[out_features, in_features]``; q/k rows are in rotate-half order.

Per layer ``i`` (prefix ``layers.{i}.``)::

    attn_norm.weight                      before attention
    attn.{q,k,v}.weight (+ .bias)         projections; attn.o.weight the output projection
    attn.{q,k}_norm.weight                per-head RMSNorm over head_dim (qk-norm)
    post_attn_norm.weight                 after attention, before the residual add (sandwich norms)
    mlp_norm.weight                       before the MLP
    mlp.{gate,up,down}.weight             gated MLP: down(act(gate(x)) * up(x))
    post_mlp_norm.weight                  after the MLP (sandwich norms)

plus ``embed.weight``, ``final_norm.weight`` and, when untied, ``head.weight``. A low-rank pass
replaces ``<linear>.weight`` by ``<linear>.lowrank_a.weight`` / ``<linear>.lowrank_b.weight``.
"""

from __future__ import annotations

from edgekit.architectures.spec import DecoderSpec

EMBED = "embed.weight"
HEAD = "head.weight"
FINAL_NORM = "final_norm.weight"
LOWRANK_A, LOWRANK_B = ".lowrank_a.weight", ".lowrank_b.weight"

Q, K, V, O = "attn.q", "attn.k", "attn.v", "attn.o"  # noqa: E741 (the attention output projection)
GATE, UP, DOWN = "mlp.gate", "mlp.up", "mlp.down"
ATTN_NORM, MLP_NORM = "attn_norm.weight", "mlp_norm.weight"
Q_NORM, K_NORM = "attn.q_norm.weight", "attn.k_norm.weight"
POST_ATTN_NORM, POST_MLP_NORM = "post_attn_norm.weight", "post_mlp_norm.weight"

LINEARS = (Q, K, V, O, GATE, UP, DOWN)
# linears that read the same input (one calibration statistic, one fused product in ONNX)
INPUT_GROUPS = {"attn_in": (Q, K, V), "attn_out": (O,), "mlp_in": (GATE, UP), "mlp_down": (DOWN,)}
_GROUP_OF = {lin: g for g, lins in INPUT_GROUPS.items() for lin in lins}


def prefix(i: int) -> str:
    return f"layers.{i}."


def linear(i: int, role: str) -> str:
    """The base name of layer ``i``'s linear ``role`` (``Q``, ``GATE``...), without ``.weight``."""
    return prefix(i) + role


def layer_norms(spec: DecoderSpec) -> tuple[str, ...]:
    norms = [ATTN_NORM]
    if spec.sandwich_norms:
        norms.append(POST_ATTN_NORM)
    norms.append(MLP_NORM)
    if spec.sandwich_norms:
        norms.append(POST_MLP_NORM)
    if spec.qk_norm:
        norms += [Q_NORM, K_NORM]
    return tuple(norms)


def layer_tensor_names(spec: DecoderSpec, i: int) -> list[str]:
    p = prefix(i)
    names = [p + ATTN_NORM]
    for role in (Q, K, V):
        names.append(p + role + ".weight")
        if spec.attn_bias:
            names.append(p + role + ".bias")
    if spec.qk_norm:
        names += [p + Q_NORM, p + K_NORM]
    names.append(p + O + ".weight")
    if spec.sandwich_norms:
        names.append(p + POST_ATTN_NORM)
    names.append(p + MLP_NORM)
    names += [p + r + ".weight" for r in (GATE, UP, DOWN)]
    if spec.sandwich_norms:
        names.append(p + POST_MLP_NORM)
    return names


def tensor_names(spec: DecoderSpec) -> list[str]:
    """Every tensor of a model of ``spec``, in a fixed order."""
    names = [EMBED]
    for i in range(spec.num_layers):
        names += layer_tensor_names(spec, i)
    names.append(FINAL_NORM)
    if not spec.tie_word_embeddings:
        names.append(HEAD)
    return names


def output_head(spec: DecoderSpec) -> str:
    """The tensor that projects to the vocabulary (the embedding when tied)."""
    return EMBED if spec.tie_word_embeddings else HEAD


def base_of(name: str) -> str:
    """``layers.0.attn.q`` for ``layers.0.attn.q.weight`` / ``.bias`` / a low-rank factor."""
    for suffix in (LOWRANK_A, LOWRANK_B, ".weight", ".bias"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def split(name: str) -> tuple[int | None, str]:
    """(layer index, role) of a linear's tensor name; (None, name) outside the layers."""
    base = base_of(name)
    if not base.startswith("layers."):
        return None, base
    _, i, role = base.split(".", 2)
    return int(i), role


def input_key(name: str) -> str:
    """Linears that read the same input share one input statistic: q/k/v (and A factors), gate/up."""
    if name.endswith(LOWRANK_B):
        return name  # its input is the factor A's output: its own statistic
    i, role = split(name)
    return f"{prefix(i)}{_GROUP_OF[role]}"


def is_linear_weight(name: str) -> bool:
    i, role = split(name)
    return i is not None and role in _GROUP_OF and not name.endswith(".bias")


def tensor_shape(spec: DecoderSpec, name: str) -> tuple[int, ...]:
    """The shape a tensor of ``spec`` has before any structural pass."""
    d, hd, v, ff = spec.hidden_size, spec.head_dim, spec.vocab_size, spec.intermediate_size
    q, kv = spec.num_heads * hd, spec.num_kv_heads * hd
    if name in (EMBED, HEAD):
        return (v, d)
    if name == FINAL_NORM:
        return (d,)
    i, role = split(name)
    if role in (Q_NORM.removesuffix(".weight"), K_NORM.removesuffix(".weight")):
        return (hd,)
    if name.endswith("norm.weight"):
        return (d,)
    rows_cols = {Q: (q, d), K: (kv, d), V: (kv, d), O: (d, q), GATE: (ff, d), UP: (ff, d), DOWN: (d, ff)}[role]
    return rows_cols[:1] if name.endswith(".bias") else rows_cols
