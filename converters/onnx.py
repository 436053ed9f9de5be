"""ONNX exporter: a Llama decoder with an explicit KV cache, carrying the numbers the passes decided.

Two steps:

1. ``torch.onnx.export`` (TorchScript exporter, opset 18) traces the float decoder of
   :mod:`edgekit.converters.onnx_torch` from edgekit's float32 weights. Graph contract (what
   :mod:`edgekit.runtimes.onnxruntime` relies on): inputs ``input_ids`` / ``position_ids`` int64
   [1, S] and ``past_key_{i}`` / ``past_value_{i}`` float32 [1, n_kv_heads, P, head_dim] (P may be 0);
   outputs ``logits`` float32 [1, S, vocab] and ``present_key_{i}`` / ``present_value_{i}``
   [1, n_kv_heads, P+S, head_dim].
2. Graph surgery with ``onnx`` packs each tensor as its encoding says:

   - ``BlockQuant`` (4 or 8 bits, q/k/v/o/gate/up/down and the output head): the MatMul becomes
     ``com.microsoft::MatMulNBits`` packed from the pass's own integers and fp16 scales (B uint8
     [N, k_blocks, block_size*bits/8], least-significant bits first along K, implicit zero point
     2^(bits-1), scales float32 holding the fp16 values exactly, accuracy_level 4). The embedding, when
     it has a BlockQuant encoding (the tied head of q4_0/int4 is Q8_0), becomes
     ``com.microsoft::GatherBlockQuantized`` reading the *same* packed bytes and scales as the head's
     MatMulNBits (a Reshape views B as [vocab, hidden*bits/8]): one copy in the file, and the rows it
     gathers are exactly the dequantized encoding, as llama.cpp's get_rows computes them.
   - ``Cast("f16")``: stored as float16 initializers followed by a ``Cast`` to float32. The values
     equal ``Model.effective_weight`` (fp16 -> fp32 is exact), so the numbers equal the GGUF F16
     file's, and the file is half the size of fp32 values rounded through fp16. (ORT folds the Cast at
     load, so memory at run time is that of fp32 either way.)
   - float32: kept. A tied float head is a ``Transpose`` of the embedding (no second copy in the file).

The model is written inline (``model.onnx``) below 1.8 GB and with ONNX external data
(``model.onnx.data``) above. ``tokenizer.json`` (rebuilt from the GGUF vocabulary, tokenizes like
llama.cpp) and ``onnx_config.json`` (shapes, special ids, chat template) sit next to it, so the runtime
needs neither torch nor transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.model import BlockQuant, Cast, Model

OPSET = 18
ACCURACY_LEVEL = 4  # int8 activations: the fast CPU kernels (level 0 is slower than fp32 at M=1)
INLINE_LIMIT = 1_800_000_000  # protobuf cannot hold 2 GB; leave room for the graph itself
CONFIG_FILE = "onnx_config.json"
TOKENIZER_FILE = "tokenizer.json"


def pack_nbits(bq: BlockQuant) -> tuple[np.ndarray, np.ndarray]:
    """(B uint8 [N, k_blocks, block_size*bits/8], scales float32 [N, k_blocks]) for MatMulNBits.

    ``bq`` is ``[out, in]`` = [N, K]; block (n, kb) holds W^T[kb*bs:(kb+1)*bs, n] = q[n, kb*bs:...], which
    is exactly BlockQuant's row-major block, so no transpose is needed. Values are stored unsigned
    (q + 2^(bits-1)); for 4 bits element 2j is the low nibble and 2j+1 the high nibble of byte j.
    """
    if bq.bits not in (4, 8):
        raise ValueError(f"MatMulNBits packing is implemented for 4 and 8 bits, not {bq.bits}")
    n, k = bq.shape
    kb = k // bq.block_size
    u = (bq.q.astype(np.int16) + (1 << (bq.bits - 1))).astype(np.uint8).reshape(n, kb, bq.block_size)
    if bq.bits == 4:
        u = u[..., 0::2] | (u[..., 1::2] << 4)
    scales = bq.scales.astype(np.float16).astype(np.float32).reshape(n, kb)
    return np.ascontiguousarray(u), np.ascontiguousarray(scales)


def unpack_nbits(b: np.ndarray, scales: np.ndarray, bits: int, block_size: int, k: int) -> np.ndarray:
    """Dequantize MatMulNBits initializers back to W [N, K] = (q - 2^(bits-1)) * scale (for tests and checks)."""
    n = b.shape[0]
    kb = k // block_size
    b = b.reshape(n, kb, -1)
    if bits == 4:
        u = np.empty((n, kb, block_size), np.uint8)
        u[..., 0::2] = b & 0x0F
        u[..., 1::2] = b >> 4
    else:
        u = b
    q = u.astype(np.float32) - float(1 << (bits - 1))
    return (q * scales.reshape(n, kb, 1).astype(np.float32)).reshape(n, k)


def _nbits_ok(enc: BlockQuant) -> bool:
    bs = enc.block_size
    return enc.bits in (4, 8) and bs >= 16 and (bs & (bs - 1)) == 0


def _meta(tok: dict[str, Any], key: str, default: Any = None) -> Any:
    kv = tok.get(key)
    return kv["value"] if kv else default


def runtime_config(model: Model) -> dict[str, Any]:
    s = model.spec
    tok = model.tokenizer
    tokens = _meta(tok, "tokenizer.ggml.tokens", [])
    types = _meta(tok, "tokenizer.ggml.token_type", [])
    bos, eos = _meta(tok, "tokenizer.ggml.bos_token_id"), _meta(tok, "tokenizer.ggml.eos_token_id")
    return {
        "format": "edgekit-onnx-decoder", "version": 1,
        "num_layers": s.num_layers, "n_kv_heads": s.num_kv_heads, "head_dim": s.head_dim,
        "vocab_size": s.vocab_size, "hidden_size": s.hidden_size, "max_position": s.max_position,
        "bos_token_id": bos, "eos_token_id": eos,
        "bos_token": tokens[bos] if bos is not None and bos < len(tokens) else "",
        "eos_token": tokens[eos] if eos is not None and eos < len(tokens) else "",
        # llama.cpp renders control tokens as nothing when detokenizing; the runtime does the same
        "control_token_ids": [i for i, t in enumerate(types) if t == 3],
        "chat_template": _meta(tok, "tokenizer.chat_template"),
        "inputs": ["input_ids", "position_ids"] + [f"past_{kv}_{i}" for i in range(s.num_layers) for kv in ("key", "value")],
        "outputs": ["logits"] + [f"present_{kv}_{i}" for i in range(s.num_layers) for kv in ("key", "value")],
    }


class _Surgery:
    """Rewrites the traced float graph in place (see the module docstring)."""

    def __init__(self, proto):
        self.proto = proto
        self.graph = proto.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.counts: dict[str, int] = {}

    def _count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def _set_init(self, name: str, arr: np.ndarray) -> None:
        from onnx import numpy_helper

        t = numpy_helper.from_array(np.ascontiguousarray(arr), name)
        if name in self.inits:
            self.graph.initializer.remove(self.inits[name])
        self.graph.initializer.append(t)
        self.inits[name] = t

    def _drop_init(self, name: str) -> None:
        if name in self.inits:
            self.graph.initializer.remove(self.inits.pop(name))

    def _consumers(self, op: str, name: str, slot: int) -> list:
        return [n for n in self.graph.node if n.op_type == op and len(n.input) > slot and n.input[slot] == name]

    def _insert_before(self, anchor, nodes: list) -> None:
        idx = list(self.graph.node).index(anchor)
        for off, nd in enumerate(nodes):
            self.graph.node.insert(idx + off, nd)

    def matmul_nbits(self, pname: str, enc: BlockQuant) -> tuple[str, str]:
        from onnx import helper

        nodes = self._consumers("MatMul", pname, 1)
        if len(nodes) != 1:
            raise RuntimeError(f"expected one MatMul reading {pname}, found {len(nodes)}")
        mm = nodes[0]
        b, scales = pack_nbits(enc)
        n, k = enc.shape
        bname, sname = pname + ".MatMulNBits.B", pname + ".MatMulNBits.scales"
        self._set_init(bname, b)
        self._set_init(sname, scales)
        new = helper.make_node("MatMulNBits", [mm.input[0], bname, sname], list(mm.output), name=mm.name + "_nbits",
                               domain="com.microsoft", K=k, N=n, bits=enc.bits, block_size=enc.block_size,
                               accuracy_level=ACCURACY_LEVEL)
        self._insert_before(mm, [new])
        self.graph.node.remove(mm)
        self._drop_init(pname)
        self._count(f"MatMulNBits{enc.bits}")
        return bname, sname

    def cast_f16(self, pname: str, arr: np.ndarray) -> None:
        """MatMul reads fp16 values through a Cast (``arr`` is [K, N], already float)."""
        from onnx import TensorProto, helper

        users = self._consumers("MatMul", pname, 1)
        self._set_init(pname + ".f16", arr.astype(np.float16))
        self._drop_init(pname)
        self._insert_before(users[0], [helper.make_node("Cast", [pname + ".f16"], [pname], name=pname + "_cast",
                                                        to=TensorProto.FLOAT)])

    def tied_float_head(self, embed_src: str) -> None:
        from onnx import helper

        users = self._consumers("MatMul", "lm_head", 1)
        self._drop_init("lm_head")
        self._insert_before(users[0], [helper.make_node("Transpose", [embed_src], ["lm_head"], name="lm_head_tied",
                                                        perm=[1, 0])])

    def embedding(self, model: Model, shared: tuple[str, str] | None) -> None:
        from onnx import TensorProto, helper

        gathers = self._consumers("Gather", "embed", 0)
        if len(gathers) != 1:
            raise RuntimeError(f"expected one Gather of the embedding, found {len(gathers)}")
        gather = gathers[0]
        name = "model.embed_tokens.weight"
        enc = model.encoding(name)
        vocab, hidden = model.tensors[name].shape
        if isinstance(enc, BlockQuant) and _nbits_ok(enc):
            if shared is None:  # untied: its own packed copy
                b, scales = pack_nbits(enc)
                shared = ("embed.q", "embed.scales")
                self._set_init(shared[0], b)
                self._set_init(shared[1], scales)
            shape_name = "embed.q_shape"
            self._set_init(shape_name, np.array([vocab, hidden * enc.bits // 8], dtype=np.int64))
            flat = "embed.q_rows"
            nodes = [
                helper.make_node("Reshape", [shared[0], shape_name], [flat], name="embed_q_view"),
                helper.make_node("GatherBlockQuantized", [flat, gather.input[1], shared[1]], list(gather.output),
                                 name="embed_gather_q", domain="com.microsoft", bits=enc.bits,
                                 block_size=enc.block_size, gather_axis=0, quantize_axis=1),
            ]
            self._insert_before(gather, nodes)
            self.graph.node.remove(gather)
            self._drop_init("embed")
            self._count(f"GatherBlockQuantized{enc.bits}")
        elif isinstance(enc, BlockQuant):  # a layout MatMulNBits cannot take: dequantized float32
            self._set_init("embed", enc.dequantize())
        elif isinstance(enc, Cast) and enc.dtype == "f16":
            self._set_init("embed.f16", model.tensors[name].astype(np.float16))
            self._drop_init("embed")
            out = gather.output[0]
            gather.input[0] = "embed.f16"
            gather.output[0] = out + ".f16"
            idx = list(self.graph.node).index(gather)
            self.graph.node.insert(idx + 1, helper.make_node("Cast", [out + ".f16"], [out], name="embed_cast",
                                                             to=TensorProto.FLOAT))

    def finish(self) -> None:
        from onnx import helper

        used = {i for n in self.graph.node for i in n.input}
        for name in list(self.inits):
            if name not in used:
                self._drop_init(name)
        if not any(o.domain == "com.microsoft" for o in self.proto.opset_import):
            self.proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def rewrite(proto, model: Model) -> dict[str, int]:
    """Pack every tensor of ``model`` into the traced float graph ``proto`` as its encoding says."""
    from edgekit.converters.onnx_torch import param_name

    s = model.spec
    sg = _Surgery(proto)
    head = s.output_head_name()
    shared = None
    for hf in model.linear_names():
        if hf == "model.embed_tokens.weight" and not s.tie_word_embeddings:
            continue  # the embedding proper is handled with the Gather below
        pname = "lm_head" if hf == head else param_name(hf)
        enc = model.encoding(hf)
        if isinstance(enc, BlockQuant) and _nbits_ok(enc):
            names = sg.matmul_nbits(pname, enc)
            if hf == head and s.tie_word_embeddings:
                shared = names
        elif isinstance(enc, BlockQuant):
            sg._set_init(pname, enc.dequantize().T)  # not a MatMulNBits layout: its exact values as fp32
        elif hf == head and s.tie_word_embeddings:
            pass  # tied float head: a Transpose of whatever the embedding becomes (below)
        elif isinstance(enc, Cast) and enc.dtype == "f16":
            sg.cast_f16(pname, model.tensors[hf].T)
    sg.embedding(model, shared)
    if s.tie_word_embeddings and shared is None:
        enc = model.encoding(head)
        if isinstance(enc, BlockQuant):
            pass  # handled above as dequantized fp32 [K, N]
        elif isinstance(enc, Cast) and enc.dtype == "f16":
            from onnx import TensorProto, helper

            users = sg._consumers("MatMul", "lm_head", 1)
            sg._drop_init("lm_head")
            sg._insert_before(users[0], [
                helper.make_node("Transpose", ["embed.f16"], ["lm_head.f16"], name="lm_head_tied", perm=[1, 0]),
                helper.make_node("Cast", ["lm_head.f16"], ["lm_head"], name="lm_head_cast", to=TensorProto.FLOAT),
            ])
        else:
            sg.tied_float_head("embed")
    sg.finish()
    floats = {1: "F32", 10: "F16"}
    for t in sg.graph.initializer:
        packed = t.name.endswith((".MatMulNBits.scales", "embed.scales"))  # scales belong to the packed tensor
        if t.data_type in floats and not packed and len(t.dims) >= 1 and int(np.prod(t.dims)) > 1:
            sg._count(floats[t.data_type])
    return sg.counts


class ONNXExporter:
    """Writes ``model.onnx`` (+ ``tokenizer.json``, ``onnx_config.json``) for ONNX Runtime."""

    name = "onnx"
    filename = "model.onnx"
    runtime = "onnxruntime"

    def supports(self, model: Model) -> str | None:
        """None when this exporter can pack ``model``, otherwise the reason it cannot."""
        if model.spec.arch != "llama":
            return f"architecture {model.spec.arch} has no ONNX decoder here"
        for n in model.tensors:
            enc = model.encoding(n)
            if isinstance(enc, BlockQuant) and enc.bits not in (4, 8):
                # other widths would need a kernel ORT's CPU provider has (2 bits runs too; not wired yet)
                return f"{n}: {enc.bits}-bit weights have no MatMulNBits packing here (4 and 8 bits do)"
        return None

    def export(self, model: Model, out_dir: Path) -> dict[str, Any]:
        import onnx

        from edgekit.converters.onnx_torch import export_float_graph
        from edgekit.tokenizer_convert import gguf_to_hf_tokenizer

        out_dir = Path(out_dir)
        tmp = out_dir / ".onnx-trace"
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            export_float_graph(model, tmp / "float.onnx", opset=OPSET)
            proto = onnx.load(str(tmp / "float.onnx"))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        counts = rewrite(proto, model)
        proto.producer_name = "edgekit"
        proto.doc_string = f"edgekit ONNX export of {model.name}"
        path = out_dir / self.filename
        weight_bytes = sum(len(t.raw_data) for t in proto.graph.initializer)
        files = [self.filename]
        if weight_bytes > INLINE_LIMIT:
            onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=self.filename + ".data", size_threshold=1024)
            files.append(self.filename + ".data")
        else:
            onnx.save_model(proto, str(path))
        gguf_to_hf_tokenizer(model.tokenizer).save(str(out_dir / TOKENIZER_FILE))
        (out_dir / CONFIG_FILE).write_text(json.dumps(runtime_config(model), indent=1))
        return {"file": self.filename, "files": files + [TOKENIZER_FILE, CONFIG_FILE], "opset": OPSET,
                "external_data": len(files) > 1, "tensor_types": counts, "accuracy_level": ACCURACY_LEVEL}
