"""Predictor facts of an ONNX artifact (decoder or sentence encoder), read from its graph without running it.

The graph is loaded without its external data (``load_external_data=False``): only the initializers'
shapes and types are needed. Each initializer gets one role from the nodes that read it (through
pass-through nodes such as Identity, Cast, Transpose, Reshape):

- a matrix (``MatMulNBits`` B / scales / zero points, or the weight side of ``MatMul`` / ``Gemm``):
  streamed whole per decoded token (per batch for an encoder). Type ``NBITS{bits}`` for MatMulNBits,
  else the initializer's float type (``F16``, ``F32``); 2 FLOPs per parameter per token.
- gathered (``Gather`` / ``GatherBlockQuantized`` data: embeddings, positions): one row per token, not
  streamed. A tied embedding is also the output head's MatMulNBits B and so counts once, as the head.
- a table read by position (``GroupQueryAttention``'s rotary cos/sin caches): neither streamed nor a parameter.
- anything else of a float type (norm weights, biases): streamed, in the ``F32`` bucket the predictor
  reads at the plain read rate (a few hundred KB).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from edgekit.errors import InputError

# ONNX Runtime's decoder session keeps its KV cache in float32 (runtimes/onnxruntime.py allocates the
# past/present buffers as np.float32 and GroupQueryAttention updates them in place)
ONNX_KV_BYTES_PER_VALUE = 4
_PASS_THROUGH = {"Identity", "Cast", "Transpose", "Reshape", "Unsqueeze", "Squeeze", "Flatten"}
_GATHERS = {"Gather", "GatherBlockQuantized", "GatherElements", "GatherND"}
_TABLES = {"GroupQueryAttention", "RotaryEmbedding"}
_SUB_BYTE_BITS = {22: 4, 21: 4, 23: 4}  # TensorProto INT4, UINT4, FLOAT4E2M1
_LAYER_RE = re.compile(r"(?:^|\.)layers?\.(\d+)\.")
_ROLE_RANK = {"matrix": 3, "other": 2, "gathered": 1, "table": 0}


def _tensor_bits(t) -> tuple[int, int, str]:
    """(elements, bits per element, type name) of an initializer, from its header only."""
    import numpy as np
    from onnx import TensorProto, helper

    n = int(np.prod(t.dims)) if len(t.dims) else 1
    if t.data_type in _SUB_BYTE_BITS:
        return n, _SUB_BYTE_BITS[t.data_type], TensorProto.DataType.Name(t.data_type)
    dt = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
    name = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}.get(dt.name, dt.name.upper())
    return n, 8 * dt.itemsize, name


def _is_float(t) -> bool:
    from onnx import TensorProto

    return t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


def read_graph(path: Path):
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError, truncated files: one line
        raise InputError(f"cannot read the ONNX graph {path.name} ({type(exc).__name__})",
                         "re-export the artifact with `edgekit convert --format onnx`") from None


def weight_table(proto) -> dict[str, Any]:
    """Bytes and parameters per type and role: what every ONNX reader here builds on."""
    from onnx import helper

    inits = {t.name: t for t in proto.graph.initializer}
    source = {n: n for n in inits}  # value name -> the initializer it is a view of
    for node in proto.graph.node:
        if node.op_type in _PASS_THROUGH and node.input and node.input[0] in source:
            for o in node.output:
                source[o] = source[node.input[0]]
    role: dict[str, tuple[str, str, int]] = {}  # initializer -> (role, type, parameters)

    def claim(name: str, r: str, typ: str, params: int) -> None:
        if name not in source:
            return
        init = source[name]
        if init not in role or _ROLE_RANK[r] > _ROLE_RANK[role[init][0]]:
            role[init] = (r, typ, params)

    heads: list[int] = []
    for node in proto.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        op = node.op_type
        if op == "MatMulNBits":
            typ = f"NBITS{int(attrs['bits'])}"
            claim(node.input[1], "matrix", typ, int(attrs["K"]) * int(attrs["N"]))
            for extra in node.input[2:4]:  # scales, zero points: part of the same matrix's bytes
                claim(extra, "matrix", typ, 0)
        elif op in ("MatMul", "Gemm", "FusedMatMul"):
            for slot in (1, 0):  # the weight is normally B; x @ W with W first never occurs but costs nothing
                if slot < len(node.input) and node.input[slot] in source:
                    t = inits[source[node.input[slot]]]
                    n, _, typ = _tensor_bits(t)
                    claim(node.input[slot], "matrix", typ, n)
                    break
        elif op == "GatherBlockQuantized":
            bits = int(attrs.get("bits", 4))
            if node.input[0] in source:
                n, b, _ = _tensor_bits(inits[source[node.input[0]]])
                claim(node.input[0], "gathered", f"NBITS{bits}", n * b // bits)
            for extra in node.input[2:4]:
                claim(extra, "gathered", f"NBITS{bits}", 0)
        elif op in _GATHERS:
            if node.input[0] in source:
                n, _, typ = _tensor_bits(inits[source[node.input[0]]])
                claim(node.input[0], "gathered", typ, n)
        elif op in _TABLES:
            if op == "GroupQueryAttention":
                heads.append(int(attrs["num_heads"]))
            for i in node.input:
                claim(i, "table", "", 0)
        else:
            for i in node.input:
                if i in source and _is_float(inits[source[i]]):
                    t = inits[source[i]]
                    claim(i, "other", "F32", _tensor_bits(t)[0])
    streamed: dict[str, int] = {}
    params: dict[str, int] = {}
    gathered_params = other_params = total_bytes = 0
    for name, (r, typ, p) in role.items():
        n, b, _ = _tensor_bits(inits[name])
        nbytes = (n * b + 7) // 8
        total_bytes += nbytes
        if r == "matrix":
            streamed[typ] = streamed.get(typ, 0) + nbytes
            if p:
                params[typ] = params.get(typ, 0) + p
        elif r == "other":
            streamed["F32"] = streamed.get("F32", 0) + nbytes
            other_params += p
        elif r == "gathered":
            gathered_params += p
    layers = {int(m.group(1)) for name in inits for m in [_LAYER_RE.search(name)] if m}
    return {"bytes_by_type": streamed, "params_by_type": params, "weight_bytes": total_bytes,
            "parameters": sum(params.values()) + gathered_params + other_params, "gqa_heads": heads,
            "num_layers": len(layers) or None, "tied": any(r == "matrix" and any(
                n.op_type in ("GatherBlockQuantized", "Gather") and source.get(n.input[0]) == name
                for n in proto.graph.node) for name, (r, _, _) in role.items())}


def artifact_bytes(file: Path) -> int:
    """The model file plus its external data (what is loaded)."""
    from edgekit.formats.onnx import EXTERNAL_DATA

    data = file.parent / EXTERNAL_DATA
    return file.stat().st_size + (data.stat().st_size if data.exists() else 0)


def onnx_facts(file: Path):
    """Facts of an edgekit ONNX decoder or encoder (the config beside it says which)."""
    from edgekit.formats.onnx import CONFIG
    from edgekit.targets.facts import ArtifactFacts

    file = Path(file)
    kind = CONFIG.peek_kind(file)
    config = CONFIG.read(file, kind)
    table = weight_table(read_graph(file))
    common = dict(format="onnx", runtime="onnxruntime", size_bytes=artifact_bytes(file), parameters=table["parameters"],
                  bytes_by_type=table["bytes_by_type"], params_by_type=table["params_by_type"])
    if kind == "encoder":
        hidden = int(config["dim"])
        layers = table["num_layers"] or int(config.get("num_layers", 0))
        if not layers:
            raise InputError(f"cannot predict for {file.name}: no layer index in its initializer names",
                             "predictions read the layer count from names like '...layer.3....'")
        return ArtifactFacts(**common, kv_bytes_per_token=0,
                             # QK^T and attention x V over all heads: 2 x hidden FLOPs each per context token
                             attn_flops_per_token_per_ctx=4 * hidden * layers, vocab_size=0, hidden_size=hidden,
                             extra={"kind": "encoder", "num_layers": layers, "max_length": int(config["max_length"]),
                                    "pooling": config.get("pooling"), "architecture": "bert"})
    try:
        kv_heads = [int(h) for h in config["layer_kv_heads"]]
        head_dim = int(config["head_dim"])
        layers = int(config["num_layers"])
        vocab, hidden = int(config["vocab_size"]), int(config["hidden_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"cannot predict for {file.name}: onnx_config.json lacks {exc}",
                         "re-export the artifact with this edgekit") from None
    heads = table["gqa_heads"] or [int(config.get("num_heads", 0))] * layers
    return ArtifactFacts(**common, kv_bytes_per_token=2 * sum(kv_heads) * head_dim * ONNX_KV_BYTES_PER_VALUE,
                         attn_flops_per_token_per_ctx=2 * sum(heads) * 2 * head_dim, vocab_size=vocab, hidden_size=hidden,
                         extra={"kind": "decoder", "num_layers": layers, "tied_embeddings": table["tied"],
                                "architecture": config.get("architecture", "llama"), "context": int(config["max_position"])})
