"""What the predictor needs to know about an artifact, read from the artifact itself.

Bytes read per decoded token come from the tensor table (per storage type, because each type runs a
different kernel); FLOPs per token and KV-cache bytes per token come from the architecture.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

KV_BYTES_PER_VALUE = 2  # llama.cpp keeps the KV cache in f16 by default


@dataclass
class ArtifactFacts:
    format: str
    runtime: str
    size_bytes: int
    parameters: int
    bytes_by_type: dict[str, int]  # tensor bytes read per decoded token, by storage type
    params_by_type: dict[str, int]  # matmul parameters, by storage type (2 FLOPs each per token)
    kv_bytes_per_token: int  # K and V of one token, all layers
    attn_flops_per_token_per_ctx: int  # attention FLOPs per token per token of context
    vocab_size: int
    hidden_size: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def bytes_per_token(self) -> int:
        return sum(self.bytes_by_type.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"bytes_per_token": self.bytes_per_token}


def gguf_facts(path: Path) -> ArtifactFacts:
    from edgekit.converters.gguf_layout import open_reader, spec_from_reader

    reader = open_reader(path)
    spec = spec_from_reader(reader, Path(path))
    bytes_by_type: dict[str, int] = {}
    params_by_type: dict[str, int] = {}
    for t in reader.tensors:
        typ = t.tensor_type.name
        # an untied input embedding is gathered (one row per token), not streamed
        if t.name == "token_embd.weight" and not spec.tie_word_embeddings:
            continue
        bytes_by_type[typ] = bytes_by_type.get(typ, 0) + int(t.n_bytes)
        if len(t.shape) == 2:
            params_by_type[typ] = params_by_type.get(typ, 0) + int(t.n_elements)
    kv = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * KV_BYTES_PER_VALUE
    # QK^T and attention-weighted V: 2 matmuls x 2 FLOPs x heads x head_dim per context token, per layer
    attn = 4 * spec.num_layers * spec.num_heads * spec.head_dim
    return ArtifactFacts(
        format="gguf", runtime="llamacpp", size_bytes=Path(path).stat().st_size,
        parameters=sum(int(t.n_elements) for t in reader.tensors), bytes_by_type=bytes_by_type,
        params_by_type=params_by_type, kv_bytes_per_token=kv, attn_flops_per_token_per_ctx=attn,
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
        extra={"num_layers": spec.num_layers, "tied_embeddings": spec.tie_word_embeddings},
    )


def artifact_facts(artifact: str | Path) -> ArtifactFacts:
    from edgekit.errors import InputError
    from edgekit.session import resolve_artifact

    file, _, _ = resolve_artifact(artifact)
    if file.suffix.lower() == ".gguf":
        return gguf_facts(file)
    raise InputError(f"cannot predict for {file.name} yet", "prediction supports GGUF artifacts")


# GGML block layouts: (weights per block, bytes per block)
_BLOCK_BYTES = {"F32": (1, 4), "F16": (1, 2), "Q8_0": (32, 34), "Q4_0": (32, 18)}
# What each GGUF recipe stores its matrices as: (most matrices, the output head)
RECIPE_TYPES = {"f16": ("F16", "F16"), "q8_0": ("Q8_0", "Q8_0"), "q4_0": ("Q4_0", "Q8_0"), "int4": ("Q4_0", "Q8_0")}


def estimate_gguf_facts(spec, quant: str, metadata_bytes: int = 0) -> ArtifactFacts:
    """Facts of a GGUF that ``quant`` would produce from a model of ``spec``, before converting it."""
    main, head = RECIPE_TYPES[quant]
    head_name = spec.output_head_name()
    bytes_by_type: dict[str, int] = {}
    params_by_type: dict[str, int] = {}
    shapes = _shapes(spec)
    for name in spec.tensor_names():
        n = shapes[name]
        if name.endswith("norm.weight"):
            typ = "F32"
        else:
            typ = head if name == head_name else main
            params_by_type[typ] = params_by_type.get(typ, 0) + n
        per, nb = _BLOCK_BYTES[typ]
        if name == "model.embed_tokens.weight" and not spec.tie_word_embeddings:
            continue
        bytes_by_type[typ] = bytes_by_type.get(typ, 0) + n // per * nb
    total = sum(shapes[n] // _BLOCK_BYTES[_type(n, spec, main, head)][0] * _BLOCK_BYTES[_type(n, spec, main, head)][1]
                for n in spec.tensor_names())
    return ArtifactFacts(
        format="gguf", runtime="llamacpp", size_bytes=total + metadata_bytes, parameters=sum(shapes.values()),
        bytes_by_type=bytes_by_type, params_by_type=params_by_type,
        kv_bytes_per_token=2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * KV_BYTES_PER_VALUE,
        attn_flops_per_token_per_ctx=4 * spec.num_layers * spec.num_heads * spec.head_dim,
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
        extra={"num_layers": spec.num_layers, "tied_embeddings": spec.tie_word_embeddings, "estimated": True},
    )


def _type(name: str, spec, main: str, head: str) -> str:
    if name.endswith("norm.weight"):
        return "F32"
    return head if name == spec.output_head_name() else main


def _shapes(spec) -> dict[str, int]:
    h, q, kv, ff = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim, spec.intermediate_size
    sizes = {"q_proj": q * h, "k_proj": kv * h, "v_proj": kv * h, "o_proj": h * q,
             "gate_proj": ff * h, "up_proj": ff * h, "down_proj": h * ff}
    out = {}
    for name in spec.tensor_names():
        if name.endswith("norm.weight"):
            out[name] = h
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            out[name] = spec.vocab_size * h
        else:
            out[name] = next(v for k, v in sizes.items() if f".{k}." in name)
    return out
