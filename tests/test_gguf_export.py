"""The GGUF exporter on tiny models built in code: layout round trip, llama.cpp vs torch, and byte
equality with llama.cpp's own quantizer (an oracle written in C)."""

from __future__ import annotations

import copy
import ctypes
import dataclasses

import numpy as np
import pytest

from edgekit.converters.gguf import GGUFExporter
from edgekit.converters.gguf_layout import open_reader, permute_qk, read_gguf_model, unpermute_qk
from edgekit.passes import PassContext
from edgekit.passes.rtn import Q4_0Pass, Q8_0Pass
from edgekit.reference import TorchReference
from edgekit.runtimes.llamacpp import LlamaCppSession
from tests.conftest import tiny_model


def export(model, tmp_path, name="m"):
    d = tmp_path / name
    d.mkdir()
    GGUFExporter().export(model, d)
    return d / "model.gguf"


def test_qk_permutation_round_trips():
    w = np.arange(64 * 8, dtype=np.float32).reshape(64, 8)
    assert np.array_equal(unpermute_qk(permute_qk(w, 4), 4), w)
    assert not np.array_equal(permute_qk(w, 4), w)


def test_f32_export_reads_back_identically(tiny, tmp_path):
    path = export(tiny, tmp_path)
    back = read_gguf_model(path)
    # GGUF stores float hyper-parameters as float32
    assert back.spec.rms_norm_eps == pytest.approx(tiny.spec.rms_norm_eps, rel=1e-6)
    assert dataclasses.replace(back.spec, rms_norm_eps=tiny.spec.rms_norm_eps) == tiny.spec
    for name, w in tiny.tensors.items():
        assert np.array_equal(back.tensors[name], w), name
    assert back.tokenizer["tokenizer.ggml.tokens"]["value"] == tiny.tokenizer["tokenizer.ggml.tokens"]["value"]
    assert back.tokenizer["tokenizer.chat_template"] == tiny.tokenizer["tokenizer.chat_template"]


def test_llama_cpp_runs_edgekit_gguf_and_matches_torch(tiny, tmp_path):
    path = export(tiny, tmp_path)
    ids = list(range(100, 164))
    want = TorchReference(tiny).logits(ids)
    with LlamaCppSession(path, n_ctx=128) as s:
        got = s.logits(ids)
    assert got.shape == want.shape
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel < 2e-3, rel
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.98


def test_quantized_tensors_read_back_bit_for_bit(tiny, tmp_path):
    model = copy.copy(tiny)
    model.encodings = {}
    Q4_0Pass().apply(model, PassContext())
    path = export(model, tmp_path)
    back = read_gguf_model(path)  # gguf's own dequantizer, q/k rows un-permuted
    for name, enc in model.encodings.items():
        if hasattr(enc, "q"):
            assert np.array_equal(back.tensors[name], enc.dequantize()), name


@pytest.mark.parametrize("quant_pass,ftype", [(Q4_0Pass, "LLAMA_FTYPE_MOSTLY_Q4_0"), (Q8_0Pass, "LLAMA_FTYPE_MOSTLY_Q8_0")])
def test_rtn_export_equals_llama_quantize(tiny, tmp_path, quant_pass, ftype):
    """edgekit's q4_0 / q8_0 files hold exactly the bytes llama.cpp's quantizer writes from the same float file."""
    import llama_cpp

    f32 = export(tiny, tmp_path, "f32")
    theirs = tmp_path / "theirs.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), ctypes.byref(params)) == 0

    model = copy.copy(tiny)
    model.encodings = {}
    quant_pass().apply(model, PassContext())
    ours = export(model, tmp_path, "ours")
    a = {t.name: t for t in open_reader(ours).tensors}
    b = {t.name: t for t in open_reader(theirs).tensors}
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type, name
        assert np.array_equal(np.asarray(a[name].data), np.asarray(b[name].data)), name


def test_session_api(tiny, tmp_path):
    import edgekit

    path = export(tiny, tmp_path)
    with edgekit.load(path) as s:
        text = s.generate("Hello there", max_tokens=8)
        assert isinstance(text, str)
        pieces = list(s.generate("Hello there", max_tokens=8, stream=True))
        assert "".join(pieces) == text  # greedy: streaming and not streaming agree
        assert s.logits(s.tokenize("Hello there")).shape == (len(s.tokenize("Hello there")), tiny.spec.vocab_size)
        assert len(list(s.stream_tokens(s.tokenize("a b c"), 5, ignore_eos=True))) == 5


def test_quantized_rows_of_256_run_in_llama_cpp(tmp_path):
    """Rows that are multiples of 256 take ggml's widest CPU kernels (AMX where compiled in): a llama.cpp
    built with AMX on a VM that does not enable AMX dies here with SIGILL. Run in a child process so a
    crash is reported as a failure instead of killing the test session."""
    import subprocess
    import sys

    from edgekit.converters.gguf import GGUFExporter
    from edgekit.passes import PassContext
    from edgekit.passes.rtn import Q4_0Pass
    from edgekit.architectures.torch_decoder import TorchSession

    m = tiny_model(hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2, head_dim=64)
    Q4_0Pass().apply(m, PassContext())
    GGUFExporter().export(m, tmp_path)
    ids = list(range(100, 116))
    code = ("import sys, numpy as np; from edgekit.runtimes.llamacpp import LlamaCppSession; "
            f"np.save(sys.argv[2], LlamaCppSession(sys.argv[1], n_ctx=64).logits({ids}))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "model.gguf"), str(tmp_path / "l.npy")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"llama.cpp died (exit {r.returncode}); rebuild it with `make setup` (AMX off): {r.stderr[-500:]}"
    got = np.load(tmp_path / "l.npy")
    want = TorchSession(m, None).logits(ids)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
