"""Predictor, plan, cloud baselines and the report command, on tiny models and synthetic measurements."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from edgekit.converters.gguf import GGUFExporter
from edgekit.passes import PassContext
from edgekit.passes.rtn import Q4_0Pass
from edgekit.targets import predict as pr
from edgekit.targets.facts import artifact_facts, estimate_gguf_facts
from edgekit.targets.profiles import get_profile
from tests.conftest import run_cli, tiny_model

HOST = {"read_bandwidth_bytes_s": 10e9, "copy_bandwidth_bytes_s": 8e9, "compute_flops": {"f32": 50e9}, "ram_bytes": 16e9}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-gguf")
    GGUFExporter().export(tiny_model(), d)
    return d


def synthetic_point(facts, x, x_kv, y, y_attn, overhead=120e6, n_ctx=2048):
    """Measurements that follow the model exactly, for known factors."""
    fd = facts.to_dict()
    bw, c = HOST["read_bandwidth_bytes_s"], HOST["compute_flops"]["f32"]

    def t_decode(ctx):
        stream = sum(b * (1 if t == "F32" else x[t]) for t, b in fd["bytes_by_type"].items())
        return (stream + fd["kv_bytes_per_token"] * ctx * x_kv) / bw

    def t_prefill(p):
        return (sum(2 * n * p * y[t] for t, n in fd["params_by_type"].items()) + fd["attn_flops_per_token_per_ctx"] * p * p / 2 * y_attn) / c

    return {"facts": fd, "decode": [(160, 1 / t_decode(160)), (1056, 1 / t_decode(1056))],
            "prefill": [(128, t_prefill(128)), (512, t_prefill(512)), (1024, t_prefill(1024))],
            "peak_rss_bytes": fd["size_bytes"] + fd["kv_bytes_per_token"] * n_ctx + overhead, "n_ctx": n_ctx, "load_s": 0.1}


def test_fit_recovers_known_factors():
    from tests.conftest import tiny_spec

    # matrices must carry most of the bytes, as in real models, for per-type factors to be identifiable
    spec = tiny_spec(hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64)
    x = {"F16": 1.6, "Q8_0": 1.3, "Q4_0": 2.1}
    y = {"F16": 3.0, "Q8_0": 2.5, "Q4_0": 2.2}
    pts = [synthetic_point(estimate_gguf_facts(spec, q), x, 4.0, y, 6.0) for q in ("f16", "q8_0", "q4_0")]
    cal = pr.fit(pts, HOST)
    for t in x:
        assert cal.x[t] == pytest.approx(x[t], rel=3e-2), t
        assert cal.y[t] == pytest.approx(y[t], rel=3e-2), t
    assert cal.x_kv == pytest.approx(4.0, rel=3e-2) and cal.y_attn == pytest.approx(6.0, rel=3e-2)
    assert cal.mem_overhead_bytes == pytest.approx(120e6)
    # and a held-out recipe is then predicted exactly
    facts = estimate_gguf_facts(spec, "int4")
    held = synthetic_point(facts, x, 4.0, y, 6.0)
    p = pr.predict(facts, cal, pr.host_machine(HOST), 1056, 512)
    assert p["decode_tok_s"] == pytest.approx(held["decode"][1][1], rel=3e-2)
    assert p["peak_memory_bytes"] == pytest.approx(held["peak_rss_bytes"], rel=1e-6)


def test_estimated_facts_match_the_written_artifact(tmp_path):
    model = tiny_model()
    Q4_0Pass().apply(model, PassContext())
    GGUFExporter().export(model, tmp_path)
    real = artifact_facts(tmp_path / "model.gguf")
    est = estimate_gguf_facts(model.spec, "q4_0")
    assert est.bytes_by_type == real.bytes_by_type and est.params_by_type == real.params_by_type
    assert est.kv_bytes_per_token == real.kv_bytes_per_token == 2 * 2 * 2 * 16 * 2


def test_prediction_scales_with_the_device():
    spec = tiny_model().spec
    facts = estimate_gguf_facts(spec, "q4_0")
    cal = pr.fit([synthetic_point(estimate_gguf_facts(spec, q), {"F16": 1.5, "Q8_0": 1.5, "Q4_0": 1.5}, 2, {"F16": 2, "Q8_0": 2, "Q4_0": 2}, 2)
                  for q in ("f16", "q8_0", "q4_0")], HOST)
    pi, laptop = get_profile("raspberry-pi-5"), get_profile("x86-laptop")
    a = pr.predict(facts, cal, pr.profile_machine(pi), 512, 128)
    b = pr.predict(facts, cal, pr.profile_machine(laptop), 512, 128)
    assert b["decode_tok_s"] > a["decode_tok_s"] and b["ttft_ms"] < a["ttft_ms"]
    assert a["fits"] and a["memory_budget_bytes"] == pytest.approx(pi.memory_budget_bytes())
    # faster storage, faster cold load
    assert b["load_s"] < a["load_s"]


def test_convert_for_a_target_shows_the_plan(tmp_path, tiny_dir):
    proc = run_cli("convert", str(tiny_dir / "model.gguf"), "--target", "raspberry-pi-5", "-o", str(tmp_path / "pi"), "--json")
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)
    plan = m["plan"]
    assert plan["target"] == "raspberry-pi-5" and plan["winner"]["quant"] == m["recipe"]["quant"]
    assert {c["quant"] for c in plan["candidates"]} == {"f16", "q8_0", "int4", "q4_0"}
    # the Pi runs both llama.cpp and ONNX Runtime: both formats are weighed
    assert {c["format"] for c in plan["candidates"]} == {"gguf", "onnx"}
    assert all(c["fits"] for c in plan["candidates"])  # a tiny model fits anywhere
    # the best-quality recipe that fits wins
    assert plan["winner"]["quant"] == min(plan["candidates"], key=lambda c: c["kld_mean"])["quant"]


def test_a_latency_limit_changes_the_winner_and_an_impossible_one_is_refused(tmp_path, tiny_dir):
    from edgekit.errors import EdgekitError
    from edgekit.sources import load_reference, resolve
    from edgekit.targets.plan import plan

    src = resolve(str(tiny_dir / "model.gguf"))
    ref = load_reference(src)
    prof = get_profile("iphone-15-pro")
    free = plan(ref, src.sha256, prof)
    by = {c["quant"]: c for c in free["candidates"]}
    limit = (by["f16"]["ttft_ms"] + by["q4_0"]["ttft_ms"]) / 2  # between the slowest and the fastest
    if by["f16"]["ttft_ms"] > by["q4_0"]["ttft_ms"]:
        limited = plan(ref, src.sha256, prof, max_latency_ms=limit)
        assert limited["winner"]["quant"] != "f16"
    with pytest.raises(EdgekitError, match="nothing fits iphone-15-pro"):
        plan(ref, src.sha256, prof, max_latency_ms=1e-6)
    proc = run_cli("convert", str(tiny_dir / "model.gguf"), "--target", "iphone-15-pro", "--max-latency-ms", "0.000001",
                   "-o", str(tmp_path / "never"))
    assert proc.returncode != 0 and proc.stderr.count("error: ") == 1 and "nothing fits" in proc.stderr
    assert not (tmp_path / "never").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def loopback_server(tiny_dir):
    """A real OpenAI-compatible server (llama-cpp-python's) on loopback, serving the tiny model."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(tiny_dir / "model.gguf"),
                             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("llama_cpp.server did not start on loopback")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


def test_cloud_endpoint_is_measured(loopback_server):
    from edgekit.targets.cloud import measure_endpoint

    r = measure_endpoint(loopback_server, "Once upon a time", max_tokens=16, runs=3)
    assert r["ttft_ms"] > 0 and r["decode_tok_s"] > 0 and r["spread"]["decode_tok_s"]["n"] == 3


def test_profile_with_targets_and_cloud(tmp_path, tiny_dir, loopback_server):
    proc = run_cli("profile", str(tiny_dir / "model.gguf"), "--json", "--no-quality", "--reps", "2", "--decode-tokens", "16",
                   "-t", "raspberry-pi-5", "-t", "cloud-h100", "--cloud-url", loopback_server)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert set(r["targets"]) == {"raspberry-pi-5"}
    t = r["targets"]["raspberry-pi-5"]
    for key in ("decode_tok_s", "ttft_ms", "load_s", "peak_memory_bytes", "fits"):
        assert key in t
    assert r["cloud"]["cloud-h100"]["source"] == "simulated" and r["cloud"]["cloud-h100"]["usd_per_1k_tokens"] > 0
    assert r["cloud"]["endpoint"]["decode_tok_s"] > 0
    assert 0 < r["roofline_percent"]["decode"] and 0 < r["roofline_percent"]["prefill"]


def test_unknown_target_is_one_line(tiny_dir):
    proc = run_cli("profile", str(tiny_dir / "model.gguf"), "-t", "toaster")
    assert proc.returncode != 0 and proc.stderr.count("error: ") == 1 and "raspberry-pi-5" in proc.stderr


def test_report_command_writes_html(tmp_path, tiny_dir):
    from edgekit.pipeline import ConvertRequest, convert

    dirs = []
    for quant in ("q8_0", "q4_0"):
        convert(ConvertRequest(str(tiny_dir / "model.gguf"), "gguf", quant, tmp_path / quant, eval_tokens=512))
        dirs.append(str(tmp_path / quant))
    out = tmp_path / "report.html"
    proc = run_cli("report", *dirs, "-o", str(out), "-t", "raspberry-pi-5", "-t", "cloud-a100")
    assert proc.returncode == 0, proc.stderr
    html = out.read_text()
    assert html.count('class="plot"') == 4 and html.count("<svg") >= 4


def test_fit_from_a_single_artifact_is_finite():
    """One artifact with two weight types is under-determined: the fit must still return usable factors
    (scipy's nnls aborted the whole process on this shape)."""
    spec = tiny_model().spec
    p = synthetic_point(estimate_gguf_facts(spec, "q4_0"), {"Q4_0": 2.0, "Q8_0": 1.5}, 3.0, {"Q4_0": 2.0, "Q8_0": 2.0}, 3.0)
    cal = pr.fit([p], HOST)
    assert all(np.isfinite(v) and v >= 0 for v in [*cal.x.values(), *cal.y.values(), cal.x_kv, cal.y_attn])
    pred = pr.predict(estimate_gguf_facts(spec, "q4_0"), cal, pr.host_machine(HOST), 1056, 512)
    assert pred["decode_tok_s"] == pytest.approx(p["decode"][1][1], rel=0.05)


# ---------------------------------------------------------------- ONNX decoders and encoders


def _onnx_decoder(d, pass_cls=None):
    from edgekit.converters.onnx import ONNXExporter

    m = tiny_model()
    if pass_cls is not None:
        pass_cls().apply(m, PassContext())
    d.mkdir(parents=True, exist_ok=True)
    ONNXExporter().export(m, d)
    return m, d / "model.onnx"


def _initializer_bytes(path, op_types, slots):
    """Bytes of the initializers that nodes of ``op_types`` read at ``slots``, each counted once (numpy)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    seen = {i for n in proto.graph.node if n.op_type in op_types for s, i in enumerate(n.input) if s in slots and i in inits}
    return sum(inits[i].nbytes for i in seen), proto


def test_onnx_q4_0_decoder_facts_match_the_file(tmp_path):
    from edgekit.architectures import layout as L

    m, path = _onnx_decoder(tmp_path / "q4", Q4_0Pass)
    facts = artifact_facts(tmp_path / "q4")
    s = m.spec
    assert facts.format == "onnx" and facts.runtime == "onnxruntime" and facts.extra["kind"] == "decoder"
    # every MatMulNBits B / scales byte is streamed once (the tied embedding is the head's B: not twice)
    nbits, _ = _initializer_bytes(path, {"MatMulNBits"}, {1, 2, 3})
    assert sum(v for t, v in facts.bytes_by_type.items() if t.startswith("NBITS")) == nbits
    # parameters by type from the model's own tensors: 4-bit body, 8-bit tied head (the Q4_0 recipe)
    head = s.output_head_name()
    body = sum(m.tensors[n].size for n in m.tensors if m.tensors[n].ndim == 2 and n not in (head, L.EMBED))
    assert facts.params_by_type == {"NBITS4": body, "NBITS8": s.vocab_size * s.hidden_size}
    assert facts.kv_bytes_per_token == 2 * s.num_layers * s.num_kv_heads * s.head_dim * 4  # float32 cache
    assert facts.attn_flops_per_token_per_ctx == 2 * s.num_layers * s.num_heads * 2 * s.head_dim
    assert facts.parameters == sum(t.size for t in m.tensors.values())
    assert facts.size_bytes == path.stat().st_size


def test_estimated_onnx_facts_match_the_written_artifact(tmp_path):
    """What the planner predicts an ONNX q4_0 export to stream per token is what the export holds."""
    from edgekit.targets.facts import estimate_facts

    m, _ = _onnx_decoder(tmp_path / "q4", Q4_0Pass)
    real = artifact_facts(tmp_path / "q4")
    est = estimate_facts(m.spec, "q4_0", "onnx")
    assert est.runtime == "onnxruntime" and est.format == "onnx"
    assert est.params_by_type == real.params_by_type
    for typ in ("NBITS4", "NBITS8"):
        assert est.bytes_by_type[typ] == real.bytes_by_type[typ], typ
    assert est.kv_bytes_per_token == real.kv_bytes_per_token


def test_onnx_f16_and_f32_decoder_facts(tmp_path):
    from edgekit.passes.cast import F16Pass

    m, path = _onnx_decoder(tmp_path / "f16", F16Pass)
    facts = artifact_facts(path)
    import onnx
    from onnx import numpy_helper

    # every fp16 initializer is a matrix (the body's, and the tied embedding read once as the head)
    f16 = sum(a.nbytes for a in map(numpy_helper.to_array, onnx.load(str(path)).graph.initializer) if a.dtype == np.float16)
    assert facts.bytes_by_type["F16"] == f16 and facts.params_by_type["F16"] * 2 == f16
    assert facts.params_by_type["F16"] == sum(t.size for t in m.tensors.values() if t.ndim == 2)
    m32, p32 = _onnx_decoder(tmp_path / "f32")
    f32 = artifact_facts(p32)
    matrices = sum(t.size for t in m32.tensors.values() if t.ndim == 2)  # tied embedding once, as the head
    assert f32.params_by_type == {"F32": matrices}
    norms = sum(t.size for t in m32.tensors.values() if t.ndim == 1)
    assert f32.bytes_by_type["F32"] == 4 * (matrices + norms)


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    return build_tiny_encoder(tmp_path_factory.mktemp("bert"), tmp_path_factory.mktemp("enc-int8"))


def build_tiny_encoder(src, d):
    """A 2-layer random BERT (hidden 64), int8, exported to ONNX into ``d``: (EncoderModel, d)."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    from edgekit.converters.onnx import ONNXExporter
    from edgekit.encoder import load_encoder, packaged_minilm_dir
    from edgekit.passes import PassContext
    from edgekit.registry import PASSES

    torch.manual_seed(0)
    net = BertModel(BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=128, max_position_embeddings=128), add_pooling_layer=False)
    net.save_pretrained(str(src), safe_serialization=True)
    shutil.copy(packaged_minilm_dir() / "tokenizer.json", src / "tokenizer.json")
    m = load_encoder(src)
    PASSES.get("int8")().apply(m, PassContext())
    ONNXExporter().export(m, d)
    return m, d


def test_onnx_encoder_facts_match_the_file(tiny_encoder):
    m, d = tiny_encoder
    facts = artifact_facts(d)
    assert facts.extra["kind"] == "encoder" and facts.extra["num_layers"] == 2 and facts.extra["max_length"] == m.max_length
    nbits, _ = _initializer_bytes(d / "model.onnx", {"MatMulNBits"}, {1, 2, 3})
    assert facts.bytes_by_type["NBITS8"] == nbits
    # the gathered word embedding is not streamed per batch, and is not a matrix product
    gathered, _ = _initializer_bytes(d / "model.onnx", {"GatherBlockQuantized"}, {0, 2})
    assert gathered > 0 and sum(facts.bytes_by_type.values()) < nbits + gathered
    assert facts.params_by_type == {"NBITS8": sum(m.tensors[n].size for n in m.linear_names()[1:])}  # not the embedding
    assert facts.kv_bytes_per_token == 0 and facts.hidden_size == 64
    assert facts.attn_flops_per_token_per_ctx == 4 * 64 * 2


def _synthetic_encoder_measurement(facts, y, t0, host, batch=32):
    """What the encoder harness would report for a machine following the model exactly."""
    from edgekit.targets import encoder_predict as ep

    c, bw = host["compute_flops"]["f32"], host["read_bandwidth_bytes_s"]

    def t(n, length):
        return ep.batch_flops(facts, n, length) * y / c + facts.bytes_per_token / bw + t0

    batches = [{"n": batch, "padded": L} for L in (18, 20, 22, 25)] + [{"n": 7, "padded": 40}]
    texts = sum(b["n"] for b in batches)
    return {"single_latency_ms": 1000 * t(1, 12), "batch_latency_ms": 1000 * t(batch, 21),
            "texts_s": texts / sum(t(b["n"], b["padded"]) for b in batches), "settings": {"batch_size": batch},
            "peak_rss_bytes": facts.size_bytes + 50e6,
            "tokens": {"median": 15, "texts": texts, "batches": batches, "batch_padded_median": 21, "single_median": 12}}


def test_encoder_fit_recovers_known_factors_and_scales_with_the_device(tiny_encoder):
    from edgekit.targets import encoder_predict as ep

    facts = artifact_facts(tiny_encoder[1])
    meas = _synthetic_encoder_measurement(facts, 2.5, 4e-4, HOST)
    cal = ep.fit([ep.point_from_measurement(facts, meas, "synthetic")], HOST)
    assert cal.y == pytest.approx(2.5, rel=1e-3) and cal.overhead_s == pytest.approx(4e-4, rel=1e-3)
    assert cal.mem_overhead_bytes == pytest.approx(50e6)
    host = ep.predict(facts, cal, pr.host_machine(HOST), 21, (32,))
    assert host["batches"]["32"]["latency_ms"] == pytest.approx(meas["batch_latency_ms"], rel=1e-3)
    pi, laptop = (ep.predict(facts, cal, pr.profile_machine(get_profile(n)), 15) for n in ("raspberry-pi-5", "x86-laptop"))
    assert pi["calibrated"] and "synthetic" in pi["calibration"]
    assert laptop["texts_s"] > pi["texts_s"] and pi["batches"]["32"]["texts_s"] > pi["batches"]["1"]["texts_s"]
    # a batch of 32 costs more than one text but less than 32 of them (weights and call cost are shared)
    b1, b32 = pi["batches"]["1"]["latency_ms"], pi["batches"]["32"]["latency_ms"]
    assert b1 < b32 < 32 * b1


def test_onnx_calibration_marks_onnxruntime_calibrated(tmp_path, monkeypatch):
    from tests.conftest import tiny_spec

    monkeypatch.setattr(pr, "calibration_path", lambda: tmp_path / "calibration.json")
    spec = tiny_spec(hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64)
    pts = [synthetic_point(estimate_gguf_facts(spec, q), {"F16": 1.5, "Q8_0": 1.5, "Q4_0": 1.5}, 2, {"F16": 2, "Q8_0": 2, "Q4_0": 2}, 2)
           for q in ("f16", "q8_0", "q4_0")]
    for p in pts:
        p["facts"] |= {"runtime": "onnxruntime", "format": "onnx"}
        p["name"] = f"onnx-{len(p)}"
    assert "onnxruntime" not in pr.profile_machine(get_profile("raspberry-pi-5")).calibrated_runtimes
    pr.save(pr.fit(pts, HOST))
    assert "onnxruntime" in pr.profile_machine(get_profile("raspberry-pi-5")).calibrated_runtimes
    assert "onnxruntime" in pr.host_machine(HOST).calibrated_runtimes
    assert pr.profile_machine(get_profile("cloud-h100")).calibrated_runtimes == ()  # GPU kernels: not measured here


def test_profile_targets_on_onnx_decoder_and_encoder(tmp_path, tiny_encoder):
    _, dec = _onnx_decoder(tmp_path / "dec", Q4_0Pass)
    for art in (dec.parent, tiny_encoder[1]):
        proc = run_cli("profile", str(art), "--json", "--no-quality", "--reps", "1", "--decode-tokens", "8",
                       "-t", "raspberry-pi-5", "-t", "iphone-15-pro")
        assert proc.returncode == 0, proc.stderr
        r = json.loads(proc.stdout)
        assert set(r["targets"]) == {"raspberry-pi-5", "iphone-15-pro"}, r.get("predictions_note")
        for t in r["targets"].values():
            assert "onnxruntime/onnx" in t["calibration"] and t["peak_memory_bytes"] > 0
            if r.get("kind") == "encoder":
                assert t["batches"]["32"]["texts_s"] > t["batches"]["1"]["texts_s"] > 0
            else:
                assert t["decode_tok_s"] > 0 and t["ttft_ms"] > 0


def test_profile_of_a_runtime_that_cannot_run_here(tmp_path, monkeypatch, tiny_encoder):
    """Core ML off macOS, generically: size, bits per weight and uncalibrated predictions from the facts."""
    from edgekit.profile import profile
    from edgekit.session import runtime_of

    _, dec = _onnx_decoder(tmp_path / "dec", Q4_0Pass)
    rt = runtime_of(dec)
    monkeypatch.setattr(rt, "unavailable_reason", classmethod(lambda cls: "not on this test's OS"))
    r = profile(dec.parent, targets=["raspberry-pi-5"])
    assert r["speed"] is None and r["speed_note"] == "not on this test's OS"
    assert r["bits_per_weight"] == pytest.approx(8 * r["size_bytes"] / r["parameters"])
    t = r["targets"]["raspberry-pi-5"]
    assert not t["calibrated"] and t["decode_tok_s"] > 0 and any("uncalibrated" in n for n in t["notes"])
    e = profile(tiny_encoder[1], targets=["iphone-15-pro"])
    assert e["kind"] == "encoder" and not e["targets"]["iphone-15-pro"]["calibrated"]
    # facts that cannot be read: one line saying why, not silence
    (dec.parent / "onnx_config.json").write_text("{}")
    bad = profile(dec.parent, targets=["raspberry-pi-5"])
    assert bad["targets"] == {} and bad["predictions_note"].startswith("skipped: ") and "\n" not in bad["predictions_note"]


def test_single_artifact_fit_is_exact_in_sample_and_does_not_guess_a_kv_factor(tmp_path, monkeypatch):
    """Fitted from one measurement at one context, the predictor reproduces that measurement and streams
    the KV cache at the weights' efficiency (the split is not identifiable from one point)."""
    from tests.conftest import tiny_spec

    from edgekit.targets.calibrate import calibration_for

    monkeypatch.setattr(pr, "calibration_path", lambda: tmp_path / "calibration.json")  # nothing stored
    facts = estimate_gguf_facts(tiny_spec(hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8,
                                          num_kv_heads=4, head_dim=64), "q4_0")
    speed = {"settings": {"prompt_tokens": 128, "decode_tokens": 64, "prefill_tokens": 512}, "decode_tok_s": 80.0,
             "prefill_tok_s": 400.0, "ttft_ms": 350.0, "peak_rss_bytes": 3e8, "n_ctx": 2048, "load_s": 0.3}
    cal, how = calibration_for(facts, speed, HOST)
    assert "this artifact alone" in how
    assert cal.x_kv == pytest.approx(cal.x["Q4_0"]) and cal.x["Q4_0"] == pytest.approx(cal.x["Q8_0"])
    p = pr.predict(facts, cal, pr.host_machine(HOST), 128 + 32, 128)
    assert p["decode_tok_s"] == pytest.approx(80.0, rel=1e-6)
    longer = pr.predict(facts, cal, pr.host_machine(HOST), 1024, 128)
    assert longer["decode_tok_s"] < p["decode_tok_s"]


def test_single_artifact_fit_of_a_cache_resident_f32_model_stays_positive(tmp_path, monkeypatch):
    """A tiny all-F32 model decodes faster than its bytes stream at the copy rate (it sits in cache):
    the one-point fit must give every byte a positive factor, reproduce the measurement, and predict
    positive speeds for devices (it once predicted -213 tok/s for a Raspberry Pi)."""
    from tests.conftest import tiny_spec

    from edgekit.targets.calibrate import calibration_for

    monkeypatch.setattr(pr, "calibration_path", lambda: tmp_path / "calibration.json")
    facts = estimate_gguf_facts(tiny_spec(), "f32")
    fast = 3 * HOST["read_bandwidth_bytes_s"] / facts.bytes_per_token  # 3x the copy-rate ceiling
    speed = {"settings": {"prompt_tokens": 128, "decode_tokens": 64, "prefill_tokens": 512}, "decode_tok_s": fast,
             "prefill_tok_s": 4e4, "ttft_ms": 3.0, "peak_rss_bytes": 3e8, "n_ctx": 2048, "load_s": 0.01}
    cal, _ = calibration_for(facts, speed, HOST)
    assert cal.x_kv > 0 and all(v > 0 for v in cal.x.values())
    here = pr.predict(facts, cal, pr.host_machine(HOST), 128 + 32, 128)
    assert here["decode_tok_s"] == pytest.approx(fast, rel=1e-6)
    pi = pr.predict(facts, cal, pr.profile_machine(get_profile("raspberry-pi-5")), 512, 128)
    assert pi["decode_tok_s"] > 0 and pi["ttft_ms"] > 0
