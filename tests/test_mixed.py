"""Mixed precision under a size budget (``--target-bpw``): allocation, budgets, formats, refusals."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from conftest import tiny_model
from edgekit.model import BlockQuant, Cast, Model
from edgekit.passes import PassContext
from edgekit.passes.mixed import MixedPass, allocate, storage_bpw


def seqs(n: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [list(map(int, rng.integers(0, 3000, length))) for _ in range(n)]


def test_allocation_is_the_knapsack_optimum_on_a_small_case():
    rng = np.random.default_rng(0)
    sizes = {f"t{k}": int(s) for k, s in enumerate(rng.integers(1, 20, 6) * 32)}
    widths = ((2, 32), (4, 64), (4, 32), (8, 32))
    costs = {n: {(2, 32): float(rng.uniform(5, 10)), (4, 64): float(rng.uniform(2, 5)), (4, 32): float(rng.uniform(1, 4)),
                 (8, 32): float(rng.uniform(0, 0.5))} for n in sizes}
    for target in (3.0, 4.25, 5.5, 7.0):
        budget = target * sum(sizes.values())
        got = allocate(sizes, costs, budget)
        used = sum(sizes[n] * storage_bpw(b) for n, b in got.items())
        assert used <= budget
        best = min((sum(costs[n][b] for n, b in zip(sizes, combo)), combo)
                   for combo in itertools.product(widths, repeat=len(sizes))
                   if sum(sizes[n] * storage_bpw(b) for n, b in zip(sizes, combo)) <= budget)
        # the dynamic programme finds the exhaustive optimum here (up to its rounding of bits)
        assert sum(costs[n][b] for n, b in got.items()) <= best[0] * 1.001 + 1e-9


def test_allocation_refuses_a_budget_below_the_smallest_widths():
    with pytest.raises(ValueError):
        allocate({"a": 32}, {"a": {(4, 32): 1.0, (8, 32): 0.0}}, 32 * 4.0)


def small_vocab(seed: int) -> Model:
    """A tiny model whose linears, not its embedding, hold most weights (as in real models)."""
    return tiny_model(seed=seed, vocab_size=3072, hidden_size=128, intermediate_size=256, num_heads=8, head_dim=16)


def _run(model: Model, bpw: float, bits=(2, 4, 8), blocks=(32, 64, 128)) -> dict:
    calib = seqs(6, 128, seed=1)
    options = {"mixed_bits": bits, "blocks": blocks, "format": "onnx"}
    return MixedPass(bpw=bpw, windows=4).apply(model, PassContext(calibration_tokens=lambda: calib, options=options))


def _label(enc) -> str:
    return "fp16" if isinstance(enc, Cast) else f"int{enc.bits}/g{enc.block_size}"


def assert_onnx_computes_what_torch_does(m: Model, out) -> None:
    """Export ``m`` to ONNX and check ONNX Runtime's logits against torch's on the same numbers."""
    from edgekit.converters.onnx import ONNXExporter
    from edgekit.reference import TorchReference
    from edgekit.runtimes.onnxruntime import OnnxRuntimeSession

    out.mkdir()
    ONNXExporter(0).export(m, out)  # accuracy_level 0: float activations, exact products
    eff = Model(m.spec, {n: m.effective_weight(n) for n in m.tensors}, m.tokenizer, m.name)
    ids = list(range(200, 248))
    want = TorchReference(eff).logits(ids)
    with OnnxRuntimeSession(out / "model.onnx") as s:
        got = s.logits(ids)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


@pytest.mark.parametrize("bpw", [3.8, 4.25, 6.0])
def test_budget_is_kept_and_each_choice_recorded(bpw):
    m = small_vocab(3)
    rec = _run(m, bpw)
    names = m.linear_names()
    used = sum(m.tensors[n].size * m.encoding(n).bits_per_weight for n in names) / sum(m.tensors[n].size for n in names)
    assert used <= bpw + 1e-9 and rec["bpw"] == pytest.approx(used, abs=1e-3)
    assert set(rec["choices"]) == set(names)
    for n in names:
        assert isinstance(m.encoding(n), (Cast, BlockQuant)) and _label(m.encoding(n)) == rec["choices"][n], n
    assert not rec["choices"][m.output_head_name()].startswith("int2")  # the head never goes to 2 bits
    if bpw < 4.2:
        assert any(w.startswith("int2") for w in rec["tensors_per_width"])
    # the larger blocks ONNX holds are used where they pay (4.25 / 4.125-bit 4-bit tensors)
    if bpw == 4.25:
        assert any(w in ("int4/g64", "int4/g128", "int2/g64", "int2/g128") for w in rec["tensors_per_width"])


def test_more_bits_buy_less_error():
    from edgekit.architectures.torch_decoder import DecoderNet
    from edgekit.qat import kld
    import torch

    ref = small_vocab(4)
    held = torch.tensor(seqs(3, 64, seed=9))
    with torch.inference_mode():
        lp = torch.log_softmax(DecoderNet(ref)(held), -1)
    errs = []
    for bpw in (3.8, 4.5, 6.0):
        m = small_vocab(4)
        _run(m, bpw)
        with torch.inference_mode():
            errs.append(float(kld(DecoderNet(m, effective=True)(held), lp)))
    assert errs[0] > errs[1] > errs[2]


def test_gguf_floor_is_one_line_naming_onnx():
    from edgekit.errors import InputError

    m = small_vocab(3)
    with pytest.raises(InputError) as exc:
        _run(m, 4.25, bits=(4, 8), blocks=(32,))
    line = exc.value.one_line()
    assert "4.5" in line and "--format onnx" in line and "\n" not in line


def test_mixed_widths_export_to_onnx_and_gguf_bit_for_bit(tmp_path):
    """A mixed model's 2 / 4 / 8-bit tensors land in ONNX MatMulNBits of each width, and ONNX Runtime
    computes what torch computes with the same numbers; GGUF (4 / 8 only) reads back exactly."""
    from edgekit.converters.gguf import GGUFExporter
    from edgekit.converters.gguf_layout import read_gguf_model

    m = tiny_model(seed=5)
    rec = _run(m, 4.22)  # the embedding is most of this model: just above its floor some tensors go to 2 bits
    held = [w for w in rec["tensors_per_width"] if w.startswith("int")]
    assert {"2", "4"} <= {w[3] for w in held} and {"g32", "g64"} <= {w.split("/")[1] for w in held}
    assert_onnx_computes_what_torch_does(m, tmp_path / "onnx")

    g = tiny_model(seed=5)
    _run(g, 5.0, bits=(4, 8), blocks=(32,))
    (tmp_path / "gguf").mkdir()
    GGUFExporter().export(g, tmp_path / "gguf")
    back = read_gguf_model(tmp_path / "gguf" / "model.gguf")
    for n in g.linear_names():
        assert np.array_equal(back.tensors[n], g.effective_weight(n)), n


def test_target_bpw_flag_conflicts_are_one_line(tmp_path):
    from typer.testing import CliRunner

    from edgekit.cli import app

    r = CliRunner().invoke(app, ["convert", "--target-bpw", "4.25", "--quant", "int4", "-o", str(tmp_path / "x")])
    assert r.exit_code != 0 and "--target-bpw" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x").exists()


def test_embedded_model_below_the_gguf_floor_is_refused_before_calibration(tmp_path):
    """4.25 bits per weight is below what GGUF holds for the embedded model (Q4_0 everywhere is 4.5):
    one line naming ONNX, before any calibration or sensitivity work, and nothing written."""
    from edgekit import recipes
    from edgekit.errors import EdgekitError
    from edgekit.pipeline import ConvertRequest, convert

    with pytest.raises(EdgekitError) as exc:
        convert(ConvertRequest(None, "gguf", None, tmp_path / "x",
                               recipe=recipes.from_flags("mixed", storage_params={"bpw": 4.25})))
    line = exc.value.one_line()
    assert "4.25" in line and "4.500" in line and "--format onnx" in line and "\n" not in line
    assert not (tmp_path / "x").exists()


def test_int4_in_blocks_of_64_lands_in_onnx_and_is_refused_by_gguf_first(tmp_path):
    """int4 ``block`` 64 (4.25 bits per weight) exports to ONNX MatMulNBits with that block; GGUF (Q4_0: blocks
    of 32 only) refuses it in one line naming ONNX before any calibration, and writes nothing."""
    from edgekit import recipes
    from edgekit.errors import EdgekitError
    from edgekit.passes.int4 import Int4Pass
    from edgekit.pipeline import ConvertRequest, convert

    m = small_vocab(6)
    calib = seqs(6, 128, seed=2)
    rec = Int4Pass(block=64, head="int4").apply(m, PassContext(calibration_tokens=lambda: calib))
    assert rec["block_size"] == 64
    assert {m.encoding(n).block_size for n in m.linear_names()} == {64}
    assert m.weights_bpw() == pytest.approx(4.25)
    assert_onnx_computes_what_torch_does(m, tmp_path / "onnx")

    with pytest.raises(EdgekitError) as exc:
        convert(ConvertRequest(None, "gguf", None, tmp_path / "x",
                               recipe=recipes.Recipe("int4", [{"pass": "int4", "block": 64}])))
    line = exc.value.one_line()
    assert "64" in line and "--format onnx" in line and "\n" not in line
    assert not (tmp_path / "x").exists()


def test_min_bits_keeps_every_tensor_at_or_above_it():
    m = small_vocab(3)
    calib = seqs(6, 128, seed=1)
    options = {"mixed_bits": (2, 4, 8), "blocks": (32, 64, 128), "format": "onnx"}
    rec = MixedPass(bpw=4.2, windows=4, min_bits=4).apply(m, PassContext(calibration_tokens=lambda: calib, options=options))
    assert rec["tensors_per_width"] and not any(w.startswith("int2") for w in rec["tensors_per_width"])
    assert all(m.encoding(n).bits >= 4 for n in m.linear_names() if isinstance(m.encoding(n), BlockQuant))


def test_int4_block_that_does_not_divide_a_layer_is_one_line_before_calibration():
    from edgekit.errors import InputError
    from edgekit.passes.int4 import Int4Pass

    m = tiny_model(seed=1)  # 64-wide rows: blocks of 128 cannot tile them

    def no_calibration():
        raise AssertionError("calibration must not start")

    with pytest.raises(InputError) as exc:
        Int4Pass(block=128).apply(m, PassContext(calibration_tokens=no_calibration))
    assert "128" in exc.value.one_line() and "\n" not in exc.value.one_line()
