"""A GGUF's header read with struct in tens of milliseconds, and the structural check every GGUF passes
before llama.cpp sees it.

Why by hand: gguf's ``GGUFReader`` builds a numpy view per vocabulary string (about 4 s for SmolLM2 on
2 cores), too slow before every load, and it reads what it is given: a count of 2^60 entries or a tensor
past the end of the file is its caller's problem. llama.cpp's loader trusts much of the header too:
malformed files have aborted the whole process in native code (a block count of 2^32 - 2), or surfaced
as a Python error from inside llama-cpp-python (a context length of 2^31). :func:`check` refuses those
in one line first: every count and length against the bytes left, known tensor types, sane dims that fill
whole blocks, tensor data inside the file, aligned and not overlapping, unique keys and tensor names, and
the hyper-parameters llama.cpp sizes buffers with (block count = the layers present, positive head
counts that divide, int32-sized values, token ids inside the vocabulary, 1-D tensors in F32).
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.errors import InputError

MAX_DIMS = 4  # GGML_MAX_DIMS
INT32_MAX = (1 << 31) - 1


class _Field:
    """The part of gguf's ReaderField that :func:`edgekit.targets.facts.gguf_facts` reads."""

    def __init__(self, value: Any, count: int = 1):
        self._value, self.data = value, range(count)

    def contents(self) -> Any:
        return self._value


@dataclass
class HeaderTensor:
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: list[int]  # as stored (innermost first), like gguf's ReaderTensor
    n_elements: int
    n_bytes: int
    offset: int = 0  # from the start of the data section


class GGUFHeader:
    """A GGUF's metadata and tensor table. Long string arrays (the vocabulary, merges) keep only their
    length. Anything malformed raises ValueError with what is wrong."""

    _SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def __init__(self, path: Path):
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if len(m) < 24 or m[:4] != b"GGUF":
                raise ValueError("not a GGUF (no GGUF magic)")
            version, n_tensors, n_kv = struct.unpack_from("<IQQ", m, 4)
            if version not in (2, 3):  # version 1 and big-endian files go through gguf's reader
                raise ValueError(f"GGUF version {version}")
            # the smallest key/value is 13 bytes and the smallest tensor entry 28: counts beyond what the
            # file can hold are refused before any loop runs that long
            if n_kv * 13 > len(m) or n_tensors * 28 > len(m):
                raise ValueError(f"the header claims {n_kv} keys and {n_tensors} tensors, more than the file holds")
            self._m, self._off = m, 24
            self.fields: dict[str, _Field] = {}
            self.types: dict[str, int] = {}
            for _ in range(n_kv):
                key = self._string().decode("utf-8")
                if key in self.fields:
                    raise ValueError(f"metadata key {key!r} appears twice")
                typ = self._u("I")
                self.fields[key] = self._value(typ)
                self.types[key] = typ
            self.tensors: list[HeaderTensor] = []
            names = set()
            for _ in range(n_tensors):
                name = self._string().decode("utf-8")
                if name in names:
                    raise ValueError(f"tensor {name!r} appears twice")
                names.add(name)
                n_dims = self._u("I")
                if not 1 <= n_dims <= MAX_DIMS:
                    raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
                dims = [self._u("Q") for _ in range(n_dims)]
                raw_type = self._u("I")
                try:
                    typ = GGMLQuantizationType(raw_type)
                    block, nbytes = GGML_QUANT_SIZES[typ]
                except (ValueError, KeyError):
                    raise ValueError(f"tensor {name!r} has unknown type id {raw_type}") from None
                offset = self._u("Q")
                n = 1
                for d in dims:
                    if not 1 <= d <= 1 << 40:
                        raise ValueError(f"tensor {name!r} has dimension {d}")
                    n *= d
                if n > 1 << 40 or dims[0] % block:
                    raise ValueError(f"tensor {name!r} of shape {dims} does not fill whole {typ.name} blocks")
                if n_dims == 1 and typ != GGMLQuantizationType.F32:
                    # norms and biases: llama.cpp's converters always write them F32 and its CPU kernels
                    # abort on anything else in those operands
                    raise ValueError(f"the 1-D tensor {name!r} is {typ.name}, not F32")
                self.tensors.append(HeaderTensor(name, typ, dims, n, n * nbytes // block, offset))
            align = self.value("general.alignment", 32)
            if not isinstance(align, int) or align <= 0 or align & (align - 1) or align > 1 << 20:
                raise ValueError(f"general.alignment is {align!r}, not a power of two")
            self.data_start = -(-self._off // align) * align
            end = self.data_start
            for t in sorted(self.tensors, key=lambda t: t.offset):
                if t.offset % align:
                    raise ValueError(f"tensor {t.name!r} starts at {t.offset}, not a multiple of the alignment {align}")
                if self.data_start + t.offset < end:
                    raise ValueError(f"tensor {t.name!r} overlaps the tensor before it")
                end = self.data_start + t.offset + t.n_bytes
                if end > len(m):
                    raise ValueError(f"tensor {t.name!r} runs past the end of the file ({end} > {len(m)} bytes)")
            self.file_bytes = len(m)
            del self._m

    def _u(self, fmt: str) -> Any:
        (v,) = struct.unpack_from("<" + fmt, self._m, self._off)
        self._off += struct.calcsize(fmt)
        return v

    def _string(self) -> bytes:
        n = self._u("Q")
        if self._off + n > len(self._m):
            raise ValueError("a string runs past the end of the file")
        s = self._m[self._off : self._off + n]
        self._off += n
        return s

    def _value(self, typ: int) -> _Field:
        if typ == 8:
            return _Field(self._string().decode("utf-8", errors="replace"))
        if typ == 9:
            item, count = self._u("I"), self._u("Q")
            if item == 8:
                if count * 8 > len(self._m) - self._off:
                    raise ValueError("a string array runs past the end of the file")
                if count <= 64:  # short string lists are kept; the vocabulary and merges are stepped over
                    return _Field([self._string().decode("utf-8", errors="replace") for _ in range(count)], count)
                m, off, size = self._m, self._off, len(self._m)
                for _ in range(count):
                    if off + 8 > size:
                        raise ValueError("a string array runs past the end of the file")
                    off += 8 + struct.unpack_from("<Q", m, off)[0]
                if off > size:
                    raise ValueError("a string array runs past the end of the file")
                self._off = off
                return _Field(None, count)
            if item not in self._SCALARS:
                raise ValueError(f"an array of unknown value type {item}")
            fmt = self._SCALARS[item]
            size = struct.calcsize(fmt)
            if self._off + size * count > len(self._m):
                raise ValueError("an array runs past the end of the file")
            values = list(struct.unpack_from(f"<{count}{fmt}", self._m, self._off)) if count <= 65536 else None
            self._off += size * count
            return _Field(values, count)
        if typ not in self._SCALARS:
            raise ValueError(f"unknown value type {typ}")
        return _Field(self._u(self._SCALARS[typ]))

    def get_field(self, key: str) -> _Field | None:
        return self.fields.get(key)

    def value(self, key: str, default: Any = None) -> Any:
        f = self.fields.get(key)
        return default if f is None else f.contents()

    def count(self, key: str) -> int:
        f = self.fields.get(key)
        return 0 if f is None else len(f.data)


_POSITIVE = ("block_count", "embedding_length", "attention.head_count", "context_length")


def _hparams(h: GGUFHeader) -> None:
    """What llama.cpp sizes buffers and loops with, for any architecture: ``{arch}.*`` integers."""
    arch = h.value("general.architecture")
    if not isinstance(arch, str) or not re.fullmatch(r"[a-z0-9_\-.]{1,64}", arch):
        raise ValueError(f"general.architecture is {arch!r}")
    for key, f in h.fields.items():
        v = f.contents()
        if key.startswith(arch + ".") and isinstance(v, int) and not isinstance(v, bool) and not 0 <= v <= INT32_MAX:
            raise ValueError(f"{key} is {v}")
    for name in _POSITIVE:  # scalars only: some architectures give per-layer arrays, where 0 can be meant
        v = h.value(f"{arch}.{name}")
        if v is not None and not isinstance(v, list) and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise ValueError(f"{arch}.{name} is {v!r}")
    layers = {int(m.group(1)) for t in h.tensors if (m := re.match(r"blk\.(\d+)\.", t.name))}
    blocks = h.value(f"{arch}.block_count")
    if isinstance(blocks, int) and layers and (blocks != len(layers) or max(layers) != blocks - 1):
        raise ValueError(f"{arch}.block_count is {blocks} but the file holds {len(layers)} layers")
    heads, kv = h.value(f"{arch}.attention.head_count"), h.value(f"{arch}.attention.head_count_kv")
    if isinstance(heads, int) and isinstance(kv, int) and (kv <= 0 or heads % kv):
        raise ValueError(f"{arch}.attention.head_count_kv is {kv}, which does not divide head_count {heads}")
    n_tokens = h.count("tokenizer.ggml.tokens")
    for key in ("bos", "eos", "unknown", "padding", "eot", "eom", "sep", "cls", "mask"):
        tid = h.value(f"tokenizer.ggml.{key}_token_id")
        if tid is not None and n_tokens and not (isinstance(tid, int) and 0 <= tid < n_tokens):
            raise ValueError(f"tokenizer.ggml.{key}_token_id is {tid!r}, outside the vocabulary of {n_tokens}")
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        if key in h.fields and n_tokens and h.count(key) != n_tokens:
            raise ValueError(f"{key} has {h.count(key)} entries for {n_tokens} tokens")


def check(path: str | Path) -> GGUFHeader:
    """The header of the GGUF at ``path`` if it is sound; else one :class:`InputError` naming the problem."""
    path = Path(path)
    try:
        header = GGUFHeader(path)
        _hparams(header)
    except (ValueError, struct.error, UnicodeDecodeError, OverflowError) as exc:
        raise InputError(f"{path} is not a valid GGUF: {exc}", "re-download or re-export the file") from None
    except OSError as exc:
        raise InputError(f"{path} cannot be read ({exc.strerror or exc})", "check the path and permissions") from None
    return header
