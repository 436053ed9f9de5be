"""Compression recipes end to end on the embedded SmolLM2-135M: one recipe per pass, through the CLI."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli

pytestmark = pytest.mark.e2e


@pytest.mark.slow  # pruning with distillation recovery on SmolLM2
def test_prune_with_recovery_to_gguf(tmp_path):
    out = tmp_path / "p"
    r = run_cli("convert", "--prune", "0.25", "--recover", "6", "--quant", "q8_0", "--out", str(out), "--json",
                "--calib-tokens", "1024")
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout)
    prune, q8 = m["recipe"]["passes"]
    assert prune["pass"] == "prune" and prune["uniform"] is True  # GGUF: one width for every layer
    assert prune["parameters_after"] < prune["parameters_before"]
    assert set(prune["mlp_widths"]) == {1152} and len(prune["recovery"]["loss_curve"]) == 6
    for p in (prune, q8):
        assert p["quality_after"]["kld_mean"] > 0
    assert m["validation"]["passed"] and "consistency" in m["validation"]["criterion"]
    # the artifact runs in llama.cpp and computes what torch computed for the pruned model
    assert abs(m["quality"]["kld_mean"] - q8["quality_after"]["kld_mean"]) < 0.03
    import edgekit

    with edgekit.load(out) as s:
        assert len(s.generate("def fibonacci(n):", max_tokens=8)) > 0


@pytest.mark.slow  # a full-size ternary conversion of SmolLM2 (~70 s): make test stays under 30 min
def test_ternary_without_recovery_warns_and_packs_tq2_0(tmp_path):
    out = tmp_path / "t"
    r = run_cli("convert", "--quant", "ternary", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "WARNING" in r.stderr and "broken" in r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["warnings"] and m["quality"]["kld_mean"] > 1.0
    types = m["artifact"]["tensor_types"]
    assert types["TQ2_0"] == 30  # the 1536-wide ffn_down rows fit 256-value blocks
    assert len(m["artifact"]["ternary_fallback"]["tensors"]) == 30 * 6  # the 576-wide rows: exact Q4_0 blocks
    assert m["bits_per_weight"] < 6.0


def test_lowrank_refused_by_gguf_in_one_line(tmp_path):
    out = tmp_path / "l"
    r = run_cli("convert", "--rank", "0.5", "--out", str(out))
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and "low-rank" in r.stderr and "onnx" in r.stderr
    assert not out.exists()
