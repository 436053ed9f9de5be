"""Core ML export: what Linux can check (package structure, interface, weights bit for bit, the traced
torch module's arithmetic against transformers, for every architecture), and the numeric checks that
need Core ML's runtime (marked ``macos``: skipped elsewhere, with the reason in pytest's -ra summary)."""

from __future__ import annotations

import dataclasses
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from edgekit.architectures import layout as L
from edgekit.model import BlockQuant, Cast, Model
from edgekit.passes import PassContext
from edgekit.passes.rtn import quantize_q4_0, quantize_q8_0
from edgekit.passes.ternary import ternarize
from tests.conftest import pruned_lowrank_model, run_cli, tiny_model
from tiny_archs import NAMES, edgekit_model, hf_logits

pytest.importorskip("coremltools")

from edgekit.converters import coreml_torch as ctorch  # noqa: E402
from edgekit.converters import coreml_weights as cw  # noqa: E402
from edgekit.converters.coreml import CoreMLExporter  # noqa: E402

CTX = 64  # the KV-cache length of the test packages (tiny: conversion time does not depend on it much)
IDS = list(range(300, 340))  # 40 tokens: longer than gemma3's sliding window (8)
# every architecture, plus Mistral with its sliding window on every layer (tiny_archs' Mistral has none)
ARCHS = [pytest.param(n, {}, id=n) for n in NAMES] + [pytest.param("mistral", {"sliding_window": 8}, id="mistral-window")]


def encode(model, kind_of):
    """Give every 2-D tensor the encoding ``kind_of(name)`` names: int4 / int8 / ternary / f16."""
    for n in model.linear_names():
        w = model.tensors[n]
        kind = kind_of(n)
        model.encodings[n] = {"int4": quantize_q4_0, "int8": quantize_q8_0, "ternary": ternarize,
                              "f16": lambda w: Cast("f16")}[kind](w)
    return model


def mixed_kind(name: str) -> str:
    """Every storage kind in one model: the tied head int8, layer 0 int4, layer 1 ternary, its MLP down f16."""
    if name == L.EMBED:
        return "int8"
    if name == L.linear(1, L.DOWN) + ".weight":
        return "f16"
    return "int4" if name.startswith(L.prefix(0)) else "ternary"


def export(model, d: Path, context: int | None = None) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    return CoreMLExporter(context).export(model, d)


def vectors(model) -> list[str]:
    """The 1-D tensors (norms, q/k norms, biases): stored fp16, never block-quantized."""
    return [n for n in model.tensor_order() if model.tensors[n].ndim == 1]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    m = encode(tiny_model(), mixed_kind)
    d = tmp_path_factory.mktemp("mixed")
    return m, d, export(m, d)


# ---------------------------------------------------------------- weights, bit for bit


def test_every_kind_reads_back_bit_exact(mixed):
    m, d, info = mixed
    w = info["package_checks"]["weights"]
    assert len(m.linear_names()) == 15 and len(vectors(m)) == 5  # 2 x (2 norms) + the final norm
    assert w["bit_exact"] and w["tensors"] == len(m.tensor_order()) == 20
    assert w["stored_as"] == {"int8": 1, "int4": 7, "lut2": 6, "fp16": 1 + 5}
    assert info["tensor_types"] == w["stored_as"]


def test_mil_structure_every_linear_compressed_as_requested(mixed):
    m, d, info = mixed
    ops = info["package_checks"]["op_counts"]
    # 7 linears per layer + the tied head (the embedding's own constexpr, shared with the gather)
    assert ops["linear"] == 15
    assert ops["constexpr_blockwise_shift_scale"] == 8  # 7 int4 + the int8 embedding/head
    assert ops["constexpr_lut_to_dense"] == 6
    assert ops["scaled_dot_product_attention"] == 2
    assert ops["read_state"] == 2 and ops["coreml_update_state"] == 4
    prog, _ = cw.load_program(d / "model.mlpackage")
    ops_by_name = {op.name: op for op in cw._ops(prog)}
    for n in m.linear_names():
        op = ops_by_name[cw.const_name(n)]
        want = {"int4": "constexpr_blockwise_shift_scale", "int8": "constexpr_blockwise_shift_scale",
                "ternary": "constexpr_lut_to_dense", "f16": "const"}[mixed_kind(n)]
        assert op.op_type == want, n
        users = {c.op_type for c in op.outputs[0].child_ops}
        assert users <= {"linear", "gather"} and "linear" in users, (n, users)
    for n in vectors(m):  # every norm is its own fp16 const, multiplied in
        op = ops_by_name[cw.const_name(n)]
        assert op.op_type == "const" and op.outputs[0].dtype == cw._types().fp16, n
        assert {c.op_type for c in op.outputs[0].child_ops} == {"mul"}, n
    assert_no_float_copies(prog)


def assert_no_float_copies(prog) -> None:
    """No float copy of any weight is left: besides the packed tensors, the only large consts are the RoPE
    tables (DecoderNet's ``cos_*`` / ``sin_*`` buffers) and the zero bias Core ML's linear op carries."""
    big = [op for op in cw._ops(prog) if op.op_type == "const" and op.outputs[0].val is not None
           and np.asarray(op.outputs[0].val).size > 1024 and not op.name.startswith("edgekit__")]
    assert all(op.name.startswith(("cos_", "sin_")) or ("bias" in op.name and not np.asarray(op.outputs[0].val).any())
               for op in big), [op.name for op in big]


def _blob(path: Path, offset: int) -> tuple[int, bytes]:
    raw = (path / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").read_bytes()
    sentinel, dtype, size, start = struct.unpack_from("<IIQQ", raw, offset)
    assert sentinel == 0xDEADBEEF
    return dtype, raw[start : start + size]


def test_raw_blob_bytes_equal_blockquant(mixed):
    """An oracle independent of coremltools' loader: parse model.mlmodel and unpack weight.bin by hand."""
    import coremltools as ct

    m, d, _ = mixed
    pkg = d / "model.mlpackage"
    spec = ct.utils.load_spec(str(pkg))
    f = spec.mlProgram.functions["main"]
    ops = {op.outputs[0].name: op for op in f.block_specializations[f.opset].operations if op.outputs}
    checked = 0
    for n in m.linear_names():
        enc = m.encoding(n)
        if not isinstance(enc, BlockQuant):
            continue
        op = ops[cw.const_name(n)]
        args = {k: v.arguments[0].value.blobFileValue.offset for k, v in op.inputs.items()}
        if enc.bits in (4, 8):
            dtype, data = _blob(pkg, args["data"])
            if enc.bits == 4:  # two per byte, low nibble first, two's complement
                b = np.frombuffer(data, np.uint8)
                u = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(-1)[: enc.q.size].astype(np.int8)
                q = np.where(u > 7, u - 16, u).astype(np.int8)
            else:
                q = np.frombuffer(data, np.int8)
            assert np.array_equal(q.reshape(enc.shape), enc.q), n
            _, sc = _blob(pkg, args["scale"])
            assert np.frombuffer(sc, np.float16).tobytes() == enc.scales.astype(np.float16).tobytes(), n
        else:  # uint2 indices, four per byte, low bits first; the table holds {-2s, -s, 0, s}
            _, data = _blob(pkg, args["indices"])
            b = np.frombuffer(data, np.uint8)
            idx = np.stack([(b >> s) & 3 for s in (0, 2, 4, 6)], axis=-1).reshape(-1)[: enc.q.size]
            assert np.array_equal(idx.astype(np.int8).reshape(enc.shape) - 2, enc.q), n
            _, lut = _blob(pkg, args["lut"])
            lut = np.frombuffer(lut, np.float16).reshape(enc.shape[0], -1, 4)
            assert lut[..., 3].tobytes() == enc.scales.astype(np.float16).tobytes(), n
            assert np.array_equal(lut[..., 1], -enc.scales.astype(np.float16)) and not lut[..., 2].any()
        checked += 1
    assert checked == 14


def test_corrupted_package_fails_read_back(mixed, tmp_path):
    """The read-back check can fail: flip one stored int4 byte and it names the tensor."""
    import shutil

    from edgekit.converters.coreml import validate_package
    from edgekit.errors import ValidationError

    m, d, info = mixed
    pkg = tmp_path / "model.mlpackage"
    shutil.copytree(d / "model.mlpackage", pkg)
    name = L.linear(0, L.Q) + ".weight"
    import coremltools as ct

    spec = ct.utils.load_spec(str(pkg))
    f = spec.mlProgram.functions["main"]
    op = next(o for o in f.block_specializations[f.opset].operations if o.outputs and o.outputs[0].name == cw.const_name(name))
    wfile = pkg / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    raw = bytearray(wfile.read_bytes())
    _, _, _, start = struct.unpack_from("<IIQQ", raw, op.inputs["data"].arguments[0].value.blobFileValue.offset)
    raw[start] ^= 0x11
    wfile.write_bytes(bytes(raw))
    with pytest.raises(ValidationError, match=r"layers\.0\.attn\.q\.weight"):
        validate_package(pkg, m, info["context"], tuple(json.loads((d / "coreml_config.json").read_text())["cache_shape"]))


def test_equal_tensors_each_keep_their_own_const(tmp_path):
    """Equal norms (128 values: what coremltools' deduplication would merge) and two equal matrices are each
    stored under their own name; all-ones norms (an untrained model's) go with their no-op multiply, and the
    read-back says so instead of failing."""
    m = tiny_model(hidden_size=128)
    norms = vectors(m)
    for n in norms[1:3]:
        m.tensors[n] = m.tensors[norms[0]].copy()
    for n in norms[3:]:
        m.tensors[n] = np.ones_like(m.tensors[n])
    m.tensors[L.linear(1, L.UP) + ".weight"] = m.tensors[L.linear(1, L.GATE) + ".weight"].copy()
    encode(m, lambda n: "f16")
    w = export(m, tmp_path, context=CTX)["package_checks"]["weights"]
    assert w["bit_exact"] and w["tensors"] == 20 - 2 and w["elided_identity"] == norms[3:]


def test_unsupported_bit_width_is_refused():
    m = tiny_model()
    n = L.linear(0, L.UP) + ".weight"
    w = m.tensors[n]
    m.encodings[n] = BlockQuant(np.zeros(w.shape, np.int8), np.ones((w.shape[0], w.shape[1] // 32), np.float16), 3, 32)
    assert "3-bit" in CoreMLExporter().supports(m)


# ---------------------------------------------------------------- interface the runtime relies on


def test_interface_matches_runtime_contract(mixed):
    m, d, info = mixed
    io = info["package_checks"]["interface"]
    cfg = json.loads((d / "coreml_config.json").read_text())
    assert set(io["inputs"]) == {"inputIds", "causalMask"} and set(io["outputs"]) == {"logits"}
    assert io["inputs"]["inputIds"]["dtype"] == "INT32" and io["inputs"]["causalMask"]["dtype"] == "FLOAT16"
    assert io["inputs"]["causalMask"]["ranges"][2:] == [[1, cfg["context"]], [1, cfg["context"]]]
    s = m.spec
    assert cfg["cache_shape"] == [s.num_layers, 1, s.num_kv_heads, cfg["context"], s.head_dim]
    for st in ("keyCache", "valueCache"):
        assert io["states"][st] == {"type": "stateType", "dtype": "FLOAT16", "shape": cfg["cache_shape"], "ranges": []}
    assert info["package_checks"]["spec_version"] >= 9  # iOS 18: states and block-wise compression
    assert {"model.mlpackage", "tokenizer.json", "coreml_config.json"} <= {p.name for p in d.iterdir()}


def test_runtime_session_reads_the_config_on_any_os(mixed, tmp_path):
    """The session needs only coreml_config.json and tokenizer.json (vocab_only works on Linux); the names it
    feeds are the exporter's and DecoderNet's; a config it does not know is one clear error."""
    import shutil

    from edgekit.converters import coreml as exporter
    from edgekit.errors import InputError
    from edgekit.runtimes import coreml as rt

    m, d, _ = mixed
    assert tuple(exporter.STATES) == ctorch.STATES and tuple(exporter.INPUTS) == (rt.INPUT_IDS, rt.CAUSAL_MASK)
    with rt.CoreMLSession(d / "model.mlpackage", vocab_only=True) as s:
        assert s.n_vocab == m.spec.vocab_size and s.tokenize("Hello") and s._inputs == exporter.INPUTS
    shutil.copytree(d / "model.mlpackage", tmp_path / "model.mlpackage")
    shutil.copy(d / "tokenizer.json", tmp_path / "tokenizer.json")
    cfg = json.loads((d / "coreml_config.json").read_text())
    assert cfg["version"] == 2 and cfg["architecture"] == "llama" and cfg["layer_windows"] == [None, None]
    (tmp_path / "coreml_config.json").write_text(json.dumps(cfg | {"version": 99}))
    with pytest.raises(InputError, match="version 99"):
        rt.CoreMLSession(tmp_path / "model.mlpackage", vocab_only=True)


# ---------------------------------------------------------------- every architecture x f16 / q8_0 / int4

QUANTS = ("f16", "q8_0", "int4")  # the recipes' own passes (int4: GPTQ into int4 blocks, the output head Q8_0)
# int8 storage is in every int4 package too (the output head): q8_0 beyond llama is marked slow (-m "not slow")
# every architecture at int4 in `make test`; the other recipes of the non-llama ones in `make test-slow`
ARCH_MATRIX = [pytest.param(n, {}, q, id=f"{n}-{q}", marks=() if q == "int4" or n == "llama" else pytest.mark.slow)
               for n in NAMES for q in QUANTS]
ARCH_MATRIX.append(pytest.param("mistral", {"sliding_window": 8}, "int4", id="mistral-window-int4"))


def recipe(name: str, overrides: dict, quant: str):
    from edgekit.registry import PASSES

    m, _ = edgekit_model(name, **overrides)
    PASSES.get(quant)().apply(m, PassContext(calibration_tokens=lambda: [list(range(100, 132))]))
    return m


@pytest.mark.parametrize("name,overrides,quant", ARCH_MATRIX)
def test_every_architecture_converts_bit_exact(name, overrides, quant, tmp_path):
    m = recipe(name, overrides, quant)
    s = m.spec
    assert CoreMLExporter().supports(m) is None
    info = export(m, tmp_path, context=CTX)
    checks = info["package_checks"]
    names, mats, vecs = m.tensor_order(), m.linear_names(), vectors(m)
    # every tensor read back bit for bit, stored as the recipe says (norms / biases fp16)
    w = checks["weights"]
    assert w["bit_exact"] and w["tensors"] == len(names) == len(mats) + len(vecs)
    want = {"f16": {"fp16": len(names)}, "q8_0": {"int8": len(mats), "fp16": len(vecs)},
            "int4": {"int4": len(mats) - 1, "int8": 1, "fp16": len(vecs)}}[quant]
    assert w["stored_as"] == want
    # interface: the runtime's inputs, output and the two fp16 states
    io = checks["interface"]
    cache = [s.num_layers, 1, s.num_kv_heads, CTX, s.head_dim]
    assert set(io["inputs"]) == {"inputIds", "causalMask"} and set(io["outputs"]) == {"logits"}
    for st in ("keyCache", "valueCache"):
        assert io["states"][st] == {"type": "stateType", "dtype": "FLOAT16", "shape": cache, "ranges": []}
    # structure: one fused attention per layer, both caches written by every layer, one linear per matrix
    ops = checks["op_counts"]
    assert ops["scaled_dot_product_attention"] == s.num_layers
    assert ops["coreml_update_state"] == 2 * s.num_layers
    assert ops["linear"] == 7 * s.num_layers + 1  # + the output head (tied or not)
    assert ops.get("constexpr_blockwise_shift_scale", 0) == (0 if quant == "f16" else len(mats))
    assert ops.get("gelu", 0) == (s.num_layers if s.activation == "gelu_tanh" else 0)
    assert ops.get("silu", 0) == (s.num_layers if s.activation == "silu" else 0)
    assert ("range_1d" in ops) == any(s.window(i) for i in range(s.num_layers))  # the in-graph window
    # every tensor's const is used by the ops its role needs
    prog, _ = cw.load_program(tmp_path / "model.mlpackage")
    by_name = {op.name: op for op in cw._ops(prog)}
    for n in names:
        op = by_name[cw.const_name(n)]
        users = {c.op_type for c in op.outputs[0].child_ops}
        if n in vecs:
            assert op.op_type == "const" and users == ({"add"} if n.endswith(".bias") else {"mul"}), (n, users)
        else:
            assert op.op_type == ("const" if quant == "f16" else "constexpr_blockwise_shift_scale"), n
            assert users <= {"linear", "gather"} and users, (n, users)
    assert sum(n.endswith(".bias") for n in vecs) == (3 * s.num_layers if s.attn_bias else 0)
    assert_no_float_copies(prog)
    cfg = json.loads((tmp_path / "coreml_config.json").read_text())
    assert cfg["architecture"] == s.arch and cfg["cache_shape"] == cache
    assert cfg["layer_windows"] == [s.window(i) for i in range(s.num_layers)]
    assert set(cfg["storage"]) == set(names)


# ---------------------------------------------------------------- the traced module's arithmetic (torch, on Linux)


@pytest.mark.parametrize("name,overrides", ARCHS)
def test_traced_module_matches_transformers(name, overrides):
    """``reference_logits`` (DecoderNet in stateful mode, the module that is traced) equals transformers on
    a prefill then step-by-step decoding through its fp16 cache, for every architecture (gemma3's sliding
    layers included: 40 tokens, window 8); and the traced TorchScript module computes the same, also
    with chunk sizes other than the trace's."""
    m, hf = edgekit_model(name, **overrides)
    want = hf_logits(hf, IDS)
    scale = np.abs(want).max()
    net = ctorch.stateful_net(m, CTX)
    got = ctorch.reference_logits(m, IDS, CTX, [30] + [1] * 10, net=net)
    assert np.abs(got - want).max() < 1e-2 * scale  # fp16 K/V cache
    traced = ctorch.trace(net)
    assert np.abs(ctorch.reference_logits(m, IDS, CTX, [30] + [1] * 10, net=traced) - got).max() < 1e-5 * scale
    chunked = ctorch.reference_logits(m, IDS, CTX, [7, 9, 1, 20, 1, 2], net=traced)
    assert np.abs(chunked - want).max() < 1e-2 * scale
    if m.spec.sliding_window:  # the window matters here: without it the logits are far off
        assert any(m.spec.window(i) for i in range(m.spec.num_layers)) and len(IDS) > m.spec.sliding_window
        full = Model(dataclasses.replace(m.spec, sliding_window=None, layer_types=None), m.tensors, m.tokenizer)
        assert np.abs(ctorch.reference_logits(full, IDS, CTX) - want).max() > 10 * np.abs(got - want).max()


@pytest.mark.parametrize("which", ["uniform", "pruned_lowrank"])
def test_stateful_module_matches_scoring_mode_and_caches(which):
    """Uneven layers and factor pairs: the stateful module equals DecoderNet's scoring mode (no cache) in one
    call and step by step through its KV-cache buffers (fp16 cache: 2e-3)."""
    import torch

    from edgekit.architectures.torch_decoder import DecoderNet

    m = tiny_model(seed=1) if which == "uniform" else pruned_lowrank_model(rank=32)
    ids = list(range(500, 520))
    with torch.inference_mode():
        want = DecoderNet(m).eval()(torch.tensor([ids]))[0].numpy()
    full = ctorch.reference_logits(m, ids, CTX)
    stepped = ctorch.reference_logits(m, ids, CTX, [12] + [1] * 8)
    scale = np.abs(want).max()
    assert np.abs(full - want).max() < 2e-3 * scale
    assert np.abs(stepped - want).max() < 2e-3 * scale


def test_pruned_and_lowrank_convert_bit_exact(tmp_path):
    m = encode(pruned_lowrank_model(rank=32), lambda n: "int8" if "embed" in n else "int4")
    info = export(m, tmp_path)
    ops = info["package_checks"]["op_counts"]
    assert info["package_checks"]["weights"]["bit_exact"]
    assert info["package_checks"]["weights"]["tensors"] == 17 + 5
    assert ops["linear"] == 15 + 2  # each factor pair is two linears
    assert ops["constexpr_blockwise_shift_scale"] == len(m.linear_names()) == 17
    cfg = json.loads((tmp_path / "coreml_config.json").read_text())
    assert cfg["layer_widths"][0] == {"heads": 2, "kv_heads": 1, "intermediate": 96}
    assert cfg["cache_shape"][2] == 2  # the widest layer's KV heads; layer 0 uses the first row


# ---------------------------------------------------------------- CLI on Linux: one-line errors, profile


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """``edgekit convert --format coreml`` of a tiny GGUF source (int4), through the CLI."""
    from edgekit.converters.gguf import GGUFExporter

    src = tmp_path_factory.mktemp("tiny-src")
    GGUFExporter().export(tiny_model(), src)
    out = tmp_path_factory.mktemp("cm") / "out"
    proc = run_cli("convert", str(src / "model.gguf"), "--format", "coreml", "--quant", "int4", "--out", str(out),
                   "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, json.loads(proc.stdout)


def test_cli_convert_manifest(converted):
    out, manifest = converted
    assert manifest["artifact"]["file"] == "model.mlpackage" and manifest["artifact"]["runtime"] == "coreml"
    on_mac = sys.platform == "darwin"
    if not on_mac:
        assert manifest["validation"]["passed"] is None and "macOS" in manifest["validation"]["why"]
        assert manifest["quality"] is None
    assert manifest["artifact"]["package_checks"]["weights"]["bit_exact"]
    pkg_bytes = sum(p.stat().st_size for p in (out / "model.mlpackage").rglob("*") if p.is_file())
    assert manifest["size_bytes"] > pkg_bytes > 0
    assert 4 < manifest["bits_per_weight"] < 16


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the error Linux and other systems give")
def test_cli_run_on_linux_is_one_line_platform_error(converted):
    out, _ = converted
    for target in (out, out / "model.mlpackage"):
        proc = run_cli("run", str(target), "Hello")
        assert proc.returncode != 0
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1 and "macos" in errors[0].lower(), proc.stderr
        assert "Traceback" not in proc.stderr


@pytest.mark.skipif(sys.platform == "darwin", reason="the offline profile is for hosts without Core ML")
def test_cli_profile_on_linux_predicts_apple_targets(converted):
    out, manifest = converted
    proc = run_cli("profile", str(out), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout)
    assert r["size_bytes"] == sum(p.stat().st_size for p in (out / "model.mlpackage").rglob("*") if p.is_file())
    assert 4 < r["bits_per_weight"] < 16
    assert r["quality"] is None and "macOS" in r["quality_note"]
    assert {"iphone-15-pro", "apple-m2"} <= set(r["targets"])
    for p in r["targets"].values():
        assert p["decode_tok_s"] > 0 and p["peak_memory_bytes"] > r["size_bytes"] and not p["calibrated"]
    table = run_cli("profile", str(out), env={"COLUMNS": "200"})
    assert table.returncode == 0 and "not measured" in table.stdout and "iphone-15-pro" in table.stdout


# ---------------------------------------------------------------- sentence encoder (tiny BERT)

from tests.test_encoder import TEXTS, tiny_bert  # noqa: E402,F401 (a fixture: a random 2-layer BERT directory)


@pytest.mark.parametrize("quant", ["int8", "ternary"])
def test_encoder_converts_bit_exact(tiny_bert, tmp_path, quant):  # noqa: F811
    from edgekit.pipeline import ConvertRequest, convert

    out = tmp_path / "out"
    manifest = convert(ConvertRequest(str(tiny_bert), "coreml", quant, out))
    checks = manifest["artifact"]["package_checks"]
    assert checks["weights"]["bit_exact"] and checks["weights"]["tensors"] == 13  # embedding + 2 x 6 matrices
    assert checks["weights"]["stored_as"] == ({"int8": 13} if quant == "int8" else {"int8": 1, "lut2": 12})
    ops = checks["op_counts"]
    assert ops["linear"] == 12
    assert ops.get("constexpr_lut_to_dense", 0) == (12 if quant == "ternary" else 0)
    assert checks["interface"]["outputs"]["sentence_embedding"]["dtype"] == "FLOAT32"
    assert set(checks["interface"]["inputs"]) == {"input_ids", "attention_mask"}
    if sys.platform != "darwin":
        assert manifest["validation"] == {"passed": None, "why": manifest["validation"]["why"]}
        assert "macOS" in manifest["validation"]["why"]
    assert manifest["size_bytes"] > 0 and {p.name for p in out.iterdir()} >= {"model.mlpackage", "manifest.json"}


@pytest.mark.macos
@pytest.mark.skipif(sys.platform != "darwin", reason="needs Core ML's runtime, which exists only on macOS")
def test_encoder_embeddings_match_reference_on_macos(tiny_bert, tmp_path):  # noqa: F811
    import edgekit
    from edgekit.pipeline import ConvertRequest, convert
    from edgekit.encoder import EncoderReference, load_encoder

    out = tmp_path / "out"
    convert(ConvertRequest(str(tiny_bert), "coreml", "fp16", out))
    want = EncoderReference(load_encoder(str(tiny_bert))).embed(TEXTS)
    with edgekit.load(out) as s:
        got = s.embed(TEXTS)
    assert (np.sum(got * want, axis=1) > 0.999).all()


# ---------------------------------------------------------------- numeric checks on macOS only


@pytest.mark.macos
@pytest.mark.skipif(sys.platform != "darwin", reason="needs Core ML's runtime, which exists only on macOS")
@pytest.mark.parametrize("name,overrides,kind",
                         [pytest.param(*a.values, k, id=f"{a.id}-{k}") for a in ARCHS for k in ("f16", "int4")]
                         + [pytest.param("llama", {}, k, id=f"llama-{k}") for k in ("int8", "ternary")])
def test_coreml_logits_match_traced_module(tmp_path, name, overrides, kind):
    """Core ML's logits (chunked prefill through the state, then decoding) equal the traced module's on the
    weights as the package stores them, within fp16 arithmetic, for every architecture."""
    from edgekit.runtimes.coreml import CoreMLSession

    m, _ = edgekit_model(name, seed=2, **overrides)
    encode(m, lambda n: "int8" if n in (L.EMBED, L.HEAD) else kind)
    export(m, tmp_path, context=CTX)
    stored = ctorch.as_stored(m)
    want = ctorch.reference_logits(stored, IDS, CTX)
    with CoreMLSession(tmp_path / "model.mlpackage", compute_units="cpu_only", n_batch=16) as s:
        got = s.logits(IDS)  # three calls through the state: 16 + 16 + 8 tokens
        toks = list(s.stream_tokens(IDS[:5], 4, ignore_eos=True))
    assert np.abs(got - want).max() < 2e-2 * np.abs(want).max()
    assert toks[0] == int(ctorch.reference_logits(stored, IDS[:5], CTX)[-1].argmax())


@pytest.mark.macos
@pytest.mark.skipif(sys.platform != "darwin", reason="needs Core ML's runtime, which exists only on macOS")
def test_cli_convert_validates_on_macos(converted):
    _, manifest = converted
    assert manifest["validation"]["passed"] is True and manifest["quality"]["kld_mean"] < 0.6


@pytest.mark.e2e
@pytest.mark.slow  # ~3 min: GPTQ of SmolLM2 and a full Core ML conversion
def test_default_model_int4_coreml(tmp_path):
    """SmolLM2 at int4 (~2-4 min, 2.5 GB peak): every tensor stored as the recipe says, bit for bit."""
    from edgekit.pipeline import ConvertRequest, convert

    manifest = convert(ConvertRequest(None, "coreml", "int4", tmp_path / "out"))
    checks = manifest["artifact"]["package_checks"]["weights"]
    assert checks["bit_exact"] and checks["tensors"] == 211 + 61  # 30 x 7 matrices + the embedding; 30 x 2 + 1 norms
    assert set(checks["stored_as"]) <= {"int4", "int8", "fp16"} and checks["stored_as"]["fp16"] == 61
    assert manifest["size_bytes"] < 120e6
