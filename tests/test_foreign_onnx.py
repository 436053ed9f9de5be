"""Artifacts from elsewhere: an ONNX decoder exported by optimum profiles next to edgekit's own.

A tiny Llama (transformers' own class, random weights, SmolLM2's vocabulary) is saved as a Hugging
Face directory and exported with the real ``optimum-cli export onnx --task text-generation-with-past``;
the runtime must give transformers' logits and greedy tokens through both engines, and ``profile``
must score it against the float reference (tiny KLD) and against a different model (large KLD).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgekit
from edgekit.errors import InputError
from edgekit.harness.speed import SpeedConfig
from edgekit.session import resolve_artifact, runtime_for
from tests.conftest import run_cli
from tiny_archs import hf_logits, save_hf_dir

pytest.importorskip("optimum.onnxruntime")
ENGINES = ("optimum", "onnxruntime")


def optimum_export(hf_dir: Path, out: Path, task: str = "text-generation-with-past") -> Path:
    exe = Path(sys.executable).parent / "optimum-cli"
    proc = subprocess.run([str(exe), "export", "onnx", "--model", str(hf_dir), "--task", task, str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(HF dir, its optimum export, the transformers model, a different HF model of the same shape)."""
    root = tmp_path_factory.mktemp("foreign")
    hf = save_hf_dir("llama", root / "hf", seed=0)
    other = root / "other"
    save_hf_dir("llama", other, seed=1)
    return root / "hf", optimum_export(root / "hf", root / "opt"), hf, other


def ids_of(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(100, 40000, n).tolist()


def test_optimum_layout_is_claimed_and_edgekit_onnx_is_not(exported, tmp_path):
    _, opt, _, _ = exported
    assert runtime_for(opt / "model.onnx") == "optimum-onnx"
    assert resolve_artifact(opt)[0] == opt / "model.onnx"  # the directory opens as its model.onnx
    own = tmp_path / "own"  # edgekit's ONNX layout (onnx_config.json) stays with edgekit's runtime
    own.mkdir()
    for name in ("model.onnx", "config.json", "onnx_config.json"):
        (own / name).write_text("{}")
    assert runtime_for(own / "model.onnx") == "onnxruntime"


@pytest.mark.parametrize("engine", ENGINES)
def test_logits_and_greedy_tokens_equal_transformers(exported, engine):
    import torch

    _, opt, hf, _ = exported
    ids = ids_of(80)
    ref = hf_logits(hf, ids)
    # n_batch 32: the 80 tokens go through the graph in three chunks, the later ones on the cache
    with edgekit.load(opt, engine=engine, n_batch=32) as s:
        assert s.runtime == "optimum-onnx" and s.n_vocab == ref.shape[1]
        got = s.logits(ids)
        tokens = list(s.stream_tokens(ids[:12], 24, ignore_eos=True))
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())
    with torch.inference_mode():
        want = hf.generate(torch.tensor([ids[:12]]), max_new_tokens=24, min_new_tokens=24, do_sample=False)[0, 12:]
    assert tokens == want.tolist()


def test_tokenizer_and_chat_come_from_the_export(exported):
    from tokenizers import Tokenizer

    hf_dir, opt, _, _ = exported
    text = "Hello world, “quotes” and ünïcode"
    want = Tokenizer.from_file(str(hf_dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    with edgekit.load(opt, vocab_only=True) as s:
        assert s.tokenize(text) == want
        assert s.detokenize(want) == text
        assert s.eos_token_id == 2
        with pytest.raises(InputError, match="vocab_only"):
            s.logits(want)


def test_profile_scores_the_export_against_the_float_reference(exported):
    from edgekit.profile import profile

    hf_dir, opt, _, other = exported
    cfg = SpeedConfig(prompt_tokens=32, prefill_tokens=64, decode_tokens=8, reps=1, load_reps=1, n_threads=1)
    r = profile(opt, reference=str(hf_dir), speed_cfg=cfg, eval_tokens=512)
    assert r["runtime"] == "optimum-onnx" and r["format"] == "onnx"
    assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["peak_rss_bytes"] > r["size_bytes"]
    q = r["quality"]
    assert q["tokens"] > 400 and q["kld_mean"] < 1e-5 and q["top1_agreement"] > 0.99
    # the same measurement against a different model is not small: the figure can fail
    from edgekit.evaluate import measure_quality
    from edgekit.harness.quality import EvalConfig, read_text
    from edgekit.sources import load_reference, resolve

    src = resolve(str(other))
    with edgekit.load(opt, engine="onnxruntime") as s:
        q2 = measure_quality(s, load_reference(src), src.sha256, read_text(None)[0], "eval", EvalConfig(max_tokens=512))
    assert q2["kld_mean"] > 0.05 and q2["top1_agreement"] < 0.5


def test_export_without_cache_is_one_clear_error(exported, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    _, opt, _, _ = exported
    bad = tmp_path / "nocache"  # an optimum-style directory whose graph has no past_key_values inputs
    bad.mkdir()
    for f in ("config.json", "tokenizer.json"):
        (bad / f).write_bytes((opt / f).read_bytes())
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, None])],
                              [helper.make_tensor_value_info("logits", TensorProto.INT64, [1, None])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), bad / "model.onnx")
    for engine in ENGINES:
        with pytest.raises(InputError, match="past_key_values"):
            edgekit.load(bad, engine=engine)
    proc = run_cli("run", str(bad), "Hello", env={"EDGEKIT_OPTIMUM_ENGINE": "onnxruntime"})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")], proc.stderr


def test_broken_config_and_unknown_engine_are_one_line(exported, tmp_path):
    _, opt, _, _ = exported
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "model.onnx").write_bytes(b"not a model")
    (bad / "config.json").write_text("{ not json")
    with pytest.raises(InputError, match="config.json"):
        edgekit.load(bad)
    with pytest.raises(InputError, match="unknown engine"):
        edgekit.load(opt, engine="tensorrt")
    (bad / "config.json").write_text(json.dumps({"vocab_size": 10}))
    (bad / "tokenizer.json").write_bytes((opt / "tokenizer.json").read_bytes())
    with pytest.raises(InputError, match="could not load"):
        edgekit.load(bad, engine="onnxruntime")


# ------------------------------------------------------------------ onnxruntime-genai


@pytest.fixture(scope="module")
def genai_dir(exported, tmp_path_factory):
    pytest.importorskip("onnxruntime_genai")
    from edgekit.hf_export import build_genai

    hf_dir = exported[0]
    # fp32: the builder's own graph (GroupQueryAttention, fused rotary), with no quantization error to hide behind
    return build_genai(hf_dir, tmp_path_factory.mktemp("genai") / "fp32", "fp32")


def test_genai_dir_runs_with_transformers_logits_and_tokens(exported, genai_dir):
    import torch

    _, opt, hf, _ = exported
    assert runtime_for(genai_dir / "model.onnx") == "ort-genai"
    assert runtime_for(opt / "model.onnx") == "optimum-onnx"  # the optimum layout stays with optimum's runtime
    ids = ids_of(80, seed=2)
    ref = hf_logits(hf, ids)
    with edgekit.load(genai_dir, n_batch=32) as s:
        assert s.runtime == "ort-genai"
        got = s.logits(ids)
        again = s.logits(ids[:40])  # the cache is rewound between calls
        tokens = list(s.stream_tokens(ids[:12], 24, ignore_eos=True))
    assert np.abs(got - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())
    assert np.abs(again - ref[:40]).max() < 1e-3 * max(1.0, np.abs(ref).max())
    with torch.inference_mode():
        want = hf.generate(torch.tensor([ids[:12]]), max_new_tokens=24, min_new_tokens=24, do_sample=False)[0, 12:]
    assert tokens == want.tolist()
    # a broken genai_config.json is one line
    bad = genai_dir.parent / "bad"
    bad.mkdir()
    (bad / "model.onnx").write_bytes((genai_dir / "model.onnx").read_bytes())
    (bad / "genai_config.json").write_text('{"model": {}}')
    with pytest.raises(InputError, match="vocab_size"):
        edgekit.load(bad)
