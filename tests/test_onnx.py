"""ONNX exporter + ONNX Runtime session: float logits, KV cache, exact packing of the passes' numbers,
end-to-end convert with validation, failures that leave nothing behind, and a torch-free load path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import edgekit
from edgekit.converters.gguf import GGUFExporter
from edgekit.converters.gguf_layout import gguf_names, open_reader, qk_heads, unpermute_qk
from edgekit.converters.onnx import ONNXExporter, pack_nbits, unpack_nbits
from edgekit.converters.onnx_torch import param_name
from edgekit.errors import InputError, ValidationError
from edgekit.model import BlockQuant
from edgekit.passes import PassContext
from edgekit.passes.int4 import Int4Pass
from edgekit.passes.rtn import Q4_0Pass
from edgekit.runtimes.onnxruntime import OnnxRuntimeSession
from tests.conftest import tiny_model

PROMPT = "The capital of France is Paris, and the capital of Italy is Rome. Numbers: 12345."


def export(model, d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    ONNXExporter().export(model, d)
    return d / "model.onnx"


@pytest.fixture(scope="module")
def f32_onnx(tmp_path_factory) -> Path:
    return export(tiny_model(), tmp_path_factory.mktemp("f32"))


def quantized(pass_cls, **ctx):
    m = tiny_model()
    pass_cls().apply(m, PassContext(**ctx))
    return m


# ---------------------------------------------------------------- (a) float logits and the KV cache

def test_f32_logits_match_torch_reference(f32_onnx):
    from edgekit.reference import TorchReference

    with OnnxRuntimeSession(f32_onnx, n_threads=2) as s:
        ids = s.tokenize(PROMPT)
        got = s.logits(ids)
    want = TorchReference(tiny_model()).logits(ids)
    assert got.shape == (len(ids), 49152) and got.dtype == np.float32
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


def test_incremental_decoding_equals_full_forward(f32_onnx):
    with OnnxRuntimeSession(f32_onnx, n_threads=2, n_batch=4) as s:  # n_batch 4: S>1 chunks on a non-empty past
        ids = s.tokenize(PROMPT)
        full = s.logits(ids)  # chunked through the cache already
        s.reset()
        steps = np.concatenate([s._step(ids[:5])] + [s._step([t]) for t in ids[5:]])
        s2 = OnnxRuntimeSession(f32_onnx, n_threads=2, n_batch=512)
        one_shot = s2.logits(ids)
    scale = np.abs(one_shot).max()
    assert np.abs(full - one_shot).max() / scale < 1e-5
    assert np.abs(steps - one_shot).max() / scale < 1e-5


def test_session_api_matches_llamacpp(f32_onnx, tmp_path):
    from edgekit.runtimes.llamacpp import LlamaCppSession

    GGUFExporter().export(tiny_model(), tmp_path)
    with OnnxRuntimeSession(f32_onnx, n_threads=2) as s, LlamaCppSession(tmp_path / "model.gguf", vocab_only=True) as ref:
        text = PROMPT + " <|im_start|>héllo 🙂\n\tend"
        assert s.tokenize(text) == ref.tokenize(text)
        assert s.tokenize(text, special=True) == ref.tokenize(text, special=True)
        ids = ref.tokenize(text, special=True)
        assert s.detokenize(ids) == ref.detokenize(ids)
        assert s.chat_prompt([{"role": "user", "content": "Hi"}]) == ref.chat_prompt([{"role": "user", "content": "Hi"}])
        assert (s.runtime, s.n_vocab, s.n_threads) == ("onnxruntime", 49152, 2)
        toks = list(s.stream_tokens(s.tokenize("Hello"), 6, ignore_eos=True))
        assert len(toks) == 6
        full = s.logits(s.tokenize("Hello") + toks[:-1])
        assert toks == [int(t) for t in full[-6:].argmax(-1)]  # greedy decode agrees with a full forward
        assert isinstance(s.generate("Hello", max_tokens=4), str)
        assert "".join(s.generate("Hello", max_tokens=4, stream=True)) == s.generate("Hello", max_tokens=4)


# ---------------------------------------------------------------- (b) the very numbers, in both formats

def _onnx_weights(path: Path) -> dict[str, np.ndarray]:
    """Every MatMulNBits weight of model.onnx, dequantized, keyed by the initializer of its MatMul ([N, K])."""
    proto = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    out = {}
    for n in proto.graph.node:
        if n.op_type == "MatMulNBits":
            a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
            assert a["accuracy_level"] == 4
            key = n.input[1].rsplit(".MatMulNBits.B", 1)[0]
            out[key] = unpack_nbits(inits[n.input[1]], inits[n.input[2]], a["bits"], a["block_size"], a["K"])
    return out


def _gguf_weights(path: Path, spec) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize

    by_name = {t.name: t for t in open_reader(path).tensors}
    out = {}
    for hf, gg in gguf_names(spec).items():
        back = dequantize(by_name[gg].data, by_name[gg].tensor_type)
        heads = qk_heads(hf, spec)
        out[hf] = unpermute_qk(back, heads) if heads else back
    return out


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a + 0.0, b + 0.0)  # -0.0 == +0.0


@pytest.mark.parametrize("recipe", ["q4_0", "int4"])
def test_packed_weights_equal_blockquant_and_gguf(tmp_path, recipe):
    if recipe == "q4_0":
        model = quantized(Q4_0Pass)
    else:  # GPTQ numbers (data-aware scales, not a max rule): calibration on a few token windows
        rng = np.random.default_rng(1)
        model = quantized(Int4Pass, calibration_tokens=lambda: [list(rng.integers(100, 40000, 64)) for _ in range(2)])
    path = export(model, tmp_path / "onnx")
    GGUFExporter().export(model, tmp_path)
    from_onnx = _onnx_weights(path)
    from_gguf = _gguf_weights(tmp_path / "model.gguf", model.spec)
    head = model.spec.output_head_name()
    checked = 0
    for hf in model.linear_names():
        enc = model.encoding(hf)
        assert isinstance(enc, BlockQuant)
        key = "lm_head" if hf == head else param_name(hf)
        w = from_onnx[key]
        assert _same(w, enc.dequantize()), hf
        assert _same(w, from_gguf[hf]), hf
        checked += 1
    assert checked == 2 * 7 + 1
    # the embedding's GatherBlockQuantized reads the head's packed bytes and scales (one copy in the file)
    proto = onnx.load(str(path))
    gbq = next(n for n in proto.graph.node if n.op_type == "GatherBlockQuantized")
    view = next(n for n in proto.graph.node if n.output[0] == gbq.input[0])
    assert view.op_type == "Reshape" and view.input[0] == "lm_head.MatMulNBits.B"
    assert gbq.input[2] == "lm_head.MatMulNBits.scales"
    assert not any(t.name == "embed" for t in proto.graph.initializer)


def test_gathered_embedding_rows_equal_encoding(tmp_path):
    """Running the graph's GatherBlockQuantized alone returns the dequantized Q8_0 rows exactly."""
    import onnxruntime as ort

    model = quantized(Q4_0Pass)
    path = export(model, tmp_path)
    proto = onnx.load(str(path))
    g = proto.graph
    gbq = next(n for n in g.node if n.op_type == "GatherBlockQuantized")
    view = next(n for n in g.node if n.output[0] == gbq.input[0])
    keep = {view.input[0], view.input[1], gbq.input[2]}
    sub = onnx.helper.make_graph(
        [view, gbq], "gather", [onnx.helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, [1, None])],
        [onnx.helper.make_tensor_value_info(gbq.output[0], onnx.TensorProto.FLOAT, None)],
        initializer=[t for t in g.initializer if t.name in keep])
    m = onnx.helper.make_model(sub, opset_imports=list(proto.opset_import))
    ids = np.array([[0, 1, 5, 300, 49151]], dtype=np.int64)
    rows = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})[0]
    assert _same(rows[0], model.encoding("model.embed_tokens.weight").dequantize()[ids[0]])


def test_pack_nbits_roundtrip():
    rng = np.random.default_rng(0)
    for bits in (4, 8):
        q = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), (6, 64)).astype(np.int8)
        s = rng.random((6, 2)).astype(np.float16)
        enc = BlockQuant(q, s, bits, 32)
        b, sc = pack_nbits(enc)
        assert b.shape == (6, 2, 32 * bits // 8) and sc.dtype == np.float32
        assert _same(unpack_nbits(b, sc, bits, 32, 64), enc.dequantize())


# ---------------------------------------------------------------- (c) convert end to end, validated

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny-src")
    GGUFExporter().export(tiny_model(), d)
    return d / "model.gguf"


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_convert_to_onnx_validates(tiny_gguf, tmp_path, quant):
    from edgekit.convert import convert

    out = tmp_path / "out"
    manifest = convert(str(tiny_gguf), "onnx", quant, out, eval_tokens=1024)
    assert manifest["validation"]["passed"]
    assert manifest["artifact"]["runtime"] == "onnxruntime"
    assert {p.name for p in out.iterdir()} >= {"model.onnx", "tokenizer.json", "onnx_config.json", "manifest.json"}
    with edgekit.load(out) as s:
        assert s.runtime == "onnxruntime"
        assert len(list(s.stream_tokens(s.tokenize("Hi"), 3, ignore_eos=True))) == 3


# ---------------------------------------------------------------- (d) (e) failures

def test_corrupted_scales_fail_validation_and_leave_nothing(tiny_gguf, tmp_path, monkeypatch):
    from edgekit.convert import convert

    original = ONNXExporter.export

    def corrupting(self, model, out_dir):
        info = original(self, model, out_dir)
        path = Path(out_dir) / self.filename
        proto = onnx.load(str(path))
        for t in proto.graph.initializer:
            if t.name.endswith(".MatMulNBits.scales"):
                t.CopyFrom(numpy_helper.from_array(np.flip(numpy_helper.to_array(t)).copy(), t.name))
        onnx.save(proto, str(path))
        return info

    monkeypatch.setattr(ONNXExporter, "export", corrupting)
    out = tmp_path / "out"
    with pytest.raises(ValidationError):
        convert(str(tiny_gguf), "onnx", "q8_0", out, eval_tokens=512)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_truncated_onnx_is_one_line_input_error(f32_onnx, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    for name in ("tokenizer.json", "onnx_config.json"):
        (d / name).write_bytes((f32_onnx.parent / name).read_bytes())
    data = f32_onnx.read_bytes()
    (d / "model.onnx").write_bytes(data[: len(data) // 2])
    for target in (d / "model.onnx", d):
        with pytest.raises(InputError) as err:
            edgekit.load(target)
        line = err.value.one_line()
        assert "\n" not in line and "could not load" in line and len(line) < 400


# ---------------------------------------------------------------- (f) no torch on the load path

def test_load_does_not_import_torch(f32_onnx):
    code = (f"import sys, edgekit\ns = edgekit.load({str(f32_onnx.parent)!r})\nprint(s.generate('Hi', max_tokens=3))\n"
            "print(' '.join(sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    mods = set(out.stdout.split())
    assert "onnxruntime" in mods
    assert "torch" not in mods and "transformers" not in mods and "onnx" not in mods
