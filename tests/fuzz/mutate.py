"""Mutators: generic byte damage, and structure-aware edits that keep a file parseable far enough to reach
the code behind the parser (huge counts and lengths, out-of-range offsets and dims, wrong type ids,
duplicated or missing keys, values of the wrong type). Every function takes a ``random.Random``."""

from __future__ import annotations

import json
import random
import struct
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------- bytes


def truncate(rng: random.Random, data: bytes, near: int | None = None) -> bytes:
    """Cut the file short: anywhere, or (more often) inside its first ``near`` bytes, where headers live."""
    limit = near if near and rng.random() < 0.7 else len(data)
    return data[: rng.randrange(0, max(1, min(limit, len(data))))]


def flip_bits(rng: random.Random, data: bytes, region: int | None = None, n: int | None = None) -> bytes:
    b = bytearray(data)
    span = min(region or len(b), len(b))
    for _ in range(n or rng.randint(1, 8)):
        b[rng.randrange(span)] ^= 1 << rng.randrange(8)
    return bytes(b)


def interesting_int(rng: random.Random, width: int, current: int) -> int:
    """Values that break size arithmetic: 0, 1, the edges of the width, a little or a lot past ``current``."""
    top = (1 << (8 * width)) - 1
    pool = [0, 1, 2, 3, top, top - 1, top >> 1, (top >> 1) + 1, 1 << 31, (1 << 32) - 1, 1 << 40,
            current + 1, max(0, current - 1), current * 2, current * 1000, 255, 65535, rng.randrange(top + 1)]
    return rng.choice(pool) & top


# ---------------------------------------------------------------- GGUF


@dataclass
class Part:
    offset: int  # absolute, in the file
    size: int
    role: str  # "kv.key_len", "kv.type", "kv.count", "kv.str_len", "kv.value", "tensor.dims", ...
    key: str  # the metadata key or tensor name the part belongs to


@dataclass
class GGUFLayout:
    parts: list[Part]
    kv_spans: list[tuple[str, int, int]]  # (key, start, end)
    header_end: int  # where the tensor-info table ends (the data section is aligned after it)
    data_start: int
    alignment: int


@lru_cache(maxsize=4)
def gguf_layout(path: str) -> GGUFLayout:
    """Where every header integer of a good GGUF sits, read once with gguf's own reader (field offsets and
    the numpy parts it reads them into)."""
    import gguf

    r = gguf.GGUFReader(path)
    parts: list[Part] = [Part(8, 8, "header.n_tensors", ""), Part(16, 8, "header.n_kv", "")]
    spans = []
    end = 24
    for f in list(r.fields.values()):
        off = f.offset
        sizes = [int(p.nbytes) for p in f.parts]
        starts = [off + s for s in accumulate([0] + sizes[:-1])]
        stop = off + sum(sizes)
        end = max(end, stop)
        if f.name.startswith("GGUF."):
            continue  # the header fields themselves (magic, version, counts) are covered above
        spans.append((f.name, off, stop))
        parts.append(Part(starts[0], 8, "kv.key_len", f.name))
        parts.append(Part(starts[2], 4, "kv.type", f.name))
        if len(sizes) > 3 and f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
            parts.append(Part(starts[3], 4, "kv.item_type", f.name))
            parts.append(Part(starts[4], 8, "kv.count", f.name))
            for k in range(5, min(len(sizes), 5 + 200), 2):  # the first string lengths of a string array
                if f.types[-1] == gguf.GGUFValueType.STRING:
                    parts.append(Part(starts[k], 8, "kv.str_len", f.name))
        elif f.types and f.types[0] == gguf.GGUFValueType.STRING:
            parts.append(Part(starts[3], 8, "kv.str_len", f.name))
        elif len(sizes) > 3:
            parts.append(Part(starts[3], sizes[3], "kv.value", f.name))
    for t in r.tensors:
        f = t.field
        sizes = [int(p.nbytes) for p in f.parts]
        starts = [f.offset + s for s in accumulate([0] + sizes[:-1])]
        end = max(end, f.offset + sum(sizes))
        parts.append(Part(starts[0], 8, "tensor.name_len", t.name))
        parts.append(Part(starts[2], 4, "tensor.n_dims", t.name))
        for k in range(sizes[3] // 8):
            parts.append(Part(starts[3] + 8 * k, 8, "tensor.dim", t.name))
        parts.append(Part(starts[4], 4, "tensor.type", t.name))
        parts.append(Part(starts[5], 8, "tensor.offset", t.name))
    align = int(r.alignment)
    return GGUFLayout(parts, spans, end, int(r.data_offset), align)


def _put(b: bytearray, part: Part, value: int) -> None:
    b[part.offset : part.offset + part.size] = value.to_bytes(part.size, "little")


def _rebuild(header: bytes, data: bytes, align: int) -> bytes:
    """A header of a new length, padded so the (unchanged) tensor data starts aligned again."""
    pad = (-len(header)) % align
    return header + b"\0" * pad + data


def gguf_string_value(header: bytes, key: str, layout: GGUFLayout, text: str, data: bytes) -> bytes:
    """Replace the string value of ``key`` (e.g. the chat template), fixing its length and the padding."""
    _, start, stop = next(s for s in layout.kv_spans if s[0] == key)
    raw = text.encode("utf-8", errors="surrogatepass")
    kbytes = header[start + 8 : start + 8 + int.from_bytes(header[start : start + 8], "little")]
    kv = struct.pack("<Q", len(kbytes)) + kbytes + struct.pack("<I", 8) + struct.pack("<Q", len(raw)) + raw
    return _rebuild(header[:start] + kv + header[stop : layout.header_end], data, layout.alignment)


METADATA_SCALARS = ("llama.block_count", "llama.embedding_length", "llama.attention.head_count",
                    "llama.attention.head_count_kv", "llama.feed_forward_length", "llama.context_length",
                    "llama.rope.dimension_count", "general.alignment", "tokenizer.ggml.bos_token_id",
                    "tokenizer.ggml.eos_token_id", "general.file_type", "llama.vocab_size")


def gguf(rng: random.Random, path: Path) -> tuple[bytes, str]:
    """One mutation of the GGUF at ``path``: (new bytes, what was done)."""
    data = path.read_bytes()
    lay = gguf_layout(str(path))
    op = rng.choices(["set_int", "metadata", "truncate", "flip_header", "flip_any", "dup_kv", "drop_kv",
                      "tensor", "version", "string"], weights=[6, 4, 2, 2, 1, 1, 1, 4, 1, 1])[0]
    b = bytearray(data)
    if op == "set_int":
        p = rng.choice(lay.parts)
        cur = int.from_bytes(b[p.offset : p.offset + p.size], "little")
        v = interesting_int(rng, p.size, cur)
        _put(b, p, v)
        return bytes(b), f"{p.role}({p.key})={v}"
    if op == "metadata":
        keys = {p.key: p for p in lay.parts if p.role == "kv.value" and p.key in METADATA_SCALARS}
        p = keys[rng.choice(sorted(keys))]
        cur = int.from_bytes(b[p.offset : p.offset + p.size], "little")
        v = interesting_int(rng, p.size, cur)
        _put(b, p, v)
        return bytes(b), f"{p.key}={v}"
    if op == "tensor":
        p = rng.choice([p for p in lay.parts if p.role.startswith("tensor.")])
        cur = int.from_bytes(b[p.offset : p.offset + p.size], "little")
        if p.role == "tensor.type":
            v = rng.choice([0, 1, 2, 3, 4, 5, 8, 12, 16, 30, 31, 39, 40, 41, 255, 1 << 31, cur + 1])
        elif p.role == "tensor.offset":
            v = rng.choice([cur + 1, cur + 31, cur + lay.alignment, len(data), len(data) - lay.data_start,
                            0, (1 << 63), cur * 2 + 4096])
        else:
            v = interesting_int(rng, p.size, cur)
        _put(b, p, v & ((1 << (8 * p.size)) - 1))
        return bytes(b), f"{p.role}({p.key})={v}"
    if op == "truncate":
        return truncate(rng, data, lay.data_start + 64), "truncate"
    if op == "flip_header":
        return flip_bits(rng, data, lay.header_end), "flip header bits"
    if op == "flip_any":
        return flip_bits(rng, data, None, rng.randint(1, 64)), "flip bits anywhere"
    if op == "version":
        b[4:8] = struct.pack("<I", rng.choice([0, 1, 4, 99, 1 << 31]))
        return bytes(b), "version"
    header, body = bytes(b[: lay.header_end]), data[lay.data_start :]
    if op == "string":
        key = rng.choice(["general.architecture", "general.name", "tokenizer.ggml.model", "tokenizer.ggml.pre"])
        text = rng.choice(["", "mamba", "x" * 70000, "llama\0", "\udcff", "../../etc/passwd", "gpt2", "llama" * 3])
        return gguf_string_value(header, key, lay, text, body), f"{key}={text[:20]!r}"
    key, start, stop = rng.choice(lay.kv_spans)
    n_kv = int.from_bytes(header[16:24], "little")
    if op == "dup_kv":
        new = header[:stop] + header[start:stop] + header[stop:]
        new = new[:16] + struct.pack("<Q", n_kv + 1) + new[24:]
        return _rebuild(new, body, lay.alignment), f"duplicate {key}"
    new = header[:start] + header[stop:]
    new = new[:16] + struct.pack("<Q", n_kv - 1) + new[24:]
    return _rebuild(new, body, lay.alignment), f"drop {key}"


# ---------------------------------------------------------------- JSON / TOML trees

DEEP = "__edgekit_fuzz_deep__"
HOSTILE_STRINGS = ["", "../../etc/passwd", "/etc/passwd", "..", ".", "model.gguf\0.txt", "x" * 100000, "\u202e",
                   "manifest.json", "../manifest.json", "C:\\Windows\\win.ini", "nan", "-1", "1e309", "llama",
                   "onnxruntime", "llamacpp", "coreml", "gguf", "\udcff"]
HOSTILE_VALUES: list[Any] = [None, True, False, 0, -1, 1, 2, 10**30, -(10**30), 1e308, 0.5, -0.5, 1.0000001,
                             float("nan"), float("inf"), [], {}, [1, 2], {"a": 1}, [[[[[]]]]]]


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node[:20]):  # long lists (vocabularies): their first entries
            out += _paths(v, prefix + (i,))
    return out


def _get(node: Any, path: tuple) -> Any:
    for k in path:
        node = node[k]
    return node


def _random_value(rng: random.Random, like: Any) -> Any:
    if rng.random() < 0.35:
        return rng.choice(HOSTILE_STRINGS)
    if rng.random() < 0.3 and isinstance(like, (int, float)) and not isinstance(like, bool):
        return rng.choice([like * 10**6, -like, like + 1, 0, like * 1e-9])
    return rng.choice(HOSTILE_VALUES)


def tree(rng: random.Random, doc: Any, allow_nonfinite: bool = True, weights: dict[str, float] | None = None) -> tuple[Any, str]:
    """One edit of a parsed JSON / TOML document: drop a key, change a value's type or size, add a key."""
    doc = json.loads(json.dumps(doc))  # a deep copy
    paths = [p for p in _paths(doc) if p]
    path = rng.choice(paths)
    parent, key = _get(doc, path[:-1]), path[-1]
    ops = {"drop": 3, "value": 6, "add": 1, "deep": 0.3, "swap_type": 2}
    ops.update(weights or {})
    op = rng.choices(list(ops), weights=list(ops.values()))[0]
    where = "/".join(map(str, path))
    if op == "drop":
        del parent[key]
        return doc, f"drop {where}"
    if op == "add":
        target = parent if isinstance(parent, dict) else doc
        if isinstance(target, dict):
            target[rng.choice(["extra", "unknown_key", "__class__", "passes", "file"])] = _random_value(rng, None)
        return doc, f"add key near {where}"
    if op == "deep":  # written as text by json_text: a Python object this deep would not serialize
        depth = rng.choice([50, 5000, 100000])
        parent[key] = f"{DEEP}{depth}"
        return doc, f"nesting {depth} deep at {where}"
    if op == "swap_type":
        cur = parent[key]
        parent[key] = (str(cur) if not isinstance(cur, str) else rng.choice([0, [cur], {"v": cur}]))
        return doc, f"retype {where}"
    v = _random_value(rng, parent[key])
    if not allow_nonfinite and isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        v = 1e308
    parent[key] = v
    return doc, f"{where}={str(v)[:30]!r}"


def json_text(rng: random.Random, text: str) -> tuple[bytes, str]:
    """A JSON file: a tree edit (mostly) or raw damage (truncation, flipped bits, a duplicated key)."""
    r = rng.random()
    if r < 0.15:
        return truncate(rng, text.encode()), "truncate"
    if r < 0.25:
        return flip_bits(rng, text.encode()), "flip bits"
    if r < 0.3:  # a key given twice: json keeps the last; is that what the reader expects?
        i = text.find('"', 1)
        j = text.find(",", i)
        return (text[: j + 1] + text[1 : j + 1] + text[j + 1 :]).encode() if i > 0 and j > 0 else text.encode(), "duplicate key"
    import re

    doc, what = tree(rng, json.loads(text))
    out = json.dumps(doc)
    out = re.sub(f'"{DEEP}(\\d+)"', lambda m: "[" * int(m.group(1)) + "0" + "]" * int(m.group(1)), out)
    return out.encode("utf-8", errors="surrogatepass"), what


def toml_text(rng: random.Random, text: str) -> tuple[bytes, str]:
    """A TOML file: a tree edit written back with tomli-w, or raw damage (a line twice, truncation, bits)."""
    import tomllib

    import tomli_w

    r = rng.random()
    if r < 0.1:
        return truncate(rng, text.encode()), "truncate"
    if r < 0.2:
        return flip_bits(rng, text.encode()), "flip bits"
    if r < 0.3:
        lines = text.splitlines(keepends=True)
        k = rng.randrange(len(lines))
        return "".join(lines[: k + 1] + [lines[k]] + lines[k + 1 :]).encode(), f"line {k + 1} twice"
    for _ in range(20):
        doc, what = tree(rng, tomllib.loads(text))
        try:
            return tomli_w.dumps(_tomlable(doc)).encode("utf-8", errors="surrogatepass"), what
        except (TypeError, ValueError, RecursionError):
            continue
    return truncate(rng, text.encode()), "truncate"


def _tomlable(node: Any) -> Any:
    """TOML has no null: a None becomes an empty table, so the key exists with the wrong type."""
    if node is None:
        return {}
    if isinstance(node, dict):
        return {k: _tomlable(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_tomlable(v) for v in node]
    return node


# ---------------------------------------------------------------- safetensors


def safetensors(rng: random.Random, path: Path) -> tuple[bytes, str]:
    data = path.read_bytes()
    (n,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    r = rng.random()
    if r < 0.2:
        v = rng.choice([0, 1, n + 1, n - 1, len(data), 1 << 40, (1 << 64) - 1])
        return struct.pack("<Q", v) + data[8:], f"header length {v}"
    if r < 0.3:
        return truncate(rng, data, 8 + n + 64), "truncate"
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    op = rng.choice(["dtype", "shape", "offsets", "offsets", "drop", "tree"])
    if op == "dtype":
        entry["dtype"] = rng.choice(["F64", "I64", "BOOL", "Q4", "", "F16", "U8", 7])
    elif op == "shape":
        entry["shape"] = rng.choice([[], [0], [-1, 4], [1 << 40, 1 << 40], entry["shape"][::-1] + [2], "big"])
    elif op == "offsets":
        a, b = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[b, a], [a, b + 4], [a, len(body) + 1], [-8, b], [a, 1 << 62], [a], "x"])
    elif op == "drop":
        del header[name]
    else:
        header, what = tree(rng, header)
        name = what
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body, f"{op} {name}"


# ---------------------------------------------------------------- ONNX


def onnx_model(rng: random.Random, directory: Path) -> tuple[dict[str, bytes], str]:
    """Mutated files of an ONNX artifact directory: {file name: new bytes}."""
    import onnx

    model_path = directory / "model.onnx"
    raw = model_path.read_bytes()
    r = rng.random()
    if r < 0.12:
        return {"model.onnx": truncate(rng, raw)}, "truncate model.onnx"
    if r < 0.2:
        return {"model.onnx": flip_bits(rng, raw, None, rng.randint(1, 16))}, "flip bits in model.onnx"
    data_files = sorted(p.name for p in directory.iterdir() if p.name.startswith("model.onnx") and p.name != "model.onnx")
    if r < 0.3 and data_files:
        name = data_files[0]
        return {name: truncate(rng, (directory / name).read_bytes())}, f"truncate {name}"
    m = onnx.load_from_string(raw)  # external data stays referenced, not loaded
    g = m.graph
    op = rng.choice(["op_type", "drop_node", "init_dims", "ext_location", "ext_offset", "opset", "ir", "elem_type",
                     "rename_input", "drop_output", "attr"])
    if op == "op_type" and g.node:
        rng.choice(g.node).op_type = rng.choice(["NoSuchOp", "Loop", "MatMul", "Add", ""])
    elif op == "drop_node" and g.node:
        g.node.remove(rng.choice(g.node))
    elif op == "init_dims" and g.initializer:
        t = rng.choice(g.initializer)
        if t.dims:
            t.dims[rng.randrange(len(t.dims))] = rng.choice([0, 1, 3, 1 << 31, 1 << 40])
    elif op in ("ext_location", "ext_offset"):
        ext = [t for t in g.initializer if t.external_data]
        if ext:
            t = rng.choice(ext)
            for kv in t.external_data:
                if op == "ext_location" and kv.key == "location":
                    kv.value = rng.choice(["../../../../etc/passwd", "/etc/hostname", "missing.data", "", "model.onnx"])
                if op == "ext_offset" and kv.key in ("offset", "length"):
                    kv.value = str(rng.choice([1 << 40, -5, 3, 10**12]))
    elif op == "opset":
        m.opset_import[0].version = rng.choice([1, 7, 99, 10**6])
    elif op == "ir":
        m.ir_version = rng.choice([0, 1, 99])
    elif op == "elem_type" and g.input:
        rng.choice(g.input).type.tensor_type.elem_type = rng.choice([0, 1, 7, 10, 16, 99])
    elif op == "rename_input" and g.node:
        n = rng.choice([n for n in g.node if n.input] or list(g.node))
        if n.input:
            n.input[rng.randrange(len(n.input))] = "no_such_tensor"
    elif op == "drop_output" and g.output:
        g.output.remove(rng.choice(g.output))
    elif op == "attr":
        nodes = [n for n in g.node if n.attribute]
        if nodes:
            a = rng.choice(rng.choice(nodes).attribute)
            if a.type == onnx.AttributeProto.INT:
                a.i = rng.choice([0, -1, 1 << 40, 3])
            elif a.type == onnx.AttributeProto.FLOAT:
                a.f = rng.choice([0.0, -1.0, float("nan")])
    return {"model.onnx": m.SerializeToString()}, op


# ---------------------------------------------------------------- chat templates

ESCAPES = [  # templates that try to reach Python internals from inside the sandbox
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('touch {marker}') }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.popen('touch {marker}').read() }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{% if c.__name__ == 'Popen' %}"
    "{{ c(['touch', '{marker}']) }}{% endif %}{% endfor %}",
    "{{ lipsum.__globals__['os'].popen('touch {marker}').read() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{{ raise_exception.__globals__['__builtins__']['open']('{marker}', 'w') }}",
    "{{ namespace.__init__.__globals__.os.system('touch {marker}') }}",
    "{{ strftime_now.__globals__['__builtins__']['__import__']('os').system('touch {marker}') }}",
]
BROKEN = [
    "{% for m in messages %}{{ m['content'] }}",  # an unclosed block
    "{{ messages[0]['no_such_key'] + 1 }}",
    "{{ raise_exception('this model refuses') }}",
    "{% for i in range(10**9) %}x{% endfor %}",
    "{{ 'x' * 10**6 }}{{ 'y' * 10 }}",
    "{{ messages | tojson(indent=2) }}",
    "{% set x = [] %}{% for i in range(100000) %}{% set _ = x.append(i) %}{% endfor %}{{ x | length }}",
    "{{ undefined_variable.attribute }}",
    "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}",
    "{{ 1 / 0 }}",
    "{%",
    "\0\xff",
]


def template(rng: random.Random, good: str, marker: str) -> tuple[str, str]:
    r = rng.random()
    if r < 0.3:
        k = rng.randrange(len(ESCAPES))
        return ESCAPES[k].replace("{marker}", marker), f"escape #{k}"
    if r < 0.55:
        k = rng.randrange(len(BROKEN))
        return BROKEN[k], f"broken #{k}"
    s = list(good)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(s) + 1)
        if rng.random() < 0.5 and s:
            del s[min(i, len(s) - 1)]
        else:
            s.insert(i, rng.choice(["{%", "%}", "{{", "}}", "'", "(", "|", " endfor ", "\n"]))
    return "".join(s), "edited"
