"""ONNX exporter for sentence encoders (BERT family): text ids in, normalized sentence embedding out.

``edgekit convert minilm --format onnx`` reaches :func:`export_encoder` through the ONNX exporter,
after the registered storage passes have decided the numbers (BlockQuant / Cast):

1. Trace: ``torch.onnx.export`` (TorchScript exporter, opset 18) of :class:`edgekit.encoder.SentenceEncoder`
   (transformers' BertModel + pooling + L2 normalization) from the *float* weights, with each
   transformer ``nn.Linear`` swapped for ``x @ W^T + b`` on a parameter named ``<hf name>_t`` so each
   matrix becomes one ``MatMul`` whose initializer we can find by name. Graph contract (what
   :mod:`edgekit.runtimes.onnxruntime_encoder` relies on): inputs ``input_ids`` and ``attention_mask``
   int64 [batch, seq]; output ``sentence_embedding`` float32 [batch, hidden].
2. Surgery: 4- and 8-bit BlockQuant matrices become ``com.microsoft::MatMulNBits`` packed from the
   pass's integers and fp16 scales with :func:`edgekit.converters.onnx.pack_nbits` (the decoder
   exporter's packing, so every format carries the same numbers); the word embedding becomes
   ``com.microsoft::GatherBlockQuantized`` over the same packed layout; fp16 tensors are stored fp16
   and Cast to float32 at load.
The pipeline then validates the artifact (:class:`edgekit.kinds.EncoderKind`: embedding cosine against
the float reference, within the storage pass's tolerance).

Files: ``model.onnx`` (``model.onnx.data`` beside it above 1.8 GB), ``tokenizer.json`` (the source's,
unchanged), ``onnx_config.json`` (``format: edgekit-onnx-encoder``, pooling, max_length, dim), and
``manifest.json`` with ``artifact.kind = "encoder"``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.converters.onnx import pack_nbits
from edgekit.encoder import EMBEDDING, EncoderModel
from edgekit.formats import onnx as fmt
from edgekit.model import BlockQuant

OPSET = 18
# accuracy_level 4 computes with int8 activations; 0 keeps them float32. Measured on MiniLM
# (benchmarks/bench_encoder.py, batches of 32, alternating rounds, two runs): level 4 was not faster for
# the large M (= batch x tokens) of an encoder (0.79-0.95x of fp32's texts/s against level 0's
# 0.88-0.93x) and cost cosine (int8 worst sentence 0.9974 vs 0.9992), so encoders keep level 0.
ACCURACY_LEVEL = 0
ENCODER_BITS = (4, 8)
INPUTS = fmt.ENCODER_INPUTS
OUTPUT = fmt.ENCODER_OUTPUT


def param_name(hf_name: str) -> str:
    """The initializer name the traced graph gives a transformer matrix (stored transposed, [in, out])."""
    return "bert." + hf_name + "_t"


def _export_module(model: EncoderModel):
    """SentenceEncoder with each transformer Linear as ``x @ W_t + b`` on a named [in, out] parameter."""
    import torch

    from edgekit.encoder import SentenceEncoder

    class MatMulLinear(torch.nn.Module):
        def __init__(self, lin: torch.nn.Linear):
            super().__init__()
            self.weight_t = torch.nn.Parameter(lin.weight.detach().T.contiguous(), requires_grad=False)
            self.bias = lin.bias

        def forward(self, x):
            return x @ self.weight_t + self.bias

    net = SentenceEncoder(model)
    wanted = set(model.linear_names())
    for name, mod in list(net.bert.named_modules()):
        if isinstance(mod, torch.nn.Linear) and name + ".weight" in wanted:
            parent, _, leaf = name.rpartition(".")
            setattr(net.bert.get_submodule(parent), leaf, MatMulLinear(mod))
    return net.eval()


def export_float_graph(model: EncoderModel, path: Path, opset: int = OPSET) -> None:
    import torch

    net = _export_module(model)
    # a batch of 2 and 7 tokens with one padded position: nothing specialises on batch 1 or no padding
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102], [101, 7592, 2088, 102, 0, 0, 0]], dtype=torch.int64)
    ids = ids.clamp(max=int(model.config["vocab_size"]) - 1)
    mask = (ids != 0).to(torch.int64)
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, OUTPUT: {0: "batch"}}
    with torch.inference_mode():
        torch.onnx.export(net, (ids, mask), str(path), input_names=list(INPUTS), output_names=[OUTPUT],
                          dynamic_axes=dyn, opset_version=opset, dynamo=False, do_constant_folding=True)


class _Surgery:
    """Replace float initializers of the traced graph by what the encodings say (module docstring, step 3)."""

    def __init__(self, proto, accuracy_level: int):
        self.graph = proto.graph
        self.proto = proto
        self.accuracy_level = accuracy_level
        self.inits = {t.name: t for t in self.graph.initializer}
        self.counts: dict[str, int] = {}

    def _set(self, name: str, arr: np.ndarray) -> None:
        from onnx import numpy_helper

        self._drop(name)
        t = numpy_helper.from_array(np.ascontiguousarray(arr), name)
        self.graph.initializer.append(t)
        self.inits[name] = t

    def _drop(self, name: str) -> None:
        if name in self.inits:
            self.graph.initializer.remove(self.inits.pop(name))

    def _only_user(self, op: str, name: str, slot: int):
        users = [n for n in self.graph.node if n.op_type == op and len(n.input) > slot and n.input[slot] == name]
        if len(users) != 1:
            raise RuntimeError(f"expected one {op} reading {name}, found {len(users)}")
        return users[0]

    def _replace(self, old, new_nodes: list) -> None:
        idx = list(self.graph.node).index(old)
        for off, nd in enumerate(new_nodes):
            self.graph.node.insert(idx + off, nd)
        self.graph.node.remove(old)

    def _count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def matrix(self, hf: str, enc, weight: np.ndarray) -> None:
        from onnx import TensorProto, helper

        pname = param_name(hf)
        mm = self._only_user("MatMul", pname, 1)
        if isinstance(enc, BlockQuant):
            b, scales = pack_nbits(enc)
            n, k = enc.shape
            self._set(pname + ".q", b)
            self._set(pname + ".scales", scales)
            node = helper.make_node("MatMulNBits", [mm.input[0], pname + ".q", pname + ".scales"], list(mm.output),
                                    name=mm.name + "_nbits", domain="com.microsoft", K=k, N=n, bits=enc.bits,
                                    block_size=enc.block_size, accuracy_level=self.accuracy_level)
            self._replace(mm, [node])
            self._drop(pname)
            self._count(f"MatMulNBits{enc.bits}")
        elif enc.dtype == "f16":
            self._set(pname + ".f16", weight.T.astype(np.float16))
            self._drop(pname)
            idx = list(self.graph.node).index(mm)
            self.graph.node.insert(idx, helper.make_node("Cast", [pname + ".f16"], [pname], name=pname + "_cast",
                                                         to=TensorProto.FLOAT))
            self._count("F16")
        else:
            self._count("F32")

    def embedding(self, enc, weight: np.ndarray) -> None:
        from onnx import TensorProto, helper

        name = "bert." + EMBEDDING
        gather = self._only_user("Gather", name, 0)
        if isinstance(enc, BlockQuant):
            b, scales = pack_nbits(enc)
            vocab, hidden = enc.shape
            self._set(name + ".q", b.reshape(vocab, hidden * enc.bits // 8))
            self._set(name + ".scales", scales)
            node = helper.make_node("GatherBlockQuantized", [name + ".q", gather.input[1], name + ".scales"],
                                    list(gather.output), name="word_embeddings_q", domain="com.microsoft",
                                    bits=enc.bits, block_size=enc.block_size, gather_axis=0, quantize_axis=1)
            self._replace(gather, [node])
            self._drop(name)
            self._count(f"GatherBlockQuantized{enc.bits}")
        elif enc.dtype == "f16":
            self._set(name + ".f16", weight.astype(np.float16))
            self._drop(name)
            out = gather.output[0]
            gather.input[0], gather.output[0] = name + ".f16", out + ".f16"
            idx = list(self.graph.node).index(gather)
            self.graph.node.insert(idx + 1, helper.make_node("Cast", [out + ".f16"], [out], name="word_embeddings_cast",
                                                             to=TensorProto.FLOAT))
            self._count("F16")
        else:
            self._count("F32")

    def finish(self) -> None:
        from onnx import helper

        used = {i for n in self.graph.node for i in n.input}
        for name in list(self.inits):
            if name not in used:
                self._drop(name)
        if not any(o.domain == "com.microsoft" for o in self.proto.opset_import):
            self.proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def rewrite(proto, model: EncoderModel, accuracy_level: int = ACCURACY_LEVEL) -> dict[str, int]:
    """Pack every encoded tensor of ``model`` into the traced float graph ``proto``; counts per storage type."""
    sg = _Surgery(proto, accuracy_level)
    for hf in model.linear_names():
        if hf != EMBEDDING:
            sg.matrix(hf, model.encoding(hf), model.tensors[hf])
    sg.embedding(model.encoding(EMBEDDING), model.tensors[EMBEDDING])
    sg.finish()
    return sg.counts


def unsupported(model: EncoderModel) -> str | None:
    """Why this graph cannot hold the encoder's encodings, or None."""
    for hf in model.linear_names():
        enc = model.encoding(hf)
        if isinstance(enc, BlockQuant) and enc.bits not in ENCODER_BITS:
            return f"{hf}: {enc.bits}-bit weights have no MatMulNBits packing in the encoder graph (int8 and int4 do)"
    return None


def runtime_config(model: EncoderModel) -> dict[str, Any]:
    return {"inputs": list(INPUTS), "output": OUTPUT, "dim": model.hidden_size, "max_length": model.max_length,
            "pooling": model.pooling, "normalize": model.normalize, "name": model.name}


def export_encoder(model: EncoderModel, out_dir: Path, accuracy_level: int = ACCURACY_LEVEL) -> dict[str, Any]:
    """Write ``model.onnx`` + ``tokenizer.json`` + ``onnx_config.json`` for an :class:`EncoderModel`."""
    import onnx

    out_dir = Path(out_dir)
    tmp = out_dir / ".onnx-trace"
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        export_float_graph(model, tmp / "float.onnx")
        proto = onnx.load(str(tmp / "float.onnx"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    counts = rewrite(proto, model, accuracy_level)
    proto.producer_name = "edgekit"
    proto.doc_string = f"edgekit ONNX sentence encoder: {model.name}"
    files = save_model(proto, out_dir)
    (out_dir / fmt.TOKENIZER_FILE).write_text(model.tokenizer_json, encoding="utf-8")
    fmt.CONFIG.write(out_dir, runtime_config(model), "encoder")
    return {"file": fmt.MODEL_FILE, "kind": "encoder", "files": files + [fmt.TOKENIZER_FILE, fmt.CONFIG_FILE],
            "opset": OPSET, "external_data": len(files) > 1, "tensor_types": counts,
            "accuracy_level": accuracy_level, "inputs": list(INPUTS), "output": OUTPUT}


def save_model(proto, out_dir: Path) -> list[str]:
    """Save inline, or with one external-data file above protobuf's limit; the files written."""
    import onnx

    path = Path(out_dir) / fmt.MODEL_FILE
    if sum(len(t.raw_data) for t in proto.graph.initializer) > fmt.INLINE_LIMIT:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=fmt.EXTERNAL_DATA, size_threshold=1024)
        return [fmt.MODEL_FILE, fmt.EXTERNAL_DATA]
    onnx.save_model(proto, str(path))
    return [fmt.MODEL_FILE]
