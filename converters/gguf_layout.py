"""Reading GGUF files into edgekit models, and the q/k row permutation of llama.cpp's ``llama``.

Reading goes through the ``gguf`` package (GGUFReader and its dequantizers, which cover every
llama.cpp type, K-quants and IQ types included). Which tensors a file holds, their metadata and
whether q/k rows are permuted is the architecture's to say (``edgekit.architectures``: one table,
used for writing and reading).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import InputError
from edgekit.architectures.spec import DecoderSpec
from edgekit.model import Model


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face rotate-half row order -> llama.cpp adjacent-pair order (as convert_hf_to_gguf does)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_qk`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.get_field(key)
    if f is None:
        return default
    return f.contents()


def open_reader(path: Path):
    """Open a GGUF file with gguf's reader, turning any parse failure into one clear error."""
    import gguf

    from edgekit.formats.gguf_header import check

    path = Path(path)
    if not path.exists():
        raise InputError(f"model file {path} does not exist", "check the path")
    check(path)  # counts, lengths, types and bounds, before gguf's reader trusts them
    try:
        reader = gguf.GGUFReader(path)
        size = path.stat().st_size
        for t in reader.tensors:
            if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
                raise ValueError(f"tensor {t.name} runs past the end of the file")
        for f in reader.fields.values():  # GGUF strings are UTF-8; gguf decodes them only when read, strictly
            if f.types and f.types[-1] == gguf.GGUFValueType.STRING:
                for i in f.data:
                    bytes(f.parts[i]).decode("utf-8")
    except InputError:
        raise
    except Exception as exc:  # gguf raises ValueError, IndexError, struct errors... on bad bytes
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise InputError(
            f"{path} is not a valid GGUF file ({reason})", "the file is truncated or corrupt: re-download or re-export it"
        ) from None
    return reader


def gguf_architecture(reader, path: Path):
    """The registered architecture that reads this file (one clear error for the others)."""
    from edgekit import architectures

    return architectures.for_gguf_arch(_field(reader, "general.architecture"), Path(path).name)


def spec_from_reader(reader, path: Path) -> DecoderSpec:
    from edgekit.architectures.base import GGUFMeta

    from edgekit.errors import EdgekitError

    arch = gguf_architecture(reader, path)
    try:
        spec = arch.spec_from_gguf(GGUFMeta(reader, arch.gguf_arch, Path(path).name))
    except EdgekitError:
        raise
    except Exception as exc:  # metadata of the wrong type or value (a list where a count belongs, a zero...)
        raise InputError(f"{Path(path).name}: unusable {arch.gguf_arch} metadata ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:120] if str(exc) else ''})", "the GGUF is corrupt or from an unsupported variant") from None
    if spec.num_heads <= 0 or spec.num_kv_heads <= 0 or spec.num_heads % spec.num_kv_heads:
        raise InputError(f"{Path(path).name}: {spec.num_heads} heads and {spec.num_kv_heads} KV heads do not make a "
                         "grouped-query model", "the GGUF is corrupt")
    return spec


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
    """Dequantize a GGUF of any registered architecture into a float32 :class:`Model` (neutral names)."""
    from gguf.quants import dequantize

    from edgekit.architectures.layout import tensor_shape

    path = Path(path)
    reader = open_reader(path)
    arch = gguf_architecture(reader, path)
    spec = spec_from_reader(reader, path)
    by_name = {t.name: t for t in reader.tensors}
    layout = arch.gguf_tensors(spec)
    tensors: dict[str, np.ndarray] = {}
    for k, gt in enumerate(layout):
        if progress:
            progress("dequantizing the source", k + 1, len(layout))
        t = by_name.get(gt.name)
        if t is None:
            raise InputError(f"{path.name}: tensor {gt.name} is missing", "the GGUF is incomplete")
        try:
            arr = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        except NotImplementedError:
            raise InputError(f"{path.name}: tensor {t.name} uses {t.tensor_type.name}, which gguf cannot dequantize",
                             "convert from an F16/Q8_0/K-quant file instead") from None
        arr = arr.reshape(tuple(int(x) for x in reversed(t.shape.tolist())))
        if gt.permute_heads is not None:
            arr = unpermute_qk(arr, gt.permute_heads)
        shapes = [tensor_shape(spec, part) for part in gt.parts]
        if sum(sh[0] for sh in shapes) != arr.shape[0] or any(sh[1:] != arr.shape[1:] for sh in shapes):
            raise InputError(f"{path.name}: tensor {gt.name} has shape {arr.shape}, the metadata implies "
                             f"{[tuple(sh) for sh in shapes]}", "the GGUF is inconsistent")
        start = 0
        for part, sh in zip(gt.parts, shapes):
            tensors[part] = np.ascontiguousarray(arr[start : start + sh[0]])
            start += sh[0]
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
