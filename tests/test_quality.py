"""The compact reference statistics give the same KL divergence as full distributions."""

from __future__ import annotations

import numpy as np

from edgekit.harness.quality import RefStats, compare, default_text_path


def fake_logits(n, vocab, seed, sharp=4.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, vocab)) * sharp).astype(np.float32)


def exact_kl(p_logits, q_logits):
    lp = p_logits - np.log(np.exp(p_logits - p_logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - p_logits.max(-1, keepdims=True)
    lq = q_logits - np.log(np.exp(q_logits - q_logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - q_logits.max(-1, keepdims=True)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def test_topk_kl_equals_exact_when_k_is_the_vocabulary():
    vocab, n = 64, 40
    ref = fake_logits(n, vocab, 0)
    art = ref + 0.5 * fake_logits(n, vocab, 1, sharp=1.0)
    win = list(np.random.default_rng(2).integers(0, vocab, n))
    stats = RefStats.from_logits([ref], [win], k=vocab - 1)
    got = compare(stats, [art], [win])
    want = exact_kl(ref[:-1].astype(np.float64), art[:-1].astype(np.float64))
    assert abs(got["kld_mean"] - want.mean()) < 1e-6


def test_topk_kl_is_a_tight_lower_bound():
    vocab, n = 2000, 60
    ref = fake_logits(n, vocab, 3, sharp=3.0)
    art = ref + 0.3 * fake_logits(n, vocab, 4, sharp=1.0)
    win = list(np.random.default_rng(5).integers(0, vocab, n))
    want = exact_kl(ref[:-1].astype(np.float64), art[:-1].astype(np.float64)).mean()
    got = compare(RefStats.from_logits([ref], [win], k=256), [art], [win])
    assert got["kld_mean"] <= want + 1e-9
    assert got["kld_mean"] > 0.9 * want


def test_identical_logits_score_zero_and_full_agreement():
    ref = fake_logits(30, 500, 6)
    win = list(range(30))
    got = compare(RefStats.from_logits([ref], [win], k=64), [ref], [win])
    assert got["kld_mean"] < 1e-9 and got["top1_agreement"] == 1.0
    assert abs(got["ppl"] - got["ref_ppl"]) < 1e-6 * got["ref_ppl"]


def test_shipped_eval_and_calibration_texts_are_disjoint():
    ev = default_text_path("eval").read_text()
    ca = default_text_path("calibration").read_text()
    long_lines = {ln.strip() for ln in ev.splitlines() if len(ln.strip()) >= 60}
    assert len(long_lines) > 50
    assert not long_lines & {ln.strip() for ln in ca.splitlines()}
