"""Every architecture through every pass and format, against transformers itself.

Tiny random models of each family are built with transformers' own classes (tests/tiny_archs.py), read
into edgekit through the architecture's ``sanitize``, compressed, exported, and run by each format's own
runtime: GGUF logits through llama.cpp, ONNX logits through ONNX Runtime (Core ML: tests/test_coreml.py).
Float exports are compared with transformers directly; quantized ones with transformers' class holding
the very numbers the pass chose (``TorchReference(model, effective=True)``), and with the float model by KLD.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from edgekit import architectures
from edgekit.architectures import layout as L
from edgekit.converters.gguf import GGUFExporter
from edgekit.converters.gguf_layout import read_gguf_model
from edgekit.converters.onnx import ONNXExporter
from edgekit.model import Model
from edgekit.passes import PassContext
from edgekit.reference import TorchReference
from tiny_archs import NAMES, edgekit_model, hf_logits, save_hf_dir

IDS = [int(x) for x in np.random.default_rng(7).integers(100, 4000, 48)]  # longer than gemma3's window (8)
# (max |logit difference| / max |logit|, top-1 agreement) each runtime meets against the torch oracle
TOL = {"gguf": (2e-3, 0.95), "onnx": (1e-4, 1.0)}
# 4- and 8-bit kernels quantize activations (llama.cpp to 8 bits, ONNX Runtime's accuracy_level 4)
TOL_QUANT = {"gguf": (6e-2, 0.85), "onnx": (6e-2, 0.85)}
TOL_F16 = {"gguf": (4e-3, 0.95), "onnx": (2e-4, 1.0)}


def calibration() -> list[list[int]]:
    rng = np.random.default_rng(1)
    return [[int(x) for x in rng.integers(100, 4000, 64)] for _ in range(4)]


def ctx(reference=None) -> PassContext:
    return PassContext(calibration_tokens=calibration, reference=reference)


def clone(m: Model) -> Model:
    return Model(m.spec, dict(m.tensors), m.tokenizer, m.name, dict(m.encodings))


def apply(m: Model, quant: str) -> Model:
    from edgekit.registry import PASSES

    out = clone(m)
    PASSES.get(quant)().apply(out, ctx(reference=m))
    return out


def run(fmt: str, model: Model, tmp_path) -> np.ndarray:
    d = tmp_path / fmt
    d.mkdir()
    exporter = {"gguf": GGUFExporter, "onnx": ONNXExporter}[fmt]()
    assert exporter.supports(model) is None, exporter.supports(model)
    exporter.export(model, d)
    if fmt == "gguf":
        from edgekit.runtimes.llamacpp import LlamaCppSession

        with LlamaCppSession(d / "model.gguf", n_ctx=128) as s:
            return s.logits(IDS)
    from edgekit.runtimes.onnxruntime import OnnxRuntimeSession

    with OnnxRuntimeSession(d / "model.onnx", n_ctx=128) as s:
        return s.logits(IDS)


def close(got: np.ndarray, want: np.ndarray, tol: tuple[float, float]) -> tuple[bool, float, float]:
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    top1 = float((got.argmax(-1) == want.argmax(-1)).mean())
    return rel <= tol[0] and top1 >= tol[1], rel, top1


def kld(got: np.ndarray, want: np.ndarray) -> float:
    def lsm(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p, q = lsm(want.astype(np.float64)), lsm(got.astype(np.float64))
    return float((np.exp(p) * (p - q)).sum(-1).mean())


# ---------------------------------------------------------------------- the torch side


@pytest.mark.parametrize("name", NAMES)
def test_torch_decoder_and_reference_equal_transformers(name):
    import torch

    from edgekit.architectures.torch_decoder import DecoderNet

    m, hf = edgekit_model(name)
    want = hf_logits(hf, IDS)
    with torch.inference_mode():
        got = DecoderNet(m)(torch.tensor([IDS]))[0].numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    # the float reference rebuilds transformers' class from edgekit's tensors (to_hf_state inverts sanitize)
    assert np.abs(TorchReference(m).logits(IDS) - want).max() <= 1e-5 * np.abs(want).max()


def test_the_architecture_switches_matter():
    """The oracle tests can fail: dropping one architectural detail changes the logits."""
    import torch

    from edgekit.architectures.torch_decoder import DecoderNet

    # a window longer than the text switches masking off but keeps the local layers' rope
    for name, change in (("gemma3", {"sliding_window": 10_000}), ("gemma3", {"embed_scale": 1.0}),
                         ("qwen3", {"qk_norm": False}), ("phi3", {"partial_rotary": 1.0}),
                         ("gemma3", {"rope_local_theta": None}), ("llama3", {"rope_scaling": None})):
        m, hf = edgekit_model(name)
        want = hf_logits(hf, IDS)
        broken = clone(m)
        broken.spec = dataclasses.replace(m.spec, **change)
        if not broken.spec.qk_norm:
            broken.tensors = {n: t for n, t in m.tensors.items() if "q_norm" not in n and "k_norm" not in n}
        with torch.inference_mode():
            got = DecoderNet(broken)(torch.tensor([IDS]))[0].numpy()
        assert np.abs(got - want).max() > 1e-3 * np.abs(want).max(), (name, change)


@pytest.mark.parametrize("name", NAMES)
def test_hugging_face_directory_reads_into_the_same_model(name, tmp_path):
    from edgekit.sources import read_hf_dir

    hf = save_hf_dir(name, tmp_path / name)
    m = read_hf_dir(tmp_path / name)
    ref, _ = edgekit_model(name)
    assert m.spec == ref.spec
    assert set(m.tensors) == set(L.tensor_names(m.spec))
    for n in m.tensors:
        assert np.array_equal(m.tensors[n], ref.tensors[n]), n
    assert np.abs(TorchReference(m).logits(IDS) - hf_logits(hf, IDS)).max() < 1e-5 * 20


# ---------------------------------------------------------------------- GGUF and ONNX against transformers


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
@pytest.mark.parametrize("name", NAMES)
def test_float_export_matches_transformers(name, fmt, tmp_path):
    m, hf = edgekit_model(name)
    got = run(fmt, m, tmp_path)
    ok, rel, top1 = close(got, hf_logits(hf, IDS), TOL[fmt])
    assert ok, (rel, top1)


@pytest.mark.parametrize("quant", ["f16", "q8_0", "int4"])
@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
@pytest.mark.parametrize("name", NAMES)
def test_quantized_export_matches_its_numbers(name, fmt, quant, tmp_path):
    m, hf = edgekit_model(name)
    q = apply(m, quant)
    got = run(fmt, q, tmp_path)
    want = TorchReference(q, effective=True).logits(IDS)
    ok, rel, top1 = close(got, want, TOL_QUANT[fmt] if quant != "f16" else TOL_F16[fmt])
    assert ok, (rel, top1)
    # and the quantized artifact is still the model: small KLD against transformers' float logits
    assert kld(got, hf_logits(hf, IDS)) < {"f16": 1e-4, "q8_0": 2e-3, "int4": 0.5}[quant]


@pytest.mark.parametrize("name", NAMES)
def test_gguf_reads_back_as_the_same_model(name, tmp_path):
    m, _ = edgekit_model(name)
    GGUFExporter().export(m, tmp_path)
    back = read_gguf_model(tmp_path / "model.gguf")
    for n, t in m.tensors.items():
        assert np.array_equal(back.tensors[n], t), n
    want = architectures.of(m.spec).gguf_arch
    assert architectures.of(back.spec).gguf_arch == want
    # float hyper-parameters are float32 in GGUF; rope scaling comes back as the factors llama.cpp reads
    same = dataclasses.replace(back.spec, rms_norm_eps=m.spec.rms_norm_eps, arch=m.spec.arch,
                               rope_scaling=m.spec.rope_scaling, extra=m.spec.extra)
    assert same == m.spec
    np.testing.assert_allclose(back.spec.inv_freq(), m.spec.inv_freq(), rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_int4_numbers_are_the_same_in_gguf_and_onnx(name, tmp_path):
    """One pass decides the integers; both exporters only pack them: bit for bit the same weights."""
    import onnx

    from edgekit.converters.onnx import read_matrices

    m, _ = edgekit_model(name)
    q = apply(m, "int4")
    GGUFExporter().export(q, tmp_path)
    ONNXExporter().export(q, tmp_path)
    g = read_gguf_model(tmp_path / "model.gguf")  # dequantized, un-permuted, un-fused
    o = read_matrices(onnx.load(str(tmp_path / "model.onnx")))
    for n in q.linear_names():
        want = q.effective_weight(n)
        assert np.array_equal(g.tensors[n], want), n
        assert np.array_equal(o[n], want), n


@pytest.mark.parametrize("name", NAMES)
def test_onnx_incremental_decode_equals_transformers_greedy(name, tmp_path):
    """Prefill, then one token at a time through the in-place cache (sliding windows included)."""
    import torch

    from edgekit.runtimes.onnxruntime import OnnxRuntimeSession

    m, hf = edgekit_model(name)
    ONNXExporter().export(m, tmp_path)
    prompt = IDS[:6]
    with torch.inference_mode():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=14, do_sample=False)[0, len(prompt):].tolist()
    with OnnxRuntimeSession(tmp_path / "model.onnx", n_ctx=64) as s:
        got = list(s.stream_tokens(prompt, 14, ignore_eos=True))
    assert got == want


# ---------------------------------------------------------------------- structural passes on every architecture


@pytest.mark.parametrize("name", NAMES)
def test_prune_with_recovery_exports_everywhere_it_fits(name, tmp_path):
    from edgekit.passes.prune import PrunePass

    m, _ = edgekit_model(name)
    pruned = clone(m)
    heads = 0.5 if m.spec.num_heads // m.spec.num_kv_heads > 1 else 0.0
    rec = PrunePass(mlp=0.25, heads=heads, recover=4).apply(pruned, ctx(reference=m))
    assert rec["parameters_after"] < rec["parameters_before"]
    assert pruned.spec.intermediate_size == m.spec.intermediate_size - 32
    for i in range(m.spec.num_layers):  # biases were sliced with their rows
        b = L.linear(i, L.Q) + ".bias"
        if b in pruned.tensors:
            assert pruned.tensors[b].shape[0] == pruned.tensors[L.linear(i, L.Q) + ".weight"].shape[0]
    want = TorchReference(pruned).logits(IDS)
    ok, rel, top1 = close(run("onnx", pruned, tmp_path), want, (2e-4, 1.0))
    assert ok, ("onnx", rel, top1)
    why = GGUFExporter().supports(pruned)
    if heads and name in ("qwen2", "phi3"):
        # llama.cpp's qwen2 / phi3 derive head_dim from hidden / heads: fewer heads cannot be expressed
        assert why and "heads x head_dim" in why and "\n" not in why
        pruned = clone(m)
        PrunePass(mlp=0.25).apply(pruned, ctx(reference=m))
        want = TorchReference(pruned).logits(IDS)
    ok, rel, top1 = close(run("gguf", pruned, tmp_path), want, TOL["gguf"])
    assert ok, ("gguf", rel, top1)


@pytest.mark.parametrize("name", NAMES)
def test_lowrank_goes_to_onnx_and_gguf_refuses_in_one_line(name, tmp_path):
    import torch

    from edgekit.architectures.torch_decoder import DecoderNet
    from edgekit.passes.lowrank import LowRankPass

    m, _ = edgekit_model(name)
    lr = clone(m)
    rec = LowRankPass(rank=0.5).apply(lr, ctx())
    assert lr.is_factorized(), rec
    with torch.inference_mode():
        want = DecoderNet(lr)(torch.tensor([IDS]))[0].numpy()
    ok, rel, top1 = close(run("onnx", lr, tmp_path), want, (2e-4, 1.0))
    assert ok, (rel, top1)
    why = GGUFExporter().supports(lr)
    assert why and "low-rank" in why and "\n" not in why


def test_format_refusals_are_one_line():
    m, _ = edgekit_model("gemma3")
    odd = clone(m)
    odd.spec = dataclasses.replace(m.spec, attn_scale=0.1)
    why = GGUFExporter().supports(odd)
    assert why and "sqrt(head_dim)" in why and "\n" not in why
    assert ONNXExporter().supports(odd) is None  # ONNX takes any softmax scale


def test_unknown_architectures_are_one_line(tmp_path):
    import json

    from edgekit.errors import UnsupportedArchitectureError
    from edgekit.sources import read_hf_config

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(UnsupportedArchitectureError) as e:
        read_hf_config(tmp_path)
    assert "mamba" in e.value.one_line() and "qwen3" in e.value.one_line()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "phi3", "rope_scaling": {
        "type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}, "hidden_size": 64,
        "num_attention_heads": 4, "num_hidden_layers": 1, "intermediate_size": 64, "vocab_size": 10}))
    with pytest.raises(UnsupportedArchitectureError) as e:
        architectures.get("phi3").spec_from_hf(json.loads((tmp_path / "config.json").read_text()))
    assert "LongRoPE" in e.value.one_line()


@pytest.mark.parametrize("name,override,words", [
    ("qwen3", {"attention_bias": True}, "attention_bias=true"),
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window=true"),
    ("gemma3", {"attention_bias": True}, "attention biases"),
    ("gemma3", {"use_bidirectional_attention": True}, "bidirectional"),
])
def test_variants_edgekit_does_not_model_are_refused(name, override, words, tmp_path):
    """Switches that would silently change the maths are refused in one line, not dropped."""
    from edgekit.errors import UnsupportedArchitectureError
    from edgekit.sources import read_hf_dir

    save_hf_dir(name, tmp_path / "m", **override)
    with pytest.raises(UnsupportedArchitectureError) as e:
        read_hf_dir(tmp_path / "m")
    assert words in e.value.one_line()


def test_a_tensor_without_a_place_is_refused_not_dropped(tmp_path):
    from safetensors.numpy import load_file, save_file

    from edgekit.errors import InputError
    from edgekit.sources import read_hf_dir

    save_hf_dir("llama", tmp_path / "m")
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    state["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)
    save_file(state, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InputError) as e:
        read_hf_dir(tmp_path / "m")
    assert "o_proj.bias" in e.value.one_line()


def test_nonsense_config_values_are_one_line(tmp_path):
    from edgekit.errors import InputError
    from edgekit.sources import read_hf_dir

    save_hf_dir("llama", tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    for bad in ({"num_attention_heads": 0}, {"rope_scaling": "linear"}, {"hidden_size": "abc"}):
        (tmp_path / "m" / "config.json").write_text(json.dumps(cfg | bad))
        with pytest.raises(InputError) as e:
            read_hf_dir(tmp_path / "m")
        assert "config.json" in e.value.one_line() and "\n" not in e.value.one_line()


def test_gemma3_gguf_without_a_window_reads_as_all_global(tmp_path):
    """llama.cpp runs every layer as global when gemma3.attention.sliding_window is absent: read it so."""
    import gguf

    m, _ = edgekit_model("gemma3")
    GGUFExporter().export(m, tmp_path)
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "nowin.gguf"), "gemma3")
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "gemma3.attention.sliding_window"):
            continue
        vtype = f.types[0]
        w.add_key_value(key, f.contents(), vtype, sub_type=f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_shape=list(reversed(t.shape.tolist())), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    spec = read_gguf_model(tmp_path / "nowin.gguf").spec
    assert spec.sliding_window is None and not any(spec.is_sliding(i) for i in range(spec.num_layers))


def test_corrupt_gguf_metadata_is_one_line(tmp_path):
    from edgekit.errors import InputError

    import gguf

    m, _ = edgekit_model("qwen2")

    w = gguf.GGUFWriter(str(tmp_path / "zero.gguf"), "qwen2")
    architectures.get("qwen2").write_gguf_metadata(w, m.spec)
    w.add_head_count(0)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(InputError) as e:
        read_gguf_model(tmp_path / "zero.gguf")
    assert "\n" not in e.value.one_line()


def test_registry_lists_every_architecture():
    assert set(architectures.names("decoder")) >= {"llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3"}
    assert architectures.get("bert").kind == "encoder"
    assert architectures.for_gguf_arch("llama").name == "llama"  # a Mistral GGUF reads as Llama
    assert architectures.for_hf_model_type("gemma3_text").name == "gemma3"


# ---------------------------------------------------------------------- sources in any GGUF type


def test_k_quant_gguf_source_converts(tmp_path):
    """A source quantized by llama.cpp's own quantizer to Q4_K_M (rows of 256, as K-quants need) reads
    through gguf's dequantizers and converts to another format, validated against that dequantized float."""
    import ctypes

    import llama_cpp

    from conftest import tiny_model
    from edgekit.pipeline import ConvertRequest, convert
    from edgekit.converters.gguf_layout import open_reader

    m = tiny_model(hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2, head_dim=64)
    (tmp_path / "f32").mkdir()
    GGUFExporter().export(m, tmp_path / "f32")
    src = tmp_path / "kq.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    rc = llama_cpp.llama_model_quantize(str(tmp_path / "f32" / "model.gguf").encode(), str(src).encode(), ctypes.byref(params))
    assert rc == 0
    types = {t.tensor_type.name for t in open_reader(src).tensors}
    assert {"Q4_K", "Q6_K"} & types, types
    back = read_gguf_model(src)
    assert set(back.tensors) == set(m.tensors)
    err = max(float(np.abs(back.tensors[n] - m.tensors[n]).max() / np.abs(m.tensors[n]).max()) for n in m.tensors)
    assert 0 < err < 0.2  # dequantized K-quant values: close to the original, not equal
    manifest = convert(ConvertRequest(str(src), "onnx", "f16", tmp_path / "out", eval_tokens=512))
    assert manifest["validation"]["passed"] and manifest["quality"]["kld_mean"] < 1e-3


# ---------------------------------------------------------------------- real tokenizers of each family, end to end


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
@pytest.mark.parametrize("name,tokenizer", [("llama", "spm"), ("gemma3", "spm-gemma"), ("qwen3", "qwen2"),
                                            ("phi3", "spm-json")])
def test_hugging_face_directory_with_its_own_tokenizer_converts(name, tokenizer, fmt, tmp_path):
    """SentencePiece (Llama 2 style with tokenizer.model, Gemma style without a dummy prefix, Llama style
    from tokenizer.json alone) and Qwen's byte-level BPE: the conversion's validation checks that the
    artifact's runtime tokenizes the evaluation text exactly as the source's Hugging Face tokenizer does."""
    from transformers import AutoTokenizer

    from edgekit.pipeline import ConvertRequest, convert
    from edgekit.session import load
    from tiny_tokenizers import qwen_tokenizer_dir, spm_tokenizer_dir

    tok = tmp_path / "tok"
    if tokenizer == "qwen2":
        vocab = qwen_tokenizer_dir(tok)
    else:
        gemma = tokenizer == "spm-gemma"
        vocab = spm_tokenizer_dir(tok, add_dummy_prefix=not gemma, style="gemma" if gemma else "llama",
                                  sentencepiece_model=tokenizer != "spm-json")
    src = tmp_path / f"tiny-{name}".replace("phi3", "phi")  # llama.cpp keys Phi-3 token attributes on the name
    save_hf_dir(name, src, tokenizer_dir=tok, vocab_size=vocab)
    manifest = convert(ConvertRequest(str(src), fmt, "f16", tmp_path / "out", eval_tokens=512))
    assert manifest["validation"]["passed"]
    assert manifest["quality"]["kld_mean"] < 1e-3
    hf_tok = AutoTokenizer.from_pretrained(str(src))
    text = "def f(x):\n    return x + 12345  # héllo"
    with load(tmp_path / "out") as s:
        ids = s.tokenize(text)
        assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
        assert s.detokenize(ids).lstrip() == text  # SentencePiece renders the dummy prefix as a space
