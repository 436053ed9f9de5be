"""Sentence encoders: source reading, float reference, ONNX export with packed 8/4-bit numbers, ORT session,
export-time cosine validation, profile, and clear errors. Fast tests run on a tiny random BERT built here
(hidden size 64, MiniLM's tokenizer); the e2e tests check the issue's cosine bars on the real MiniLM."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import edgekit
from edgekit.converters.onnx import unpack_nbits
from edgekit.pipeline import ConvertRequest, convert
from edgekit.converters.onnx import ONNXExporter
from edgekit.converters.onnx_encoder import param_name
from edgekit.encoder import EMBEDDING, EncoderReference, is_encoder, load_encoder, packaged_minilm_dir
from edgekit.passes import PassContext
from edgekit.registry import PASSES
from edgekit.errors import EdgekitError, InputError, ValidationError
from edgekit.harness.embedding import cosines, read_sentences
from edgekit.model import BlockQuant
from edgekit.runtimes.onnxruntime_encoder import OnnxEncoderSession
from tests.conftest import run_cli

TEXTS = ["The cat sat on the mat.", "A completely different sentence about stock markets and interest rates.",
         "Short.", "Où est la gare ? 12345"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A random 2-layer BERT (hidden 64) saved as a Hugging Face directory with MiniLM's tokenizer.json."""
    import torch
    from transformers import BertConfig, BertModel

    d = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=128)
    net = BertModel(cfg, add_pooling_layer=False)
    with torch.no_grad():  # a trained model's scale, so tokens and positions move the embedding
        for name, p in net.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3 if "embeddings" in name else 1.0 / np.sqrt(p.shape[1]))
    net.save_pretrained(str(d), safe_serialization=True)
    shutil.copy(packaged_minilm_dir() / "tokenizer.json", d / "tokenizer.json")
    return d


def _export(model, d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    ONNXExporter().export(model, d)
    return d / "model.onnx"


@pytest.fixture(scope="module")
def tiny_int8(tiny_bert, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "art"
    convert(ConvertRequest(str(tiny_bert), "onnx", "int8", out))
    return out


# ---------------------------------------------------------------- source and float reference


def test_reads_bert_directory(tiny_bert):
    assert is_encoder(tiny_bert) and is_encoder("minilm") and not is_encoder(None)
    m = load_encoder(tiny_bert)
    assert (m.pooling, m.normalize, m.max_length) == ("mean", True, 128)
    assert len(m.linear_names()) == 1 + 12 and m.linear_names()[0] == EMBEDDING  # word embedding + 6 per layer
    assert all(m.tensors[n].dtype == np.float32 for n in m.tensors)


def test_packaged_minilm_settings():
    m = load_encoder("minilm")
    assert (m.pooling, m.normalize, m.max_length, m.hidden_size, m.num_layers) == ("mean", True, 256, 384, 6)


def test_reference_matches_sentence_transformers(tiny_bert):
    """Oracle: sentence-transformers' own Transformer + mean Pooling on the same directory."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(tiny_bert), device="cpu")
    want = st.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    got = EncoderReference(load_encoder(tiny_bert)).embed(TEXTS)
    assert np.abs(got - want).max() < 1e-5


# ---------------------------------------------------------------- export and the ORT session


def test_fp32_onnx_matches_reference_and_batches(tiny_bert, tmp_path):
    m = load_encoder(tiny_bert)
    path = _export(m, tmp_path / "f32")
    want = EncoderReference(m).embed(TEXTS)
    with OnnxEncoderSession(path, n_threads=2) as s:
        one = s.embed(TEXTS, batch_size=1)
        many = s.embed(TEXTS, batch_size=16)
        assert s.embed([]).shape == (0, 64)
    assert one.shape == (4, 64) and one.dtype == np.float32
    assert np.abs(one - want).max() < 1e-5 and np.abs(many - want).max() < 1e-5  # padding changes nothing
    assert np.allclose(np.linalg.norm(one, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("quant", ["int8", "q4_0", "fp16"])
def test_packed_numbers_read_back_exactly(tiny_bert, tmp_path, quant):
    """model.onnx holds the recipe's very integers and scales; ORT computes what they say."""
    m = load_encoder(tiny_bert)
    PASSES.get(quant)().apply(m, PassContext())
    path = _export(m, tmp_path / quant)
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    for n in m.linear_names()[1:]:  # the layer matrices; the word embedding is checked below
        enc = m.encoding(n)
        if isinstance(enc, BlockQuant):
            p = param_name(n)
            back = unpack_nbits(inits[p + ".q"], inits[p + ".scales"], enc.bits, enc.block_size, enc.shape[1])
            assert np.array_equal(back, enc.dequantize()), n
        else:
            assert np.array_equal(inits[param_name(n) + ".f16"].astype(np.float32).T, m.effective_weight(n)), n
    if quant != "fp16":
        enc = m.encoding(EMBEDDING)
        q = inits["bert." + EMBEDDING + ".q"]
        back = unpack_nbits(q, inits["bert." + EMBEDDING + ".scales"], enc.bits, enc.block_size, enc.shape[1])
        assert np.array_equal(back, enc.dequantize())
    with OnnxEncoderSession(path) as s:
        got = s.embed(TEXTS)
    want = EncoderReference(m, effective=True).embed(TEXTS)  # torch on the dequantized weights
    assert np.abs(got - want).max() < 1e-4


def test_load_returns_encoder_session_without_torch(tiny_int8):
    code = ("import sys, edgekit; s = edgekit.load(sys.argv[1]); v = s.embed(['hello world', 'bye']); "
            "assert v.shape == (2, 64), v.shape; assert 'torch' not in sys.modules; print(type(s).__name__)")
    r = subprocess.run([sys.executable, "-c", code, str(tiny_int8)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "OnnxEncoderSession"
    man = json.loads((tiny_int8 / "manifest.json").read_text())
    assert man["artifact"]["kind"] == "encoder" and man["artifact"]["tensor_types"]["MatMulNBits8"] == 12
    assert man["validation"]["passed"] and man["quality"]["cosine_mean"] > 0.99


# ---------------------------------------------------------------- validation and errors


def test_zero_tolerance_fails_and_leaves_nothing(tiny_bert, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ValidationError) as err:
        convert(ConvertRequest(str(tiny_bert), "onnx", "int8", out,
                               tolerance={"cosine_distance_mean": 0.0, "cosine_distance_worst": 0.0}))
    assert "sentence_embedding" in err.value.one_line() and err.value.tolerance == 0.0
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_corrupted_weights_fail_default_tolerance(tiny_bert, tmp_path, monkeypatch):
    """A packing bug (every matrix's scales in the wrong row order) must fail the recipe's own tolerance."""
    import edgekit.converters.onnx_encoder as oe

    real = oe.pack_nbits

    def broken(bq):
        b, s = real(bq)
        return b, s[::-1].copy()

    monkeypatch.setattr(oe, "pack_nbits", broken)
    with pytest.raises(ValidationError):
        convert(ConvertRequest(str(tiny_bert), "onnx", "int8", tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


def test_bad_inputs_one_line(tiny_int8, tiny_bert, tmp_path):
    with pytest.raises(EdgekitError) as err:
        convert(ConvertRequest(str(tiny_bert), "gguf", "int8", tmp_path / "g"))
    assert "--format onnx" in err.value.one_line()
    with pytest.raises(EdgekitError) as err:
        convert(ConvertRequest(str(tiny_bert), "onnx", "int3", tmp_path / "g"))
    assert "int3" in err.value.one_line() and "int4" in err.value.one_line()
    with pytest.raises(EdgekitError) as err:  # a decoder-only pass is refused before any work
        convert(ConvertRequest(str(tiny_bert), "onnx", "prune", tmp_path / "g"))
    assert "decoder" in err.value.one_line() and not (tmp_path / "g").exists()
    broken = tmp_path / "trunc"
    shutil.copytree(tiny_int8, broken)
    data = (broken / "model.onnx").read_bytes()
    (broken / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="its manifest says"):  # the directory: sizes against the manifest
        edgekit.load(broken)
    with pytest.raises(InputError, match="could not load"):  # the file itself: ONNX Runtime's own refusal
        edgekit.load(broken / "model.onnx")
    r = run_cli("profile", str(broken / "model.onnx"), "--no-quality", "--reps", "1")
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "could not load" in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    no_tok = tmp_path / "notok"
    shutil.copytree(tiny_int8, no_tok)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(InputError, match="tokenizer.json"):
        edgekit.load(no_tok)
    with edgekit.load(tiny_int8) as s, pytest.raises(InputError, match="list"):
        s.embed("not a list")


def test_cli_convert_and_profile(tiny_bert, tmp_path):
    out = tmp_path / "cli-int4"
    r = run_cli("convert", str(tiny_bert), "--format", "onnx", "--quant", "int4", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "embedding cosine" in r.stdout
    man = json.loads((out / "manifest.json").read_text())
    assert man["recipe"]["quant"] == "int4" and man["recipe"]["passes"][0]["method"].startswith("gptq")
    r = run_cli("profile", str(out), "--json", "--reps", "1")
    assert r.returncode == 0, r.stderr
    prof = json.loads(r.stdout)
    assert prof["kind"] == "encoder" and prof["texts_s"] > 0 and prof["batch_latency_ms"] > 0
    assert prof["quality"]["sentences"] == len(read_sentences()[0]) and prof["quality"]["cosine_min"] <= prof["quality"]["cosine_mean"]


# ---------------------------------------------------------------- the real MiniLM (issue 3's bars)


@pytest.mark.e2e
def test_minilm_reference_is_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    sentences, _ = read_sentences()
    want = SentenceTransformer(str(packaged_minilm_dir()), device="cpu").encode(sentences, convert_to_numpy=True)
    got = EncoderReference(load_encoder("minilm")).embed(sentences)
    assert cosines(got, want).min() > 0.99999


@pytest.mark.e2e
@pytest.mark.slow  # two MiniLM conversions (GPTQ of 36 matrices) and their validation
@pytest.mark.parametrize("quant,bar", [("int8", 0.99), ("int4", 0.97)])
def test_minilm_cosine_bars(tmp_path, quant, bar):
    man = convert(ConvertRequest("minilm", "onnx", quant, tmp_path / quant))
    q = man["quality"]
    assert q["sentences"] >= 200 and q["cosine_mean"] >= bar, q
    with edgekit.load(tmp_path / quant) as s:  # measured again through the public API
        got = s.embed(read_sentences()[0][:16])
    want = EncoderReference(load_encoder("minilm")).embed(read_sentences()[0][:16])
    assert cosines(got, want).mean() >= bar


def test_run_on_encoder_says_embed(tiny_int8):
    r = run_cli("run", str(tiny_int8), "hello")
    assert r.returncode == 2 and "embed" in r.stderr and "Traceback" not in r.stderr, r.stderr
