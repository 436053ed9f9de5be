"""Quantizer numbers, and their packing into GGUF blocks compared bit for bit with gguf's own code."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from edgekit.converters.gguf import pack_q4_0, pack_q8_0
from edgekit.model import BlockQuant
from edgekit.passes.int4 import gptq_quantize, layer_output_error
from edgekit.passes.rtn import quantize_q4_0, quantize_q8_0


def weights(rows=48, cols=256, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[rng.random(w.shape) < 0.02] *= 8
    w[0, :32] = 0.0  # an all-zero block
    w[1, :32] = 1.5  # a constant block
    return w


def test_q4_0_bytes_equal_gguf_quantizer():
    w = weights()
    assert np.array_equal(pack_q4_0(quantize_q4_0(w)), quantize(w, T.Q4_0))


def test_q8_0_bytes_equal_gguf_quantizer():
    w = weights(seed=1)
    assert np.array_equal(pack_q8_0(quantize_q8_0(w)), quantize(w, T.Q8_0))


@pytest.mark.parametrize("quantizer,qtype,packer", [(quantize_q4_0, T.Q4_0, pack_q4_0), (quantize_q8_0, T.Q8_0, pack_q8_0)])
def test_dequantize_matches_gguf_bit_for_bit(quantizer, qtype, packer):
    bq = quantizer(weights(seed=2))
    ours = bq.dequantize()
    theirs = dequantize(packer(bq), qtype)
    assert ours.shape == theirs.shape
    assert np.array_equal(ours, theirs)


def test_round_trip_error_is_bounded_by_half_a_step():
    w = weights(seed=3)
    bq = quantize_q8_0(w)
    step = np.repeat(bq.scales.astype(np.float32), 32, axis=1)
    assert np.all(np.abs(bq.dequantize() - w) <= 0.5 * np.abs(step) + 1e-3 * np.abs(w))


def test_block_quant_rejects_out_of_range_integers():
    with pytest.raises(ValueError):
        BlockQuant(np.full((1, 32), 8, np.int8), np.ones((1, 1), np.float16), bits=4, block_size=32)
    with pytest.raises(ValueError):
        BlockQuant(np.zeros((1, 48), np.int8), np.ones((1, 1), np.float16), bits=4, block_size=32)


def correlated_inputs(cols=256, n=4096, seed=0):
    import torch

    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((cols, cols)) * 0.3 + np.eye(cols)
    scale = np.exp(rng.standard_normal(cols))  # some input channels matter much more than others
    x = (rng.standard_normal((n, cols)) @ mix) * scale
    return torch.from_numpy(x.T @ x / n)


def test_gptq_int4_beats_round_to_nearest_on_output_error():
    w = weights(rows=64, cols=256, seed=4)
    H = correlated_inputs()
    bq = gptq_quantize(w, H)
    assert bq.bits == 4 and bq.block_size == 32 and bq.q.dtype == np.int8
    assert bq.q.min() >= -8 and bq.q.max() <= 7 and bq.scales.dtype == np.float16
    err_rtn = layer_output_error(w, quantize_q4_0(w), H)
    err_int4 = layer_output_error(w, bq, H)
    assert err_int4 < 0.7 * err_rtn, (err_int4, err_rtn)


def test_gptq_int4_packs_into_q4_0_exactly():
    w = weights(rows=16, cols=128, seed=5)
    bq = gptq_quantize(w, correlated_inputs(cols=128))
    assert np.array_equal(dequantize(pack_q4_0(bq), T.Q4_0), bq.dequantize())


def test_int4_head_option_quantizes_the_tied_head_to_4_bits_and_exports(tmp_path):
    """head = "int4": the tied embedding / head in Q4_0 blocks (GPTQ on the final norm's output), packed by GGUF and
    ONNX like any 4-bit matrix; the default keeps it Q8_0; anything else is a recipe error."""
    from edgekit import recipes
    from edgekit.errors import InputError
    from edgekit.model import BlockQuant
    from edgekit.passes import PassContext
    from edgekit.passes.int4 import Int4Pass
    from tests.conftest import tiny_model

    with pytest.raises(InputError, match="head must be one of"):
        recipes.check(recipes.Recipe("x", [{"pass": "int4", "head": "int2"}]))
    seqs = [list(np.random.default_rng(k).integers(0, 2000, 64)) for k in range(4)]
    m = tiny_model()
    rec = Int4Pass(head="int4").apply(m, PassContext(calibration_tokens=lambda: seqs))
    head = m.encodings[m.output_head_name()]
    assert rec["output_head"] == "int4" and isinstance(head, BlockQuant) and head.bits == 4
    d = tiny_model()
    Int4Pass().apply(d, PassContext(calibration_tokens=lambda: seqs))
    assert d.encodings[d.output_head_name()].bits == 8
    import edgekit
    from edgekit.converters.gguf import GGUFExporter
    from edgekit.converters.onnx import ONNXExporter

    import torch

    from edgekit.architectures.torch_decoder import DecoderNet

    ids = list(range(100, 120))
    with torch.inference_mode():  # the dequantized numbers, computed in torch
        want = DecoderNet(m, effective=True)(torch.tensor([ids]))[0].numpy()
    for exp, fmt in ((GGUFExporter(), "gguf"), (ONNXExporter(), "onnx")):
        (tmp_path / fmt).mkdir()
        exp.export(m, tmp_path / fmt)
        with edgekit.load(tmp_path / fmt / f"model.{fmt}", check_memory=False) as s:
            got = s.logits(ids)
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < 0.03, (fmt, err)
