"""Compression passes on tiny models built in code: pruning, low-rank, ternary, recovery, recipes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_model
from edgekit.errors import EdgekitError, InputError
from edgekit.model import BlockQuant, Model
from edgekit.passes import PassContext

RNG = np.random.default_rng(0)


def calib_seqs(n: int = 4, length: int = 64) -> list[list[int]]:
    rng = np.random.default_rng(1)
    return [list(rng.integers(0, 2000, length)) for _ in range(n)]


def ctx(**kw) -> PassContext:
    return PassContext(calibration_tokens=lambda: calib_seqs(), **kw)


def logits(model: Model, ids: list[int], effective: bool = True) -> np.ndarray:
    from edgekit.architectures.torch_decoder import DecoderNet

    with torch.inference_mode():
        return DecoderNet(model, effective=effective)(torch.tensor([ids]))[0].numpy()


def copy_model(m: Model) -> Model:
    return Model(m.spec, dict(m.tensors), m.tokenizer, m.name, dict(m.encodings))


IDS = list(range(100, 140))


def test_torch_decoder_matches_transformers():
    from edgekit.reference import TorchReference

    m = tiny_model()
    want = TorchReference(m).logits(IDS)
    np.testing.assert_allclose(logits(m, IDS), want, atol=1e-4, rtol=1e-4)


def test_prune_removes_parameters_and_equals_masking():
    from edgekit.passes.prune import PrunePass
    from edgekit.architectures.torch_decoder import DecoderNet

    m = tiny_model(intermediate_size=256)
    before = m.num_parameters()
    pruned = copy_model(m)
    rec = PrunePass(mlp=0.25, heads=0.5, uniform=True).apply(pruned, ctx())
    assert pruned.num_parameters() < before and rec["parameters_after"] == pruned.num_parameters()
    for i in range(m.spec.num_layers):
        w = pruned.layer_widths(i)
        assert w == {"heads": 2, "kv_heads": 2, "intermediate": 192}
    assert pruned.spec.intermediate_size == 192 and pruned.spec.num_heads == 2 and pruned.is_uniform()
    # the physically smaller model computes exactly what the masked full model computes
    net = DecoderNet(m)
    for blk, i in zip(net.blocks, range(m.spec.num_layers)):
        gate_full, gate_pruned = m.tensors[f"layers.{i}.mlp.gate.weight"], pruned.tensors[f"layers.{i}.mlp.gate.weight"]
        kept = [int(np.flatnonzero((gate_full == row).all(1))[0]) for row in gate_pruned]
        mask = torch.zeros(gate_full.shape[0])
        mask[kept] = 1
        blk.mlp_mask = mask
        q_full, q_pruned = m.tensors[f"layers.{i}.attn.q.weight"], pruned.tensors[f"layers.{i}.attn.q.weight"]
        hd = m.spec.head_dim
        heads = [int(np.flatnonzero((q_full[::hd] == row).all(1))[0]) for row in q_pruned[::hd]]
        hm = torch.zeros(m.spec.num_heads)
        hm[heads] = 1
        blk.head_mask = hm
        # one head kept from each key/value group (heads 0-1 share kv head 0, heads 2-3 kv head 1)
        assert sorted(h // 2 for h in heads) == [0, 1]
    with torch.inference_mode():
        masked = net(torch.tensor([IDS]))[0].numpy()
    np.testing.assert_allclose(logits(pruned, IDS), masked, atol=1e-4, rtol=1e-4)


def test_prune_per_layer_widths_meet_budget():
    from edgekit.passes.prune import PrunePass

    m = tiny_model(intermediate_size=256, num_layers=4)
    # make layer 0's MLP nearly useless so a global ranking should take more from it
    m.tensors["layers.0.mlp.down.weight"] *= 0.01
    PrunePass(mlp=0.25, uniform=False).apply(m, ctx(options={"per_layer_widths": True}))
    widths = [m.layer_widths(i)["intermediate"] for i in range(4)]
    assert all(w % 32 == 0 and w >= 64 for w in widths)
    assert sum(256 - w for w in widths) == 256  # 25% of 4 x 256 channels
    assert widths[0] == min(widths) and len(set(widths)) > 1 and not m.is_uniform()


def test_obs_cut_is_the_least_squares_fit_and_beats_plain_cutting():
    from edgekit.passes.prune import obs_mlp_cut

    rng = np.random.default_rng(3)
    # correlated activations: some channels nearly copy others, so re-solving the kept columns pays
    base = rng.normal(size=(4000, 48))
    acts = np.concatenate([base, base[:, :16] + 0.05 * rng.normal(size=(4000, 16))], 1)
    W = rng.normal(size=(24, 64))
    G = acts.T @ acts / len(acts)
    cut, W_kept = obs_mlp_cut(W, G, 16, damp=0.0)
    keep = np.setdiff1d(np.arange(64), cut)
    assert len(cut) == 16 and W_kept.shape == (24, 48)
    # the kept columns are exactly what least squares on the calibration activations gives
    lstsq = np.linalg.lstsq(acts[:, keep], acts @ W.T, rcond=None)[0].T
    np.testing.assert_allclose(W_kept, lstsq, rtol=1e-5, atol=1e-6)

    def err(cols, Wk):
        return float(((acts @ W.T - acts[:, cols] @ Wk.T) ** 2).mean())

    # against the activation-energy ranking with the columns left as they were
    energy = np.diag(G) * (W ** 2).sum(0)
    plain_keep = np.sort(np.argsort(energy)[16:])
    assert err(keep, W_kept) < 0.2 * err(plain_keep, W[:, plain_keep])
    # OBS takes mostly the near-duplicates (their information survives in the twins)
    assert np.isin(cut, np.r_[0:16, 48:64]).mean() > 0.9


def test_prune_compensate_keeps_widths_and_lowers_output_error():
    from edgekit.passes.prune import PrunePass

    m = tiny_model(intermediate_size=256)
    out = {}
    for comp in (False, True):
        pruned = copy_model(m)
        # enough calibration tokens for the 256-channel least-squares fit not to overfit
        rec = PrunePass(mlp=0.25, compensate=comp).apply(pruned, PassContext(calibration_tokens=lambda: calib_seqs(16, 256)))
        assert {pruned.layer_widths(i)["intermediate"] for i in range(m.spec.num_layers)} == {192}
        out[comp] = float(((logits(pruned, IDS) - logits(m, IDS)) ** 2).mean())
    assert "surgeon" in rec["saliency"]
    assert out[True] < 0.9 * out[False], out


def test_lowrank_full_rank_reproduces_dense_layer():
    from edgekit.passes.lowrank import factorize, whitening

    W = RNG.standard_normal((48, 32)).astype(np.float32)
    A, B = factorize(W, 32)
    np.testing.assert_allclose(B @ A, W, atol=1e-4)
    X = RNG.standard_normal((500, 32)) * np.linspace(0.1, 3, 32)
    A, B = factorize(W, 32, whitening(X.T @ X / 500))
    np.testing.assert_allclose(B @ A, W, atol=1e-3)


def test_whitened_svd_beats_plain_on_output_error():
    from edgekit.passes.lowrank import factorize, whitening

    W = RNG.standard_normal((64, 64))
    X = RNG.standard_normal((2000, 64)) * np.geomspace(0.01, 10, 64)  # inputs with very uneven scales
    G = X.T @ X / len(X)

    def out_err(A, B):
        return np.linalg.norm(X @ (W - B @ A).T) / np.linalg.norm(X @ W.T)

    assert out_err(*factorize(W, 16, whitening(G))) < 0.7 * out_err(*factorize(W, 16))


def test_lowrank_pass_budget_and_model():
    from edgekit.passes.lowrank import LowRankPass

    m = tiny_model(hidden_size=128, intermediate_size=512, num_heads=8, num_kv_heads=4, head_dim=16)
    dense = copy_model(m)
    rec = LowRankPass(rank=0.5).apply(m, ctx())
    assert m.is_factorized() and rec["factorized"] > 0
    assert rec["kept_fraction"] <= 0.5 + 1e-9
    for n in m.linear_names():
        assert m.tensors[n].ndim == 2
    a, b = m.lowrank_factors("layers.0.mlp.gate")
    assert m.tensors[a].shape[1] == 128 and m.tensors[b].shape[0] == 512 and m.tensors[a].shape[0] % 32 == 0
    assert "layers.0.mlp.gate.weight" not in m.tensors
    # two matmuls compute what the dense product B @ A would
    merged = copy_model(dense)
    for n in dense.linear_names():
        f = m.lowrank_factors(n[: -len(".weight")])
        if f:
            merged.tensors[n] = m.tensors[f[1]] @ m.tensors[f[0]]
    np.testing.assert_allclose(logits(m, IDS), logits(merged, IDS), atol=2e-4, rtol=1e-3)


def test_ternary_three_levels_times_scale():
    from edgekit.passes.ternary import TernaryPass, ste, ternarize

    w = RNG.standard_normal((8, 512)).astype(np.float32)
    bq = ternarize(w)
    assert bq.bits == 2 and bq.block_size == 256
    assert set(np.unique(bq.q)) <= {-1, 0, 1}
    deq = bq.dequantize().reshape(8, 2, 256)
    for r in range(8):
        for b in range(2):
            assert set(np.unique(np.abs(deq[r, b]))) <= {0.0, float(bq.scales[r, b])}
    np.testing.assert_array_equal(ste(torch.from_numpy(w)).detach().numpy(), bq.dequantize())
    assert ternarize(w[:, :128]).block_size == 64  # rows TQ2_0's 256 cannot tile
    m = tiny_model()
    rec = TernaryPass().apply(m, PassContext())
    assert all(isinstance(m.encodings[n], BlockQuant) for n in m.linear_names())
    assert m.encodings["embed.weight"].bits == 8 and rec["block_sizes"] == {"64": 14}


def test_distillation_lowers_the_loss():
    from edgekit.passes.prune import PrunePass

    m = tiny_model(intermediate_size=256)
    reference = copy_model(m)
    with pytest.raises(EdgekitError, match="one MLP width"):  # per-layer widths only where the format allows
        PrunePass(mlp=0.5, uniform=False).apply(copy_model(m), ctx())
    rec = PrunePass(mlp=0.5, recover=24, lr=1e-3).apply(m, PassContext(calibration_tokens=lambda: calib_seqs(8, 128),
                                                                         reference=reference))
    curve = rec["recovery"]["loss_curve"]
    assert len(curve) == 24 and rec["recovery"]["fade_steps"] == 12
    # after the fade the masked channels are gone; the loss must come down from its post-fade peak
    assert np.mean(curve[-4:]) < max(curve[10:16])


def test_gguf_ternary_packing_is_exact():
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize

    from edgekit.converters.gguf import as_q4_0_blocks, pack_q4_0, pack_tq2_0
    from edgekit.passes.ternary import ternarize

    w = RNG.standard_normal((4, 512)).astype(np.float32)
    bq = ternarize(w)
    np.testing.assert_array_equal(dequantize(pack_tq2_0(bq), T.TQ2_0), bq.dequantize())
    bq64 = ternarize(w[:, :192], 64)
    np.testing.assert_array_equal(dequantize(pack_q4_0(as_q4_0_blocks(bq64)), T.Q4_0), bq64.dequantize())


def test_gguf_refuses_what_llama_cpp_cannot_express():
    from edgekit.converters.gguf import GGUFExporter
    from edgekit.passes.lowrank import LowRankPass
    from edgekit.passes.prune import PrunePass

    m = tiny_model(intermediate_size=256, num_layers=4)
    m.tensors["layers.0.mlp.down.weight"] *= 0.01
    PrunePass(mlp=0.25, uniform=False).apply(m, ctx(options={"per_layer_widths": True}))
    assert "different widths" in GGUFExporter().supports(m)
    m = tiny_model(hidden_size=128, intermediate_size=512, num_heads=8, num_kv_heads=4, head_dim=16)
    LowRankPass(rank=0.5).apply(m, ctx())
    assert "low-rank" in GGUFExporter().supports(m)


def test_recipes_validate():
    from edgekit import recipes

    names = recipes.builtin_names()
    assert {"prune20", "prune20-recover", "ternary", "ternary-recover", "lowrank50", "lowrank50-plain"} <= set(names)
    for n in names:
        r = recipes.load(n)
        assert r.passes[-1]["pass"] not in ("prune", "lowrank")
    r = recipes.from_flags("int4", prune=0.3, rank=0.5, recover=10)
    assert [p["pass"] for p in r.passes] == ["prune", "lowrank", "int4"] and r.passes[0]["recover"] == 10
    assert recipes.from_flags(None, rank=0.5).storage == "int4"
    assert recipes.from_flags("ternary", recover=5).passes[-1] == {"pass": "ternary", "recover": 5}
    with pytest.raises(InputError, match="no parameter 'mpl'"):
        recipes.check(recipes.Recipe("x", [{"pass": "prune", "mpl": 0.2}]))
    with pytest.raises(InputError, match="must come last"):
        recipes.check(recipes.Recipe("x", [{"pass": "int4"}, {"pass": "prune", "mlp": 0.2}]))
    with pytest.raises(InputError, match="in the order"):
        recipes.check(recipes.Recipe("x", [{"pass": "lowrank", "rank": 0.5}, {"pass": "prune", "mlp": 0.2}]))
    with pytest.raises(InputError, match="must be float"):
        recipes.check(recipes.Recipe("x", [{"pass": "prune", "mlp": "a lot"}]))


def test_recipe_file_unknown_key(tmp_path):
    from edgekit import recipes

    f = tmp_path / "r.toml"
    f.write_text('descripton = "typo"\n[[passes]]\npass = "int4"\n')
    with pytest.raises(InputError, match="unknown keys"):
        recipes.load(str(f))


def test_drop_layers_removes_the_layer_that_does_least_and_equals_skipping_it():
    from edgekit.architectures.torch_decoder import DecoderNet
    from edgekit.passes.drop_layers import DropLayersPass

    m = tiny_model(num_layers=5)
    for role in ("attn.o", "mlp.down"):  # layer 2 adds nothing to the residual stream: influence 0
        m.tensors[f"layers.2.{role}.weight"] = m.tensors[f"layers.2.{role}.weight"] * 1e-4
    dropped = copy_model(m)
    rec = DropLayersPass(layers=2).apply(dropped, ctx())
    assert 2 in rec["dropped"] and 0 not in rec["dropped"] and 4 not in rec["dropped"]
    assert min(rec["block_influence"]) == rec["block_influence"][2]
    assert dropped.spec.num_layers == 3 and rec["layers_after"] == 3
    assert sorted(n for n in dropped.tensors if n.startswith("layers.")) == \
        sorted(n for n in m.tensor_order() if n.startswith(("layers.0.", "layers.1.", "layers.2.")))
    # the shallower model computes exactly what the full model computes with those blocks skipped
    net = DecoderNet(m)
    net.blocks = [b for i, b in enumerate(net.blocks) if i not in rec["dropped"]]
    with torch.inference_mode():
        skipped = net(torch.tensor([IDS]))[0].numpy()
    np.testing.assert_allclose(logits(dropped, IDS), skipped, atol=1e-4, rtol=1e-4)
    with pytest.raises(EdgekitError, match="would remove 4 of 5 layers"):
        DropLayersPass(layers=4).apply(copy_model(m), ctx())


def test_drop_layers_recovery_distils():
    from edgekit.passes.drop_layers import DropLayersPass
    from edgekit import recipes

    with pytest.raises(InputError, match="exactly one of fraction"):
        recipes.check(recipes.Recipe("x", [{"pass": "drop_layers", "fraction": 0.5, "layers": 1}]))
    assert recipes.load("draft-drop80-head4").structural == ["drop_layers"]
    m = tiny_model(num_layers=4, intermediate_size=256)
    rec = DropLayersPass(fraction=0.5, recover=16, lr=1e-3).apply(
        m, PassContext(calibration_tokens=lambda: calib_seqs(8, 128), reference=tiny_model(num_layers=4, intermediate_size=256)))
    curve = rec["recovery"]["loss_curve"]
    assert m.spec.num_layers == 2 and len(curve) == 16 and np.mean(curve[-4:]) < np.mean(curve[:4])

