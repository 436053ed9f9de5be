"""The memory-fit guard: estimates read before anything is allocated, refusals in one line, and estimates
checked against the resident memory a fresh process really reaches."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import asdict

import pytest

import edgekit
from edgekit import memory_fit
from edgekit.errors import InputError, MemoryFitError
from edgekit.sources import default_model_path
from tests.conftest import REPO, tiny_model

SMOLLM2 = default_model_path()


@pytest.fixture(autouse=True)
def no_calibration(tmp_path, monkeypatch):
    """Default overheads unless a test stores a calibration: the user's own must not change what is tested."""
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """The tiny Llama (2 layers, 4 heads, SmolLM2's vocabulary) as an f32 GGUF: 15 MB, 256 KV bytes per token."""
    from edgekit.converters.gguf import GGUFExporter

    d = tmp_path_factory.mktemp("tiny-gguf")
    GGUFExporter().export(tiny_model(), d)
    return d


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    from edgekit.passes.rtn import Q4_0Pass
    from tests.test_targets import _onnx_decoder

    return _onnx_decoder(tmp_path_factory.mktemp("onnx") / "tiny-q4_0", Q4_0Pass)[1].parent


def _child(code: str, env_cache) -> dict:
    """Run ``code`` in a fresh interpreter (nothing loaded but what it imports); its last line is JSON."""
    env = dict(os.environ, EDGEKIT_CACHE=str(env_cache), PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- refusing


def test_a_model_that_cannot_fit_is_refused_before_anything_is_allocated(tmp_path):
    """SmolLM2 at n_ctx 32768 (a 720 MiB KV cache, twice that with the attention scratch) against 512 MB:
    one line, and the process grew by a few MB of header reading, with llama.cpp never imported."""
    est = memory_fit.estimate(SMOLLM2, n_ctx=32768)
    out = _child(f"""
import json, sys, psutil
import edgekit
from edgekit.errors import MemoryFitError
from edgekit.registry import RUNTIMES
RUNTIMES.get("llamacpp")  # the runtime's module (numpy, ...) is imported by any load: not the guard's cost
proc = psutil.Process()
before = proc.memory_info().rss
try:
    edgekit.load({str(SMOLLM2)!r}, n_ctx=32768, max_memory="512MB")
    out = {{"loaded": True}}
except MemoryFitError as exc:
    out = {{"line": exc.one_line(), "exit_code": exc.exit_code}}
out.update(grew=proc.memory_info().rss - before, modules=[m for m in ("llama_cpp", "torch", "scipy") if m in sys.modules])
print(json.dumps(out))
""", tmp_path)
    assert "line" in out, out
    line = out["line"]
    assert "\n" not in line and out["exit_code"] == 2
    assert f"needs ~{memory_fit._mib(est.total_bytes)}" in line and "but only 488 MiB is available (max_memory)" in line
    assert "KV cache for n_ctx=32768" in line and "It would fit with n_ctx=" in line and "or pass check_memory=False." in line
    assert out["modules"] == []  # no llama.cpp context (not even its library), no torch, no scipy
    assert out["grew"] < 0.05 * (est.weights_bytes + est.kv_bytes_per_session), out


def test_a_generous_budget_loads_and_the_check_can_be_bypassed(tiny_gguf):
    with edgekit.load(tiny_gguf, n_ctx=256, max_memory="64GiB") as s:
        assert isinstance(s.generate("Hello", max_tokens=4), str)
    with pytest.raises(MemoryFitError, match="needs"):
        edgekit.load(tiny_gguf, n_ctx=256, max_memory=1)
    with edgekit.load(tiny_gguf, n_ctx=256, max_memory=1, check_memory=False) as s:  # bypassed
        assert isinstance(s.generate("Hello", max_tokens=4), str)
    with edgekit.load(tiny_gguf, vocab_only=True, max_memory=1) as s:  # no weights, no cache: nothing to guard
        assert s.tokenize("Hello")
    with pytest.raises(InputError, match="not a size"):
        edgekit.load(tiny_gguf, max_memory="lots")


def test_unreadable_facts_do_not_block_loading(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf at all" * 100)
    with pytest.raises(InputError) as exc:  # the runtime's own error, not the guard's
        edgekit.load(bad, max_memory=1)
    assert not isinstance(exc.value, MemoryFitError) and "not a valid GGUF" in exc.value.one_line()


def test_the_hint_names_a_context_that_really_fits(tiny_gguf):
    limit = memory_fit.estimate(tiny_gguf, n_ctx=4096).total_bytes + 1
    with pytest.raises(MemoryFitError) as exc:
        memory_fit.check_fits(tiny_gguf, n_ctx=32768, max_memory=limit)
    line = exc.value.one_line()
    assert line.startswith("model.gguf needs ~") and "It would fit with n_ctx=4096 (~" in line and "8192" not in line, line
    assert memory_fit.check_fits(tiny_gguf, n_ctx=4096, max_memory=limit).n_ctx == 4096

    # fewer parallel sessions
    limit = memory_fit.estimate(tiny_gguf, parallel=2).total_bytes
    with pytest.raises(MemoryFitError) as exc:
        memory_fit.check_fits(tiny_gguf, parallel=3, max_memory=limit)
    assert "3 x (KV cache" in exc.value.message and "parallel=2 (~" in exc.value.hint
    assert memory_fit.check_fits(tiny_gguf, parallel=2, max_memory=limit).parallel == 2

    # no context fits: a 4-bit build of this f32 model is what would
    limit = memory_fit.estimate(tiny_gguf, n_ctx=256).total_bytes - 1
    with pytest.raises(MemoryFitError) as exc:
        memory_fit.check_fits(tiny_gguf, n_ctx=2048, max_memory=limit)
    assert re.fullmatch(r"a q4_0 build \(4\.5 bits per weight, this one has 3\d\.\d\) would need ~\d+ MiB; "
                        r"or pass check_memory=False", exc.value.hint), exc.value.hint


def test_parallel_sessions_share_the_weights(tiny_gguf):
    one, two = memory_fit.estimate(tiny_gguf), memory_fit.estimate(tiny_gguf, parallel=2)
    assert two.weights_bytes == one.weights_bytes
    assert (two.kv_bytes_per_session, two.overhead_bytes_per_session) == (one.kv_bytes_per_session, one.overhead_bytes_per_session)
    assert two.total_bytes == one.weights_bytes + 2 * (one.kv_bytes_per_session + one.overhead_bytes_per_session)
    assert two.describe().startswith("weights ") and " + 2 x (KV cache for n_ctx=2048 " in two.describe()
    assert two.basis == "default overhead"
    # KV cache: 2 layers x 2 KV heads x (16 + 16) x 2 bytes (f16) per token; llama.cpp pads n_ctx to 256
    assert one.kv_bytes_per_session == 256 * 2048 and memory_fit.estimate(tiny_gguf, n_ctx=1000).n_ctx == 1024


def test_serving_several_models_checks_their_sum(tiny_gguf, tiny_onnx):
    a, b = memory_fit.estimate(tiny_gguf), memory_fit.estimate(tiny_onnx)
    assert memory_fit.check_total([a, b], ["a", "b"], a.total_bytes + b.total_bytes) == a.total_bytes + b.total_bytes
    with pytest.raises(MemoryFitError) as exc:
        memory_fit.check_total([a, b], ["a", "b"], a.total_bytes + b.total_bytes - 1, bypass="pass --no-memory-check")
    line = exc.value.one_line()
    assert line.startswith("the 2 models need ~") and "(a ~" in line and "Serve fewer models" in line
    assert line.endswith("or pass --no-memory-check.")
    with pytest.raises(MemoryFitError, match="^chat needs ~"):
        memory_fit.check_total([a], ["chat"], 1)


# ---------------------------------------------------------------- estimates against measurements

_PEAK = """
import json, sys
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
import edgekit
before = status("VmRSS")
s = edgekit.load({path!r}, n_ctx={n_ctx}, n_threads=1)  # one thread: spinning workers crawl on a busy 2-core box
ids = s.tokenize("The quick brown fox jumps over the lazy dog. " * {n_ctx})[: int(s.n_ctx * {fill})]
s.prefill(ids)  # a prompt that fills the context: the attention scratch's peak (decoding adds nothing to it)
print(json.dumps({{"peak": status("VmHWM") - before, "n_ctx": s.n_ctx}}))
"""


@pytest.mark.parametrize("which, n_ctx, fill", [("smollm2", 256, 0.25), ("tiny", 4096, 0.95)])
def test_the_estimate_matches_the_measured_peak(which, n_ctx, fill, tiny_gguf, tmp_path):
    """Peak resident growth of a fresh process that opens the model and runs a prompt (VmHWM), against the
    estimate: SmolLM2 (weights, KV cache and runtime; a short context keeps its prefill within seconds) and
    the tiny model with its context filled (the attention scratch is most of it)."""
    path = SMOLLM2 if which == "smollm2" else tiny_gguf
    est = memory_fit.estimate(path, n_ctx=n_ctx)
    out = _child(_PEAK.format(path=str(path), n_ctx=n_ctx, fill=fill), tmp_path)
    assert out["n_ctx"] == est.n_ctx
    assert abs(est.total_bytes - out["peak"]) <= 0.25 * out["peak"], (est.describe(), out["peak"] / 2**20)


def test_estimate_of_the_packaged_gguf(tmp_path):
    """SmolLM2 Q4_1 at the default context: 94 MiB of weights, 45 MiB of KV cache (30 layers x 3 KV heads x
    128 x f16 per token), and the runtime (measured ~256 MB peak in all when a prompt fills the context)."""
    est = memory_fit.estimate(SMOLLM2)
    assert est.n_ctx == 2048 and est.weights_bytes == SMOLLM2.stat().st_size
    assert est.kv_bytes_per_session == 23040 * 2048
    assert 200e6 < est.total_bytes < 320e6, est.describe()


# ---------------------------------------------------------------- other formats, calibration, plumbing


def test_onnx_decoders_are_guarded_too(tiny_onnx):
    est = memory_fit.estimate(tiny_onnx)
    assert est.n_ctx == 512  # the session clamps to the graph's max_position (512 in the tiny spec)
    assert est.kv_bytes_per_session == 512 * 2 * 2 * 2 * 16 * 4  # float32 cache, 2 layers x 2 KV heads x 16
    assert est.weights_bytes > (tiny_onnx / "model.onnx").stat().st_size  # ONNX Runtime's own copies
    with pytest.raises(MemoryFitError, match="model.onnx needs ~"):
        edgekit.load(tiny_onnx, max_memory="1MB")
    with edgekit.load(tiny_onnx, max_memory=est.total_bytes + 1) as s:
        assert isinstance(s.generate("Hello", max_tokens=4), str)


def test_profile_refuses_before_measuring(tiny_gguf):
    from edgekit.profile import profile

    with pytest.raises(MemoryFitError, match="needs"):
        profile(tiny_gguf, quality=False, max_memory="1MB")


def test_a_stored_calibration_replaces_the_default_overhead(tiny_gguf):
    from edgekit.targets import predict as pr

    one = memory_fit.estimate(tiny_gguf)
    cal = pr.Calibration("llamacpp", "gguf", {}, 1.0, {}, 1.0, 123e6, 0.1, {}, points=[{"decode": [(2048, 10.0)]}],
                         mem_extra={"F32": 0.5})
    pr.store("llamacpp/gguf", asdict(cal))
    est = memory_fit.estimate(tiny_gguf)
    assert est.basis == "calibrated llamacpp/gguf overhead"
    # measured at n_ctx 2048, the calibration already holds that context's scratch; F32 extra is per session
    f32 = one._model.bytes_by_type["F32"]
    assert est.overhead_bytes_per_session == int(123e6 + 0.5 * f32) and est.weights_bytes == one.weights_bytes


def test_the_fast_header_reads_what_ggufs_reader_reads(tmp_path):
    """Per-layer head counts (an array), a vocabulary (a long string array), scalars of several types."""
    import gguf
    import numpy as np

    from edgekit.targets.facts import gguf_facts

    path = tmp_path / "small.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_embedding_length(32)
    w.add_context_length(128)
    w.add_head_count([4, 2])
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_token_list([f"t{i}" for i in range(300)])
    w.add_token_scores([0.0] * 300)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((300, 32)).astype(np.float32))
    for i in range(2):
        w.add_tensor(f"blk.{i}.attn_q.weight", rng.standard_normal((32, 32)).astype(np.float16))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(32, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from edgekit.formats.gguf_header import GGUFHeader

    header = GGUFHeader(path)
    assert gguf_facts(path, reader=header) == gguf_facts(path)
    assert header.value("llama.attention.head_count") == [4, 2] and header.get_field("tokenizer.ggml.tokens").data == range(300)
    est = memory_fit.estimate(path, n_ctx=256)
    assert est.overhead_bytes_per_session == int(memory_fit.LLAMACPP_SESSION_BYTES + (6 * 4 + 4) * 256 * 256)  # the wider layer


def test_estimating_imports_no_torch_or_scipy(tiny_onnx, tmp_path):
    out = _child(f"""
import json, sys
import edgekit.memory_fit as mf
e = [mf.estimate(p).total_bytes for p in ({str(SMOLLM2)!r}, {str(tiny_onnx)!r})]
print(json.dumps([m for m in ("torch", "scipy", "transformers") if m in sys.modules]))
""", tmp_path)
    assert out == []


def test_sizes_and_available_memory():
    import psutil

    assert memory_fit.parse_bytes("512MB") == 512 * 10**6 and memory_fit.parse_bytes("2GiB") == 2 << 30
    assert memory_fit.parse_bytes("2g") == 2 << 30 and memory_fit.parse_bytes(1000) == 1000
    assert memory_fit.parse_bytes(None) is None
    for bad in ("lots", "-1MB", 0, True, "1.5 parsecs"):
        with pytest.raises(InputError):
            memory_fit.parse_bytes(bad)
    assert 0 < memory_fit.available_bytes() <= psutil.virtual_memory().total
