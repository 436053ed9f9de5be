"""The decoder of every architecture as an ONNX graph of ONNX Runtime's fused CPU operators, built node by node.

Why the graph is written here rather than traced: ONNX Runtime decodes fast only through a handful of
``com.microsoft`` contrib operators (``GroupQueryAttention`` with its own rotary embedding and in-place
KV-cache update, ``SkipSimplifiedLayerNormalization``, ``MatMulNBits``) that no maintained exporter emits:
torch.onnx and optimum trace ~40 small nodes per layer (rotary, Concat of the cache, Transpose, masks),
which measured 0.68x llama.cpp here, and onnxruntime-genai's builder writes these very nodes by hand
for the same reason. The decoder is about eleven nodes per layer, so writing them out is shorter than
rewriting a traced graph, and every weight goes in straight from edgekit's numbers.

What the architecture switches become (``DecoderSpec``): q/k/v biases an ``Add`` after the (fused)
product; qk-norm a ``SimplifiedLayerNormalization`` per head before GroupQueryAttention (its fused
q/k-norm inputs run on CUDA / WebGPU only); sandwich norms a ``SimplifiedLayerNormalization`` on each
branch before the residual add; GeGLU ``com.microsoft::FastGelu`` (the tanh approximation); the
embedding scale a ``Mul`` after the gather (a tied head is not scaled); sliding layers
GroupQueryAttention's ``local_window_size`` (W keys, the current one included, as transformers) with
their own rotary cache when their rope base differs; partial rotary a narrower cos/sin cache.

Graph contract (what :mod:`edgekit.runtimes.onnxruntime` relies on):

- inputs: ``input_ids`` int64 [1, S]; ``seqlens_k`` int32 [1] = (tokens in the cache after this call) - 1;
  ``total_sequence_length`` int32 scalar = seqlens_k + 1; ``num_logits`` int64 [1]: logits are computed
  for the last ``num_logits`` positions only (1 while generating: the output head is a quarter of the
  weights; S when scoring); ``past_key_{i}`` / ``past_value_{i}`` float32 [1, kv_heads_i, C, head_dim].
- outputs: ``logits`` float32 [1, num_logits, vocab]; ``present_key_{i}`` / ``present_value_{i}``.
- The cache is BNSH. When the runtime binds ``present_*`` to the very buffers it passes as ``past_*``
  (capacity C >= total), GroupQueryAttention writes the new positions in place: no Concat, no copy.
- Positions come from ``seqlens_k`` (GroupQueryAttention derives them), so there is no position input.

Per-layer widths come from the tensors (structured pruning makes them differ from the spec): query
heads = q rows / head_dim, KV heads = k rows / head_dim, MLP width = gate rows. A low-rank pair
``P.lowrank_a`` / ``P.lowrank_b`` becomes two matrix products. Projections sharing an input and an
encoding are fused into one product (q|k|v, gate|up) by concatenating the encoded rows along N: the
numbers stay edgekit's, and :data:`FUSED_KEY` metadata says which rows belong to which tensor.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from edgekit.architectures import layout as L
from edgekit.architectures.spec import rope_tables
from edgekit.model import BlockQuant, Cast, Model

MS = "com.microsoft"
OPSET = 21
ACCURACY_LEVEL = 4  # int8 activations: the fast CPU kernels (level 0 is slower than fp32 at M=1)
NBITS = (2, 4, 8)  # widths MatMulNBits runs on the CPU provider (3, 5, 6, 7 fail at session creation)
FUSED_KEY = "edgekit.matrices"  # model metadata: weight initializer -> [[tensor name, rows], ...]


# ---------------------------------------------------------------------- packing


def pack_nbits(bq: BlockQuant) -> tuple[np.ndarray, np.ndarray]:
    """(B uint8 [N, k_blocks, block_size*bits/8], scales float32 [N, k_blocks]) for MatMulNBits.

    ``bq`` is ``[out, in]`` = [N, K]; block (n, kb) holds W^T[kb*bs:(kb+1)*bs, n] = q[n, kb*bs:...], which
    is exactly BlockQuant's row-major block, so no transpose is needed. Values are stored unsigned
    (q + 2^(bits-1), MatMulNBits' implicit zero point) and packed least-significant bits first along K:
    for 4 bits element 2j is the low nibble of byte j; for 2 bits element 4j+t sits at bits 2t..2t+1.
    """
    if bq.bits not in NBITS:
        raise ValueError(f"MatMulNBits packing is implemented for {NBITS} bits, not {bq.bits}")
    n, k = bq.shape
    kb = k // bq.block_size
    per = 8 // bq.bits
    u = (bq.q.astype(np.int16) + (1 << (bq.bits - 1))).astype(np.uint8).reshape(n, kb, bq.block_size // per, per)
    b = np.zeros(u.shape[:-1], np.uint8)
    for t in range(per):
        b |= u[..., t] << np.uint8(bq.bits * t)
    scales = bq.scales.astype(np.float16).astype(np.float32).reshape(n, kb)
    return np.ascontiguousarray(b), np.ascontiguousarray(scales)


def unpack_nbits(b: np.ndarray, scales: np.ndarray, bits: int, block_size: int, k: int) -> np.ndarray:
    """Dequantize MatMulNBits initializers back to W [N, K] = (q - 2^(bits-1)) * scale (tests and checks)."""
    n = b.shape[0]
    kb = k // block_size
    per = 8 // bits
    b = b.reshape(n, kb, block_size // per)
    mask = np.uint8((1 << bits) - 1)
    u = np.stack([(b >> np.uint8(bits * t)) & mask for t in range(per)], axis=-1).reshape(n, kb, block_size)
    q = u.astype(np.float32) - float(1 << (bits - 1))
    return (q * scales.reshape(n, kb, 1).astype(np.float32)).reshape(n, k)


def nbits_ok(enc: Any) -> bool:
    """True when MatMulNBits can hold ``enc`` as is (a width it runs, a power-of-two block >= 16)."""
    if not isinstance(enc, BlockQuant):
        return False
    bs = enc.block_size
    return enc.bits in NBITS and bs >= 16 and (bs & (bs - 1)) == 0


def gather_ok(enc: Any) -> bool:
    """GatherBlockQuantized (the embedding) reads 4- and 8-bit blocks."""
    return nbits_ok(enc) and enc.bits in (4, 8)


# ---------------------------------------------------------------------- model structure


def factors(model: Model, base: str) -> list[str]:
    """The matrices that make up the linear ``base`` (``...q_proj``), applied in order."""
    lowrank = getattr(model, "lowrank_factors", None)
    pair = lowrank(base) if lowrank else None
    if pair is None and base + ".lowrank_a.weight" in model.tensors:
        pair = (base + ".lowrank_a.weight", base + ".lowrank_b.weight")
    if pair is not None:
        return list(pair)
    if base + ".weight" not in model.tensors:
        raise KeyError(f"{base}.weight is missing (and no low-rank factors)")
    return [base + ".weight"]


def out_features(model: Model, base: str) -> int:
    return int(model.tensors[factors(model, base)[-1]].shape[0])


def layer_shapes(model: Model) -> list[dict[str, int]]:
    """Heads, KV heads and MLP width of every layer, read from the tensors (see the module docstring)."""
    s = model.spec
    out = []
    for i in range(s.num_layers):
        q, k = out_features(model, L.linear(i, L.Q)), out_features(model, L.linear(i, L.K))
        heads, kv = q // s.head_dim, k // s.head_dim
        if q % s.head_dim or k % s.head_dim or kv == 0 or heads % kv:
            raise ValueError(f"layer {i}: {q} query and {k} key rows do not make whole heads of {s.head_dim} "
                             f"with a query head count divisible by the KV head count")
        out.append({"heads": heads, "kv_heads": kv, "intermediate": out_features(model, L.linear(i, L.GATE))})
    return out


def matrices(model: Model) -> list[str]:
    """Every 2-D tensor the graph multiplies by (factors included), in a stable order."""
    return [n for n in model.tensors if model.tensors[n].ndim == 2]


# ---------------------------------------------------------------------- graph building


class _Graph:
    def __init__(self) -> None:
        self.nodes: list = []
        self.inits: dict[str, Any] = {}
        self.n = 0

    def init(self, name: str, arr: np.ndarray) -> str:
        from onnx import numpy_helper

        if name not in self.inits:
            self.inits[name] = numpy_helper.from_array(np.ascontiguousarray(arr), name)
        return name

    def op(self, op: str, inputs: list[str], outputs: list[str] | int = 1, domain: str = "", **attrs) -> Any:
        from onnx import helper

        self.n += 1
        name = f"{op}_{self.n}"
        outs = [f"{name}/{j}" for j in range(outputs)] if isinstance(outputs, int) else list(outputs)
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs[0] if len(outs) == 1 else outs


def _kind(model: Model, name: str) -> tuple:
    enc = model.encoding(name)
    if nbits_ok(enc):
        return ("nbits", enc.bits, enc.block_size)
    if isinstance(enc, Cast) and enc.dtype == "f16":
        return ("f16",)
    return ("f32",)  # float32, or a BlockQuant MatMulNBits cannot hold: its exact values as float32


class DecoderBuilder:
    """Builds the decoder graph of ``model`` (see the module docstring); :meth:`build` returns the proto."""

    def __init__(self, model: Model, accuracy_level: int = ACCURACY_LEVEL):
        self.model = model
        self.accuracy_level = accuracy_level
        self.g = _Graph()
        self.layout: dict[str, list[list[Any]]] = {}  # weight initializer -> [[tensor, rows], ...]
        self.counts: dict[str, int] = {}
        self._packed: dict[str, tuple[str, str]] = {}

    def _count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def packed(self, name: str) -> tuple[str, str]:
        """Initializers (B, scales) of one encoded tensor, shared by whoever reads it."""
        if name not in self._packed:
            b, s = pack_nbits(self.model.encoding(name))
            key = name.removesuffix(".weight")
            self._packed[name] = (self.g.init(key + ".B", b), self.g.init(key + ".scales", s))
            self.layout[key + ".B"] = [[name, int(b.shape[0])]]
        return self._packed[name]

    def matmul(self, x: str, names: list[str], tag: str) -> str:
        """x @ [W_1; W_2; ...]^T for tensors of one kind: one MatMulNBits or one MatMul."""
        m, g = self.model, self.g
        kind = _kind(m, names[0])
        rows = [[n, int(m.tensors[n].shape[0])] for n in names]
        if kind[0] == "nbits":
            _, bits, bs = kind
            if len(names) == 1:
                b, s = self.packed(names[0])
            else:
                parts = [pack_nbits(m.encoding(n)) for n in names]
                b = g.init(tag + ".B", np.concatenate([p[0] for p in parts]))
                s = g.init(tag + ".scales", np.concatenate([p[1] for p in parts]))
                self.layout[b] = rows
            n_out = sum(r[1] for r in rows)
            self._count(f"MatMulNBits{bits}", len(names))
            return g.op("MatMulNBits", [x, b, s], domain=MS, K=int(m.tensors[names[0]].shape[1]), N=n_out,
                        bits=bits, block_size=bs, accuracy_level=self.accuracy_level)
        w = np.concatenate([m.effective_weight(n) for n in names]).T  # [K, N]
        if kind[0] == "f16":
            wname = g.init(tag + ".f16", w.astype(np.float16))
            self._count("F16", len(names))
            wname_f = g.op("Cast", [wname], to=1)  # ORT folds it at load: the file holds fp16 values
        else:
            wname = wname_f = g.init(tag, w.astype(np.float32))
            self._count("F32", len(names))
        self.layout[wname] = rows
        return g.op("MatMul", [x, wname_f])

    def project(self, x: str, bases: list[str], tag: str) -> tuple[str | None, list[str]]:
        """Linears ``bases`` on one input: (fused output, []) when they fuse, else (None, one output each).
        Biases (all or none of a fused group) are added after the product."""
        m = self.model
        chains = [factors(m, b) for b in bases]
        singles = [c[0] for c in chains if len(c) == 1]
        biases = [b + ".bias" for b in bases if b + ".bias" in m.tensors]
        if (len(bases) > 1 and len(singles) == len(bases) and len({_kind(m, n) for n in singles}) == 1
                and len(biases) in (0, len(bases))):
            y = self.matmul(x, singles, tag)
            if biases:
                y = self.g.op("Add", [y, self.g.init(tag + ".bias", np.concatenate([m.tensors[b] for b in biases]))])
            return y, []
        outs = []
        for base, chain in zip(bases, chains):
            y = x
            for name in chain:
                y = self.matmul(y, [name], name.removesuffix(".weight"))
            if base + ".bias" in m.tensors:
                y = self.g.op("Add", [y, self.g.init(base + ".bias", m.tensors[base + ".bias"])])
            outs.append(y)
        return None, outs

    def embedding(self) -> str:
        m, g = self.model, self.g
        name = L.EMBED
        enc = m.encoding(name)
        vocab, hidden = m.tensors[name].shape
        if gather_ok(enc):
            b, s = self.packed(name)  # tied: the very bytes the output head's MatMulNBits reads
            shape = g.init("embed.rows_shape", np.array([vocab, hidden * enc.bits // 8], dtype=np.int64))
            rows = g.op("Reshape", [b, shape])
            self._count(f"GatherBlockQuantized{enc.bits}")
            x = g.op("GatherBlockQuantized", [rows, "input_ids", s], domain=MS, bits=enc.bits,
                     block_size=enc.block_size, gather_axis=0, quantize_axis=1)
        elif isinstance(enc, Cast) and enc.dtype == "f16":
            t = g.init("embed.f16", m.tensors[name].astype(np.float16))
            self.layout[t] = [[name, int(vocab)]]
            x = g.op("Cast", [g.op("Gather", [t, "input_ids"])], to=1)
        else:
            g.init("embed", m.effective_weight(name))
            self.layout["embed"] = [[name, int(vocab)]]
            x = g.op("Gather", ["embed", "input_ids"])
        if m.spec.embed_scale != 1.0:  # Gemma: the input embedding times sqrt(hidden), in float32
            x = g.op("Mul", [x, g.init("embed.scale", np.array(m.spec.embed_scale, dtype=np.float32))])
        return x

    def head(self, x: str) -> str:
        m, g, s = self.model, self.g, self.model.spec
        name = s.output_head_name()
        if s.tie_word_embeddings and not nbits_ok(m.encoding(name)):
            # a float tied head multiplies by the embedding's own initializer, transposed at load
            if "embed.f16" in g.inits:
                w = g.op("Cast", [g.op("Transpose", ["embed.f16"], perm=[1, 0])], to=1)
            else:
                w = g.op("Transpose", ["embed"], perm=[1, 0])
            return g.op("MatMul", [x, w], outputs=["logits"])
        self.matmul(x, [name], "head")
        self.g.nodes[-1].output[0] = "logits"
        return "logits"

    def build(self):
        from onnx import TensorProto, helper

        m, g, s = self.model, self.g, self.model.spec
        shapes = layer_shapes(m)
        hd, eps = s.head_dim, float(s.rms_norm_eps)
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "sequence"]),
                  helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
                  helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
                  helper.make_tensor_value_info("num_logits", TensorProto.INT64, [1])]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "num_logits", s.vocab_size])]
        caches = {}
        for kind in sorted({s.rope_kind(i) for i in range(s.num_layers)}):
            cos, sin = rope_tables(s, s.max_position, kind)
            caches[kind] = (g.init(f"rope.{kind}.cos", cos), g.init(f"rope.{kind}.sin", sin))

        res = self.embedding()
        pending = None  # the branch output still to be added to the residual stream
        for i, shp in enumerate(shapes):
            p = L.prefix(i)
            gamma = self.norm_weight(p + L.ATTN_NORM)
            if pending is None:
                h = g.op("SimplifiedLayerNormalization", [res, gamma], axis=-1, epsilon=eps, stash_type=1)
            else:
                h, res = self._skip_norm(pending, res, gamma, eps)
            fused, qkv = self.project(h, [L.linear(i, r) for r in (L.Q, L.K, L.V)], p + "attn.qkv")
            if s.qk_norm:  # per-head norms need q and k apart
                if fused:
                    widths = g.init(p + "attn.split", np.array([shp["heads"] * hd] + [shp["kv_heads"] * hd] * 2, dtype=np.int64))
                    qkv, fused = g.op("Split", [fused, widths], outputs=3, axis=-1), None
                qkv = [self._head_norm(qkv[0], p + L.Q_NORM, eps), self._head_norm(qkv[1], p + L.K_NORM, eps), qkv[2]]
            past = [f"past_key_{i}", f"past_value_{i}"]
            present = [f"present_key_{i}", f"present_value_{i}"]
            for n in past:
                inputs.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, shp["kv_heads"], "past", hd]))
            for n in present:
                outputs.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, shp["kv_heads"], "total", hd]))
            attn_in = [fused, "", ""] if fused else list(qkv)
            cos, sin = caches[s.rope_kind(i)]
            window = s.window(i)
            attn = g.op("GroupQueryAttention", attn_in + past + ["seqlens_k", "total_sequence_length", cos, sin],
                        outputs=[f"{p}attn"] + present, domain=MS, num_heads=shp["heads"],
                        kv_num_heads=shp["kv_heads"], do_rotary=1, rotary_interleaved=0, scale=s.softmax_scale,
                        local_window_size=int(window) if window else -1)[0]
            _, (o,) = self.project(attn, [L.linear(i, L.O)], p + "attn.o")
            if s.sandwich_norms:
                o = g.op("SimplifiedLayerNormalization", [o, self.norm_weight(p + L.POST_ATTN_NORM)], axis=-1,
                         epsilon=eps, stash_type=1)
            h, res = self._skip_norm(o, res, self.norm_weight(p + L.MLP_NORM), eps)
            fused, gu = self.project(h, [L.linear(i, L.GATE), L.linear(i, L.UP)], p + "mlp.gate_up")
            if fused:
                width = g.init(p + "mlp.split", np.array([shp["intermediate"]] * 2, dtype=np.int64))
                gu = g.op("Split", [fused, width], outputs=2, axis=-1)
            gate, up = gu
            if s.activation == "gelu_tanh":
                act = g.op("Mul", [g.op("FastGelu", [gate], domain=MS), up])  # GeGLU, tanh approximation
            else:
                act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])  # SiLU(gate) * up
            _, (pending,) = self.project(act, [L.linear(i, L.DOWN)], p + "mlp.down")
            if s.sandwich_norms:
                pending = g.op("SimplifiedLayerNormalization", [pending, self.norm_weight(p + L.POST_MLP_NORM)],
                               axis=-1, epsilon=eps, stash_type=1)
        gamma = self.norm_weight(L.FINAL_NORM)
        if pending is None:
            h = g.op("SimplifiedLayerNormalization", [res, gamma], axis=-1, epsilon=eps, stash_type=1)
        else:
            h, _ = self._skip_norm(pending, res, gamma, eps)
        start = g.op("Neg", ["num_logits"])
        end = g.init("last.end", np.array([np.iinfo(np.int64).max], dtype=np.int64))
        axis = g.init("last.axis", np.array([1], dtype=np.int64))
        self.head(g.op("Slice", [h, start, end, axis]))

        graph = helper.make_graph(g.nodes, f"edgekit-{s.arch}-decoder", inputs, outputs, initializer=list(g.inits.values()))
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                                  producer_name="edgekit")
        proto.ir_version = 10  # what onnxruntime 1.32 reads (onnx 1.23 would write 12)
        helper.set_model_props(proto, {FUSED_KEY: json.dumps(self.layout)})
        return proto, shapes

    def norm_weight(self, name: str) -> str:
        return self.g.init(name, self.model.tensors[name].astype(np.float32))

    def _head_norm(self, x: str, name: str, eps: float) -> str:
        """RMSNorm over head_dim of every head of ``x`` [B, S, heads * head_dim]."""
        g, hd = self.g, self.model.spec.head_dim
        split = g.init("shape.heads", np.array([0, 0, -1, hd], dtype=np.int64))
        merge = g.init("shape.merged", np.array([0, 0, -1], dtype=np.int64))
        y = g.op("SimplifiedLayerNormalization", [g.op("Reshape", [x, split]), self.norm_weight(name)], axis=-1,
                 epsilon=eps, stash_type=1)
        return g.op("Reshape", [y, merge])

    def _skip_norm(self, x: str, skip: str, gamma: str, eps: float) -> tuple[str, str]:
        """(RMSNorm(x + skip) * gamma, x + skip) in one node."""
        self.g.n += 1
        h, total = f"skipnorm_{self.g.n}/norm", f"skipnorm_{self.g.n}/sum"
        self.g.op("SkipSimplifiedLayerNormalization", [x, skip, gamma], outputs=[h, "", "", total], domain=MS,
                  epsilon=eps)
        return h, total


def read_matrices(proto) -> dict[str, np.ndarray]:
    """Every weight matrix of an exported decoder as the runtime computes with it, [out, in] per tensor name.

    Fused products are sliced back into their tensors using the :data:`FUSED_KEY` metadata; MatMulNBits
    weights are dequantized from their packed bytes. Used by tests to compare with other formats.
    """
    from onnx import helper, numpy_helper

    layout = json.loads(next(p.value for p in proto.metadata_props if p.key == FUSED_KEY))
    inits = {t.name: t for t in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    full: dict[str, np.ndarray] = {}
    for node in proto.graph.node:
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        if node.op_type == "MatMulNBits" and node.input[1] in layout:
            b, s = (numpy_helper.to_array(inits[n]) for n in node.input[1:3])
            full[node.input[1]] = unpack_nbits(b, s, a["bits"], a["block_size"], a["K"])
        elif node.op_type == "GatherBlockQuantized":  # reads B through a Reshape to [vocab, bytes per row]
            bname = producer[node.input[0]].input[0]
            b, s = numpy_helper.to_array(inits[bname]), numpy_helper.to_array(inits[node.input[2]])
            k = s.size // b.shape[0] * a["block_size"]
            full.setdefault(bname, unpack_nbits(b, s, a["bits"], a["block_size"], k))
    for name in layout:
        if name not in full and name in inits:
            w = numpy_helper.to_array(inits[name]).astype(np.float32)
            full[name] = w if name.startswith("embed") else w.T  # the embedding is [vocab, hidden]
    out = {}
    for name, rows in layout.items():
        start = 0
        for tensor, n in rows:
            out[tensor] = full[name][start : start + n]
            start += n
    return out
