"""What the predictor needs to know about an artifact, read from the artifact itself.

Bytes read per decoded token come from the tensor table (per storage type, because each type runs a
different kernel); FLOPs per token and KV-cache bytes per token come from the architecture.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

KV_BYTES_PER_VALUE = 2  # llama.cpp keeps the KV cache in f16 by default
# bytes per cached value by KV-cache type (llama.cpp's type_k / type_v: q8_0 and q4_0 blocks of 32 values
# with one f16 scale)
KV_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


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

    def with_kv_type(self, kv_type: str | None) -> "ArtifactFacts":
        """These facts for a session whose KV cache is stored as ``kv_type`` (llama.cpp only; None: its default)."""
        return with_kv_type(self, kv_type)


def kv_type_factor(runtime: str, kv_type: str | None) -> float:
    """KV bytes per token of a ``kv_type`` cache over the runtime's default cache (llama.cpp: f16)."""
    if kv_type is None:
        return 1.0
    if kv_type not in KV_TYPE_BYTES:
        from edgekit.errors import InputError

        raise InputError(f"unknown kv_type '{kv_type}'", f"use one of {', '.join(KV_TYPE_BYTES)}")
    return KV_TYPE_BYTES[kv_type] / KV_BYTES_PER_VALUE if runtime == "llamacpp" else 1.0


def with_kv_type(facts: "ArtifactFacts", kv_type: str | None) -> "ArtifactFacts":
    from dataclasses import replace

    f = kv_type_factor(facts.runtime, kv_type)
    if f == 1.0:
        return facts
    return replace(facts, kv_bytes_per_token=int(round(facts.kv_bytes_per_token * f)),
                   extra=dict(facts.extra) | {"kv_type": kv_type})


# Tensors read one row per token (a gather), not streamed whole per decoded token: the untied input
# embedding (handled below), learned position embeddings (gpt2, starcoder, ...) and BERT-style token types.
_GATHERED = ("position_embd.weight", "token_types.weight")


def _meta(reader, key: str, default: Any = None) -> Any:
    f = reader.get_field(key)
    return default if f is None else f.contents()


def _per_layer(value: Any, n_layers: int, key: str, path: Path) -> list[int]:
    """llama.cpp allows some counts (heads, KV heads) as one number or as one number per layer."""
    from edgekit.errors import InputError

    if isinstance(value, (list, tuple)):
        if len(value) != n_layers:
            raise InputError(f"cannot predict for {path.name}: {key} lists {len(value)} layers, block_count says {n_layers}",
                             "the GGUF metadata is inconsistent")
        return [int(v) for v in value]
    return [int(value)] * n_layers


def gguf_facts(path: Path, reader: Any = None) -> ArtifactFacts:
    """Facts of a GGUF of any architecture llama.cpp runs, read straight from its metadata and tensor table
    (``reader``: an already parsed header with gguf's reader's ``get_field`` and ``tensors``).

    Deliberately not through ``spec_from_reader``: that builds a convertible model spec and refuses
    architectures edgekit cannot convert, while prediction needs only the generic ``{arch}.*`` keys
    every llama.cpp architecture writes. Defaults follow llama.cpp's own (KV heads = heads, key and
    value length = embedding length / heads). A missing required key is one :class:`InputError`.
    """
    from edgekit.converters.gguf_layout import open_reader
    from edgekit.errors import InputError

    path = Path(path)
    reader = reader if reader is not None else open_reader(path)
    arch = _meta(reader, "general.architecture")
    needs = "predictions need {arch}.block_count, .embedding_length and .attention.head_count"

    def need(key: str) -> Any:
        value = _meta(reader, f"{arch}.{key}")
        if value is None:
            raise InputError(f"cannot predict for {path.name}: its metadata has no {arch}.{key}", needs.format(arch=arch))
        return value

    if not arch:
        raise InputError(f"cannot predict for {path.name}: its metadata has no general.architecture",
                         needs.format(arch="{arch}"))
    n_layers = int(need("block_count"))
    hidden = int(need("embedding_length"))
    heads = _per_layer(need("attention.head_count"), n_layers, f"{arch}.attention.head_count", path)
    kv_heads = _per_layer(_meta(reader, f"{arch}.attention.head_count_kv", heads), n_layers,
                          f"{arch}.attention.head_count_kv", path)
    default_head = hidden // heads[0] if heads and heads[0] else 0  # attention-free layers (recurrent) have 0 heads
    k_len = int(_meta(reader, f"{arch}.attention.key_length", default_head))
    v_len = int(_meta(reader, f"{arch}.attention.value_length", default_head))
    from edgekit.architectures.base import gguf_name

    names = {t.name for t in reader.tensors}
    embd_name = gguf_name("TOKEN_EMBD")
    tied = gguf_name("OUTPUT") not in names
    # mixture of experts: a decoded token reads only the routed experts of each *_exps tensor
    n_expert = int(_meta(reader, f"{arch}.expert_count", 0) or 0)
    n_used = int(_meta(reader, f"{arch}.expert_used_count", 0) or 0)
    expert_frac = n_used / n_expert if n_expert and n_used else 1.0

    bytes_by_type: dict[str, int] = {}
    params_by_type: dict[str, int] = {}
    for t in reader.tensors:
        typ = t.tensor_type.name
        if t.name in _GATHERED or (t.name == embd_name and not tied):
            continue
        frac = expert_frac if "_exps." in t.name else 1.0
        bytes_by_type[typ] = bytes_by_type.get(typ, 0) + int(int(t.n_bytes) * frac)
        if len(t.shape) >= 2:  # matrices (and stacked expert matrices): 2 FLOPs per parameter per token
            params_by_type[typ] = params_by_type.get(typ, 0) + int(int(t.n_elements) * frac)
    kv = sum(kv_heads) * (k_len + v_len) * KV_BYTES_PER_VALUE
    # QK^T (key length) and attention-weighted V (value length): 2 FLOPs each, per head, per context token
    attn = 2 * sum(heads) * (k_len + v_len)
    tokens = reader.get_field("tokenizer.ggml.tokens")
    embd = next((t for t in reader.tensors if t.name == embd_name), None)
    vocab = _meta(reader, f"{arch}.vocab_size") or (len(tokens.data) if tokens else None) or \
        (int(embd.shape[-1]) if embd is not None and len(embd.shape) == 2 else 0)
    return ArtifactFacts(
        format="gguf", runtime="llamacpp", size_bytes=path.stat().st_size,
        parameters=sum(int(t.n_elements) for t in reader.tensors), bytes_by_type=bytes_by_type,
        params_by_type=params_by_type, kv_bytes_per_token=kv, attn_flops_per_token_per_ctx=attn,
        vocab_size=int(vocab), hidden_size=hidden,
        extra={"num_layers": n_layers, "tied_embeddings": tied, "architecture": str(arch)},
    )


def facts_for(format: str, file: Path) -> ArtifactFacts:
    """The facts of the model file ``file`` of ``format`` ("gguf", "onnx", "coreml"); what
    :meth:`edgekit.contracts.Runtime.facts` returns. A format without a reader is one :class:`InputError`."""
    from edgekit.errors import InputError

    readers = {"gguf": gguf_facts, "onnx": _onnx, "coreml": _coreml}
    if format not in readers:
        raise InputError(f"cannot predict for {Path(file).name}: no facts reader for the {format} format",
                         f"predictions read {', '.join(readers)} artifacts")
    return readers[format](Path(file))


def _onnx(file: Path) -> ArtifactFacts:
    from edgekit.targets.onnx_facts import onnx_facts

    return onnx_facts(file)


def _coreml(file: Path) -> ArtifactFacts:
    from edgekit.targets.coreml_facts import coreml_facts

    return coreml_facts(file)


def artifact_facts(artifact: str | Path) -> ArtifactFacts:
    """Facts of an artifact directory or model file, through the runtime that opens it."""
    from edgekit.session import resolve_artifact, runtime_of

    file, named, _ = resolve_artifact(artifact)
    return runtime_of(file, named).facts(file)


# Block layouts: (weights per block, bytes per block). GGML blocks carry an fp16 scale; ONNX
# MatMulNBits blocks of 32 carry a float32 scale (holding the fp16 value) beside the packed integers.
_BLOCK_BYTES = {"F32": (1, 4), "F16": (1, 2), "Q8_0": (32, 34), "Q4_0": (32, 18), "NBITS8": (32, 36), "NBITS4": (32, 20)}
# What each recipe stores its matrices as: (most matrices, the output head)
RECIPE_TYPES = {"f32": ("F32", "F32"), "f16": ("F16", "F16"), "q8_0": ("Q8_0", "Q8_0"), "q4_0": ("Q4_0", "Q8_0"), "int4": ("Q4_0", "Q8_0")}
# the same numbers in each format's containers, and each runtime's KV cache (bytes per value)
FORMAT_TYPES = {"gguf": {}, "onnx": {"Q8_0": "NBITS8", "Q4_0": "NBITS4"}}
FORMAT_RUNTIME = {"gguf": ("llamacpp", KV_BYTES_PER_VALUE), "onnx": ("onnxruntime", 4)}


def estimate_gguf_facts(spec, quant: str, metadata_bytes: int = 0) -> ArtifactFacts:
    """Facts of a GGUF that ``quant`` would produce from a model of ``spec``, before converting it."""
    return estimate_facts(spec, quant, "gguf", metadata_bytes)


def estimate_facts(spec, quant: str, fmt: str, metadata_bytes: int = 0) -> ArtifactFacts:
    """Facts of the artifact ``quant`` would produce as ``fmt`` ("gguf" or "onnx") from a model of ``spec``."""
    from edgekit.architectures.layout import EMBED, tensor_shape

    rename = FORMAT_TYPES[fmt]
    runtime, kv_value_bytes = FORMAT_RUNTIME[fmt]
    main, head = (rename.get(t, t) for t in RECIPE_TYPES[quant])
    bytes_by_type: dict[str, int] = {}
    params_by_type: dict[str, int] = {}
    total = 0
    for name in spec.tensor_names():
        shape = tensor_shape(spec, name)
        n = int(np.prod(shape))
        typ = "F32" if len(shape) == 1 else (head if name == spec.output_head_name() else main)
        if len(shape) == 2:
            params_by_type[typ] = params_by_type.get(typ, 0) + n
        per, nb = _BLOCK_BYTES[typ]
        total += n // per * nb
        if name == EMBED and not spec.tie_word_embeddings:
            continue  # an untied input embedding is gathered (one row per token), not streamed
        bytes_by_type[typ] = bytes_by_type.get(typ, 0) + n // per * nb
    return ArtifactFacts(
        format=fmt, runtime=runtime, size_bytes=total + metadata_bytes,
        parameters=sum(int(np.prod(tensor_shape(spec, n))) for n in spec.tensor_names()),
        bytes_by_type=bytes_by_type, params_by_type=params_by_type,
        kv_bytes_per_token=2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * kv_value_bytes,
        attn_flops_per_token_per_ctx=4 * spec.num_layers * spec.num_heads * spec.head_dim,
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
        extra={"num_layers": spec.num_layers, "tied_embeddings": spec.tie_word_embeddings, "estimated": True},
    )
