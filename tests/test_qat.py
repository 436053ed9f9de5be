"""Quantization-aware training, the IQ4_NL codebook and self-generated calibration, on tiny models built in code."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import tiny_model
from edgekit.model import BlockCodebook, BlockQuant, Model
from edgekit.passes import PassContext


def seqs(n: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [list(map(int, rng.integers(0, 3000, length))) for _ in range(n)]


def copy_model(m: Model) -> Model:
    return Model(m.spec, dict(m.tensors), m.tokenizer, m.name, dict(m.encodings))


def kld_to(reference: Model, model: Model, windows: list[list[int]]) -> float:
    from edgekit.architectures.torch_decoder import DecoderNet
    from edgekit.qat import kld

    ref, net = DecoderNet(reference).eval(), DecoderNet(model, effective=True).eval()
    with torch.inference_mode():
        ids = torch.tensor(windows)
        return float(kld(net(ids), torch.log_softmax(ref(ids), -1)))


def test_grids_round_to_their_own_values():
    from edgekit.qat import GRIDS, IQ4_NL_LEVELS

    x = torch.tensor([-200.0, -127.0, -116.0, -115.0, 0.0, 6.9, 7.1, 112.0, 500.0])
    nl = GRIDS["nl4"]
    v = nl.values(nl.codes(x.clamp(-127, 113)))
    levels = torch.tensor(IQ4_NL_LEVELS, dtype=torch.float32)
    want = levels[(x.clamp(-127, 113)[:, None] - levels[None, :]).abs().argmin(1)]
    assert torch.equal(v, want)
    i4 = GRIDS["int4"]
    assert i4.codes(torch.tensor([-9.0, -7.6, 0.4, 6.6, 9.0])).tolist() == [-8, -8, 0, 7, 7]
    assert GRIDS["ternary"].block_for(576) == 64 and GRIDS["ternary"].block_for(1536) == 256


@pytest.mark.parametrize("grid", ["int4", "nl4", "ternary"])
def test_fake_quant_forward_is_what_gets_stored(grid):
    """The trained forward pass computes exactly the numbers the exporters pack (fp16 scales included)."""
    from edgekit.qat import GRIDS, FakeQuant

    g = GRIDS[grid]
    rng = np.random.default_rng(0)
    w = torch.from_numpy(rng.standard_normal((16, 128)).astype(np.float32) * 0.05)
    block = g.block_for(128)
    scales = w.reshape(16, -1, block).abs().amax(-1) / (7 if g.levels is None else 113) + 1e-3
    fq = FakeQuant(g, scales)
    forward = fq(w).detach().numpy()
    q, s = fq.stored(w)
    if g.levels is None:
        stored = BlockQuant(q, s, g.bits, block).dequantize()
    else:
        stored = BlockCodebook(q.astype(np.uint8), s, np.array(g.levels, np.int8), block, g.name_codebook).dequantize()
    np.testing.assert_array_equal(forward, stored)


def test_nl4_beats_int4_on_layer_output_error():
    """GPTQ on IQ4_NL's denser-near-zero grid loses less than on int4's uniform one, same 4.5 bits."""
    from edgekit.passes.int4 import gptq_quantize
    from edgekit.qat import GRIDS

    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    x = torch.from_numpy(rng.standard_normal((2048, 256)).astype(np.float32))
    H = (x.T @ x).double() / len(x)

    def err(enc):
        d = torch.from_numpy((w - enc.dequantize()).astype(np.float64))
        return float(((d @ H) * d).sum())

    nl = gptq_quantize(w, H, grid=GRIDS["nl4"])
    assert isinstance(nl, BlockCodebook) and nl.bits_per_weight == 4.5
    assert err(nl) < 0.9 * err(gptq_quantize(w, H))


def _student(ref: Model, factor: float):
    """A DecoderNet of ``ref`` whose linears carry int4 fake quantizers with Q4_0 scales times ``factor``."""
    from edgekit.architectures.torch_decoder import DecoderNet
    from edgekit.passes.rtn import quantize_q4_0
    from edgekit.qat import GRIDS, FakeQuant

    net = DecoderNet(ref)
    quants = {}
    for n in ref.linear_names():
        if n != ref.output_head_name():
            s = quantize_q4_0(ref.tensors[n]).scales.astype(np.float32) * factor
            quants[n] = FakeQuant(GRIDS["int4"], torch.from_numpy(s))
    for blk in net.blocks:
        for lin in blk.lin.values():
            lin.weight_fns = {n: quants[n] for n in lin.names if n in quants}
    return net, quants


@pytest.mark.slow
def test_blockwise_training_recovers_from_bad_step_sizes():
    """Step sizes 40% too large cost layer error; block-wise training must win part of it back."""
    from edgekit.architectures.torch_decoder import DecoderNet
    from edgekit.passes.recovery import recovery_windows as windows_of
    from edgekit.qat import blockwise, split_validation

    ref = tiny_model(seed=5)
    train, val = split_validation(windows_of(seqs(16, 128, seed=1), 64))
    net, quants = _student(ref, 1.4)
    rec = blockwise(net, DecoderNet(ref).eval(), quants, train, val, 4.0, 1e-4, 1e-3, 4, torch.device("cpu"))
    assert rec["layers_kept"] == 2 and rec["val_mse_ratio_median"] > 1.2, rec
    assert all(q.codes is not None for q in quants.values())  # integers frozen for the next stage


@pytest.mark.parametrize("lr_weights", [0.0, 1e-3])
def test_end_to_end_trains_and_keeps_the_best_state(lr_weights):
    """Step sizes (and, with a weight rate, the latent weights: integers move where the KL asks) train;
    the state kept is the one the record reports."""
    from edgekit.architectures.torch_decoder import DecoderNet
    from edgekit.passes.recovery import recovery_windows as windows_of
    from edgekit.qat import end_to_end, kld, split_validation, teacher_logprobs

    ref = tiny_model(seed=5)
    train, val = split_validation(windows_of(seqs(16, 128, seed=1), 64))
    net, quants = _student(ref, 1.4)
    for n, q in quants.items():
        q.freeze(net.param(n))
    teacher = DecoderNet(ref).eval()
    t_val = teacher_logprobs(teacher, val, "cpu")
    rec = end_to_end(net, quants, train, val, teacher_logprobs(teacher, train, "cpu"), t_val, 40, 3e-3, 2, "cpu",
                     lr_weights=lr_weights)
    assert rec["val_kld_after"] < 0.95 * rec["val_kld_before"], rec
    if lr_weights:
        assert 0 < rec["integers_changed"] < 0.5, rec
    else:
        assert rec["integers_changed"] is None
    assert all(q.codes is not None for q in quants.values())
    with torch.inference_mode():
        got = float(kld(net(torch.tensor(val)), t_val))
    assert got == pytest.approx(rec["val_kld_after"], rel=1e-4)


def test_int8_activations_round_as_llama_cpp_q8_0():
    """The activation quantizer QAT trains through is llama.cpp's Q8_0 rounding, bit for bit (gguf's
    reference implementation), and passes gradients straight through."""
    import gguf

    from edgekit.qat import int8_activations

    rng = np.random.default_rng(2)
    x = (rng.standard_normal((3, 5, 64)) * rng.uniform(0.01, 10, (3, 5, 1))).astype(np.float32)
    x[0, 0, :32] = 0.0  # an all-zero block stays zero
    xt = torch.from_numpy(x).requires_grad_(True)
    y = int8_activations(32)(xt)
    want = gguf.dequantize(gguf.quantize(x.reshape(-1, 64), gguf.GGMLQuantizationType.Q8_0),
                           gguf.GGMLQuantizationType.Q8_0).reshape(x.shape)
    np.testing.assert_array_equal(y.detach().numpy(), want)
    assert not np.array_equal(want, x)
    y.sum().backward()
    assert torch.equal(xt.grad, torch.ones_like(xt))


@pytest.mark.slow
def test_qat_pass_stores_int4_blocks_that_compute_what_it_trained():
    from edgekit.passes.qat import QATPass

    ref = tiny_model(seed=5)
    calib = seqs(12, 128, seed=1)
    trained = copy_model(ref)
    rec = QATPass(window=64, epochs=2.0, e2e_steps=8).apply(trained, PassContext(calibration_tokens=lambda: calib,
                                                                                  reference=ref))
    for n in trained.linear_names():
        enc = trained.encodings[n]
        assert isinstance(enc, BlockQuant) and enc.block_size == 32
        assert enc.bits == (8 if n == trained.output_head_name() else 4)
    assert rec["blockwise"]["layers"] == 2 and rec["grid"] == "int4" and rec["init"].startswith("post-training")
    from edgekit.passes.recovery import recovery_windows as windows_of
    from edgekit.qat import split_validation

    _, val = split_validation(windows_of(calib, 64))
    assert kld_to(ref, trained, val) == pytest.approx(rec["end_to_end"]["val_kld_after"], rel=1e-3)


@pytest.mark.slow
def test_ternary_qat_beats_post_training_ternary():
    from edgekit.passes.qat import QATPass
    from edgekit.passes.ternary import TernaryPass

    ref = tiny_model(seed=6)
    calib = seqs(12, 128, seed=3)
    ctx = PassContext(calibration_tokens=lambda: calib, reference=ref)
    ptq = copy_model(ref)
    TernaryPass().apply(ptq, ctx)
    trained = copy_model(ref)
    QATPass(grid="ternary", window=64, epochs=6.0, e2e_steps=20).apply(trained, ctx)
    assert {int(v) for n in trained.linear_names() if n != trained.output_head_name()
            for v in np.unique(trained.encodings[n].q)} <= {-1, 0, 1}
    held_out = seqs(4, 64, seed=4)
    # a random tiny model gains little (the embedded model's figures are in bench_quality); it must not lose
    assert kld_to(ref, trained, held_out) < kld_to(ref, ptq, held_out)


def test_nl4_gguf_holds_the_codebook_bit_for_bit(tmp_path):
    """IQ4_NL blocks written by edgekit read back through gguf's own dequantizer exactly, and llama.cpp runs them."""
    from edgekit.converters.gguf import GGUFExporter
    from edgekit.converters.gguf_layout import read_gguf_model
    from edgekit.passes.nl4 import NL4Pass
    from edgekit.reference import TorchReference
    from edgekit.runtimes.llamacpp import LlamaCppSession

    m = tiny_model(seed=7)
    NL4Pass().apply(m, PassContext(calibration_tokens=lambda: seqs(4, 64, 1)))
    assert isinstance(m.encodings["layers.0.attn.q.weight"], BlockCodebook)
    GGUFExporter().export(m, tmp_path)
    back = read_gguf_model(tmp_path / "model.gguf")
    for n in m.linear_names():
        assert np.array_equal(back.tensors[n], m.effective_weight(n)), n
    ids = list(range(100, 164))
    eff = copy.copy(m)
    eff.tensors = {n: m.effective_weight(n) for n in m.tensors}
    eff.encodings = {}
    want = TorchReference(eff).logits(ids)
    with LlamaCppSession(tmp_path / "model.gguf", n_ctx=128) as s:
        got = s.logits(ids)
    # llama.cpp quantizes activations to 8 bits for 4-bit matmuls: int4 (Q4_0) measures the same 4-5% here
    assert np.abs(got - want).max() / np.abs(want).max() < 0.08
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.9


def test_codebook_grid_refused_by_onnx_before_any_work(tmp_path):
    from edgekit.errors import EdgekitError
    from edgekit.pipeline import ConvertRequest, convert
    from edgekit import recipes

    for recipe in (recipes.from_flags("nl4"), recipes.from_flags("qat", storage_params={"grid": "nl4"})):
        with pytest.raises(EdgekitError, match="uniform integer grids") as exc:
            convert(ConvertRequest(None, "onnx", None, tmp_path / "x", recipe=recipe))
        assert "--format gguf" in exc.value.one_line() and "\n" not in exc.value.one_line()
    assert not (tmp_path / "x").exists()
    with pytest.raises(EdgekitError, match="qat grid 'int3' is not one of"):
        convert(ConvertRequest(None, "gguf", None, tmp_path / "x", recipe=recipes.from_flags("qat", storage_params={"grid": "int3"})))


def test_calibration_mixes_text_with_cached_float_model_samples(tmp_path, monkeypatch):
    from edgekit import calibration as cal
    from tiny_archs import save_hf_dir
    from edgekit.sources import resolve

    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache"))
    save_hf_dir("llama", tmp_path / "m")
    src = resolve(str(tmp_path / "m"))
    s = cal.GenerationSettings(samples=3, new_tokens=16)
    first = cal.generated_sequences(src, s)
    assert len(first) == 3 and all(len(x) > 16 for x in first)
    assert list(cal.cache_dir("calibration").glob("*.json"))
    assert cal.generated_sequences(src, s) == first  # the cache, seeded
    assert cal.generated_sequences(src, cal.GenerationSettings(samples=3, new_tokens=16, seed=1)) != first
    mixed = cal.mix([[1], [2]], [[10], [20], [30]])
    assert mixed == [[1], [10], [2], [20], [30]]


def test_generated_calibration_default_comes_from_the_environment(monkeypatch):
    from edgekit import calibration as cal
    from edgekit.errors import InputError
    from edgekit.kinds import Texts

    monkeypatch.delenv(cal.ENV_VAR, raising=False)
    assert cal.default_tokens() == cal.DEFAULT_TOKENS == 12288
    monkeypatch.setenv(cal.ENV_VAR, "2048")
    assert cal.default_tokens() == 2048 and Texts(None, None).calib_generated == 2048
    monkeypatch.setenv(cal.ENV_VAR, "lots")
    with pytest.raises(InputError, match="EDGEKIT_CALIB_GENERATED"):
        cal.default_tokens()
