"""How a Llama model is laid out in GGUF: tensor names, the q/k row permutation, and reading.

Writing and reading a GGUF goes through the ``gguf`` package (GGUFWriter / GGUFReader, its
tensor-name map and its dequantizers). Two things it leaves to its callers are here: the q/k row
permutation llama.cpp's converter applies (llama.cpp rotates adjacent pairs, Hugging Face rotates
halves), and mapping GGUF metadata back to a :class:`LlamaSpec`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import InputError, UnsupportedArchitectureError
from edgekit.model import SUPPORTED_ARCHITECTURES, LlamaSpec, Model


def gguf_names(spec: LlamaSpec) -> dict[str, str]:
    """Hugging Face tensor name -> GGUF tensor name, from gguf's own name map."""
    import gguf

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, spec.num_layers)
    out = {}
    for hf in spec.tensor_names():
        name = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise KeyError(f"gguf has no name for {hf}")
        out[hf] = name
    return out


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face rotate-half row order -> llama.cpp adjacent-pair order (as convert_hf_to_gguf does)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_qk`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def qk_heads(hf_name: str, spec: LlamaSpec) -> int | None:
    """Number of heads to permute by for q/k projections, None for every other tensor."""
    if hf_name.endswith("self_attn.q_proj.weight"):
        return spec.num_heads
    if hf_name.endswith("self_attn.k_proj.weight"):
        return spec.num_kv_heads
    return None


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.get_field(key)
    if f is None:
        return default
    return f.contents()


def open_reader(path: Path):
    """Open a GGUF file with gguf's reader, turning any parse failure into one clear error."""
    import gguf

    path = Path(path)
    if not path.exists():
        raise InputError(f"model file {path} does not exist", "check the path")
    try:
        reader = gguf.GGUFReader(path)
        size = path.stat().st_size
        for t in reader.tensors:
            if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
                raise ValueError(f"tensor {t.name} runs past the end of the file")
    except InputError:
        raise
    except Exception as exc:  # gguf raises ValueError, IndexError, struct errors... on bad bytes
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise InputError(
            f"{path} is not a valid GGUF file ({reason})", "the file is truncated or corrupt: re-download or re-export it"
        ) from None
    return reader


def spec_from_reader(reader, path: Path) -> LlamaSpec:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{path.name}: architecture '{arch}' is not supported", f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if _field(reader, f"{arch}.rope.scaling.type", "none") not in ("none", None):
        raise UnsupportedArchitectureError(f"{path.name}: rope scaling is not supported yet", "use a model without rope scaling")
    names = {t.name for t in reader.tensors}
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    tokens = reader.get_field("tokenizer.ggml.tokens")
    vocab = _field(reader, f"{arch}.vocab_size") or (len(tokens.data) if tokens else None)
    return LlamaSpec(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_layers=int(_field(reader, f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        max_position=int(_field(reader, f"{arch}.context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
    )


def tokenizer_from_reader(reader) -> dict[str, Any]:
    """Every ``tokenizer.*`` key with its GGUF value type, so it can be written back unchanged."""
    out: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype.name == "ARRAY" else None
        value = f.contents()
        if isinstance(value, np.generic):
            value = value.item()
        out[key] = {"type": vtype.name, "sub": sub.name if sub else None, "value": value}
    return out


def read_gguf_model(path: Path, progress=None) -> Model:
    """Dequantize a Llama GGUF into a float32 :class:`Model` in Hugging Face layout."""
    import gguf
    from gguf.quants import dequantize

    path = Path(path)
    reader = open_reader(path)
    spec = spec_from_reader(reader, path)
    to_hf = {v: k for k, v in gguf_names(spec).items()}
    tensors: dict[str, np.ndarray] = {}
    for k, t in enumerate(reader.tensors):
        if progress:
            progress("dequantizing the source", k + 1, len(reader.tensors))
        if t.name not in to_hf:
            if t.name == "rope_freqs.weight":
                raise UnsupportedArchitectureError(f"{path.name}: rope frequency factors are not supported yet")
            continue
        hf = to_hf[t.name]
        try:
            arr = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        except NotImplementedError:
            raise InputError(
                f"{path.name}: tensor {t.name} uses {t.tensor_type.name}, which gguf cannot dequantize",
                "convert from an F16/Q8_0/Q4_x file instead",
            ) from None
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        arr = arr.reshape(shape)
        heads = qk_heads(hf, spec)
        if heads is not None:
            arr = unpermute_qk(arr, heads)
        tensors[hf] = np.ascontiguousarray(arr)
    missing = [n for n in spec.tensor_names() if n not in tensors]
    if missing:
        raise InputError(f"{path.name}: missing tensors ({', '.join(missing[:3])}...)", "the GGUF is incomplete")
    name = _field(reader, "general.name") or path.stem
    return Model(spec=spec, tensors=tensors, tokenizer=tokenizer_from_reader(reader), name=str(name))


def gguf_weight_stats(path: Path) -> dict[str, Any]:
    """Parameters, tensor bytes and bits per weight of a GGUF file, read from its tensor table."""
    reader = open_reader(path)
    params = sum(int(t.n_elements) for t in reader.tensors)
    nbytes = sum(int(t.n_bytes) for t in reader.tensors)
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {"parameters": params, "tensor_bytes": nbytes, "bits_per_weight": 8 * nbytes / max(1, params),
            "tensor_types": types}
