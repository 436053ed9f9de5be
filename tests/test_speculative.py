"""Speculative decoding (runtimes/speculative.py) in both runtimes: greedy tokens identical to plain decoding
whatever the draft proposes, sampling that keeps the target's distribution, drafts of another tokenizer refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import edgekit
from edgekit.converters.gguf import GGUFExporter
from edgekit.converters.onnx import ONNXExporter
from edgekit.errors import InputError, OutputExistsError
from edgekit.passes import PassContext
from edgekit.passes.rtn import Q4_0Pass, Q8_0Pass
from edgekit.runtimes.speculative import (AdaptiveK, PromptLookupDrafter, SpecStats, probabilities,
                                          speculative_stream)
from tests.conftest import tiny_model

PROMPTS = [
    "The capital of France is Paris, and the capital of Italy is Rome. The capital of France is",
    "Summarise: the quick brown fox jumps over the lazy dog. The quick brown fox jumps over",
    "1 2 3 4 5 6 7 8 9 10 11 12",
]


def _export(model, d: Path, fmt: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (GGUFExporter() if fmt == "gguf" else ONNXExporter()).export(model, d)
    return d / f"model.{fmt}"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Per format: the tiny target (f32), its Q8_0 (a draft that agrees often) and an unrelated model (one that
    rarely does): identity must hold for both."""
    root = tmp_path_factory.mktemp("spec")
    q8 = tiny_model()
    Q8_0Pass().apply(q8, PassContext())
    out = {}
    for fmt in ("gguf", "onnx"):
        out[fmt] = {"target": _export(tiny_model(), root / fmt / "target", fmt),
                    "q8": _export(q8, root / fmt / "q8", fmt),
                    "other": _export(tiny_model(seed=3), root / fmt / "other", fmt)}
    return out


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
@pytest.mark.parametrize("draft", ["q8", "other", "prompt-lookup"])
def test_greedy_tokens_are_identical_with_any_draft(models, fmt, draft):
    m = models[fmt]
    with edgekit.load(m["target"], n_ctx=512) as plain:
        want = [list(plain.stream_tokens(plain.tokenize(p), 48, ignore_eos=True)) for p in PROMPTS]
    with edgekit.load(m["target"], n_ctx=512, draft=draft if draft == "prompt-lookup" else m[draft]) as spec:
        assert spec.draft is not None
        for p, w in zip(PROMPTS, want):
            got = list(spec.stream_tokens(spec.tokenize(p), 48, ignore_eos=True))
            st = spec.last_speculation
            assert got == w, (draft, p)
            assert st["emitted"] == 48 and st["rounds"] < 48 or st["drafted"] == 0
        if draft == "q8":  # a quantized copy of the same weights agrees with the target most of the time
            assert spec.last_speculation["acceptance_rate"] > 0.5, spec.last_speculation


@pytest.fixture(scope="module")
def int4_targets(tmp_path_factory):
    """A 4-bit tiny target per format: the weights whose kernels depend on a step's row count."""
    root = tmp_path_factory.mktemp("spec-int4")
    m = tiny_model(intermediate_size=256)
    Q4_0Pass().apply(m, PassContext())
    return {fmt: _export(m, root / fmt, fmt) for fmt in ("gguf", "onnx")}


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_batch_invariant_steps_give_every_position_the_same_logits(int4_targets, fmt):
    rng = np.random.default_rng(0)
    prompt, seq = [int(t) for t in rng.integers(5, 250, 37)], [int(t) for t in rng.integers(5, 250, 24)]
    with edgekit.load(int4_targets[fmt], n_ctx=256, batch_invariant=True) as s:
        by_chunk = {}
        for chunk in (1, 2, 3, 5, 24):
            s._spec_reset()
            s._spec_feed(prompt, all_logits=False)
            by_chunk[chunk] = np.concatenate([s._spec_feed(seq[i:i + chunk]) for i in range(0, len(seq), chunk)])
            assert s._n_past == len(prompt) + len(seq) and s._history == prompt + seq
        for chunk, rows in by_chunk.items():
            assert rows.shape == (len(seq), s.n_vocab)
            np.testing.assert_array_equal(rows, by_chunk[1], err_msg=f"chunks of {chunk}")
        # plain greedy decoding in this mode runs the same steps: its tokens are speculation's
        want = list(s.stream_tokens(prompt, 40, ignore_eos=True))
        s.use_draft("prompt-lookup")
        assert list(s.stream_tokens(prompt, 40, ignore_eos=True)) == want
        assert s.sibling().batch_invariant


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_eos_and_max_tokens_are_respected_speculatively(models, fmt):
    m = models[fmt]
    with edgekit.load(m["target"], n_ctx=512) as plain:
        ids = plain.tokenize(PROMPTS[0])
        full = list(plain.stream_tokens(ids, 30, ignore_eos=True))
    eos = full[7]  # pretend the 8th generated token ends the text: generation must stop right before it
    with edgekit.load(m["target"], n_ctx=512, draft=m["q8"]) as spec:
        for n in (1, 2, 5, 30):
            assert list(spec.stream_tokens(ids, n, ignore_eos=True)) == full[:n]
        if fmt == "onnx":
            spec._eos_ids = {eos}
        else:
            spec._llm.token_eos = lambda: eos
        assert list(spec.stream_tokens(ids, 30)) == full[: full.index(eos)]


def test_sampling_keeps_the_target_distribution():
    """Rejection sampling on fixed logit tables: the 2nd and 3rd tokens' frequencies match the target's own
    conditional distributions, whatever the draft's (a point-mass lookup draft and a sampled model draft)."""
    vocab, temp = 48, 0.9
    rng0 = np.random.default_rng(0)
    table = rng0.standard_normal((vocab, vocab)) * 2.0  # target: next-token logits depend on the last token
    dtable = table + rng0.standard_normal((vocab, vocab)) * 1.5  # a draft that roughly agrees

    class Target:
        n_vocab = vocab

        def __init__(self, t):
            self.t, self.ctx = t, []

        def _spec_reset(self):
            self.ctx = []

        def _spec_feed(self, ids, all_logits=True):
            self.ctx += list(ids)
            rows = np.stack([self.t[i] for i in ids])
            return rows if all_logits else rows[-1:]

        def _spec_truncate(self, n):
            self.ctx = self.ctx[:n]

    from edgekit.runtimes.speculative import ModelDrafter

    class DraftSession(Target):
        n_ctx = 10_000

    prompt = [5]
    p1 = probabilities(table[5], temp, 1.0)
    n = 12_000
    for drafter in (PromptLookupDrafter(), ModelDrafter(DraftSession(dtable), owned=False)):
        rng = np.random.default_rng(1)
        counts = np.zeros((vocab, vocab))
        for _ in range(n):
            # a prompt whose lookup proposes something: 5 occurs earlier, followed by 7
            toks = list(speculative_stream(Target(table), drafter, [5, 7, 5] if isinstance(drafter, PromptLookupDrafter)
                                           else prompt, 2, temp, 1.0, rng, set(), True, 10_000, SpecStats(), AdaptiveK(k=4)))
            counts[toks[0], toks[1]] += 1
        first = counts.sum(1) / n
        assert np.abs(first - p1).max() < 0.02
        for a in np.argsort(-p1)[:3]:  # the conditional of the 2nd token given the most frequent 1st ones
            cond = counts[a] / counts[a].sum()
            want = probabilities(table[a], temp, 1.0)
            assert 0.5 * np.abs(cond - want).sum() < 0.08, (type(drafter).__name__, a)


def test_prompt_lookup_proposes_the_continuation_of_the_latest_match():
    d = PromptLookupDrafter()
    ctx = [1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 1, 2, 3]
    assert d.propose(ctx, 3, 0.0, 1.0, None)[0] == [5, 6, 1]  # "1 2 3" last seen before the tail: followed by 5 6 1
    assert d.propose([7, 8, 9], 3, 0.0, 1.0, None)[0] == []


def test_a_draft_of_another_tokenizer_is_one_line(models, tmp_path):
    other = tiny_model()
    entry = dict(other.tokenizer["tokenizer.ggml.tokens"])
    toks = entry["value"] = list(entry["value"])
    toks[300], toks[301] = toks[301], toks[300]  # same size, two ids that mean other text
    other.tokenizer = dict(other.tokenizer) | {"tokenizer.ggml.tokens": entry}
    path = _export(other, tmp_path / "other", "gguf")
    with pytest.raises(InputError, match="another tokenizer \\(token 300 differs\\)"):
        edgekit.load(models["gguf"]["target"], draft=path)


def test_draft_for_builds_candidates_measures_them_and_keeps_the_fastest(tmp_path):
    """`convert --draft-for`: drafts from the target's own source (layers dropped + distilled), each measured as the
    target's draft with identical greedy tokens; the kept one's manifest says why, and bad targets are one line."""
    from edgekit.drafts import build_draft
    from edgekit.manifest import read_manifest
    from edgekit.pipeline import ConvertRequest, convert
    from tests.tiny_archs import save_hf_dir

    src = tmp_path / "src"
    save_hf_dir("llama", src, num_hidden_layers=4)
    convert(ConvertRequest(str(src), "gguf", "f16", tmp_path / "target"))
    recipes = []
    for n in (1, 2):
        r = tmp_path / f"drop{n}.toml"
        r.write_text(f'[[passes]]\npass = "drop_layers"\nlayers = {n}\nrecover = 4\n[[passes]]\npass = "q8_0"\n')
        recipes.append(str(r))
    man = build_draft(tmp_path / "target", tmp_path / "draft", recipes, tokens=12, rounds=1)
    d = man["draft"]
    assert [c["layers"] for c in d["candidates"]] == [3, 2]
    assert read_manifest(tmp_path / "draft")["draft"] == d
    for c in d["candidates"] + [{"prompts": d["prompt_lookup"]}]:
        for m in c["prompts"].values():
            assert m["identical_greedy"] and m["speedup"] > 0 and 0 <= m["acceptance_rate"] <= 1
    assert d["chosen"] in {Path(r).name for r in recipes} | set(recipes)
    assert not (tmp_path / ".draft.candidates").exists()
    with edgekit.load(tmp_path / "target", draft=tmp_path / "draft") as s:  # the kept draft drives the target
        assert s.draft is not None and len(list(s.stream_tokens(s.tokenize("Hello"), 8, ignore_eos=True))) == 8
    with pytest.raises(InputError, match="not an artifact directory"):
        build_draft(tmp_path / "src", tmp_path / "d2", recipes)
    with pytest.raises(OutputExistsError, match="exists and is not empty"):
        build_draft(tmp_path / "target", tmp_path / "draft", recipes)


def test_batch_invariant_is_refused_in_one_line_where_a_runtime_has_none(tmp_path):
    from tests.test_targets import build_tiny_encoder

    enc = build_tiny_encoder(tmp_path / "bert", tmp_path / "enc")[1]
    with pytest.raises(InputError, match="no batch-invariant decoding"):
        edgekit.load(enc, batch_invariant=True)
