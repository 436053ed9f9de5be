"""Shared fixtures: tiny Llama models built in code (hidden size 64) with the real SmolLM2 vocabulary,
and, for end-to-end tests, artifacts of the embedded default model converted once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from edgekit.architectures import layout as L
from edgekit.architectures.spec import DecoderSpec
from edgekit.model import Model

REPO = Path(__file__).resolve().parent.parent

# Conversions in the suite (and the CLIs it starts) write 1,024 calibration tokens with the float model
# instead of the 12,288 a user's conversion writes: the mechanism is the same, the minutes are not.
# The 12,288-token default is what benchmarks/bench_quality.py measures.
os.environ.setdefault("EDGEKIT_CALIB_GENERATED", "1024")


@lru_cache(maxsize=1)
def smollm_tokenizer() -> dict:
    """GGUF tokenizer keys of the packaged SmolLM2 (read from its header; no weights are dequantized)."""
    from edgekit.converters.gguf_layout import open_reader, tokenizer_from_reader
    from edgekit.sources import default_model_path

    return tokenizer_from_reader(open_reader(default_model_path()))


def tiny_spec(**kw) -> DecoderSpec:
    base = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5, max_position=512,
                tie_word_embeddings=True)
    base.update(kw)
    return DecoderSpec(**base)


def tiny_model(seed: int = 0, **kw) -> Model:
    """A random tiny Llama whose logits are not degenerate (weights scaled like a trained model)."""
    spec = tiny_spec(**kw)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name in spec.tensor_names():
        shp = L.tensor_shape(spec, name)
        if len(shp) == 1:
            tensors[name] = (1.0 + 0.1 * rng.standard_normal(shp)).astype(np.float32)
            continue
        w = rng.standard_normal(shp).astype(np.float32) / np.sqrt(shp[1])
        # a few outliers, as real weights have, so block scales matter
        w[rng.random(shp) < 0.01] *= 6
        tensors[name] = w.astype(np.float32)
    return Model(spec, tensors, dict(smollm_tokenizer()), name="tiny-llama")


def pruned_lowrank_model(rank: int = 32) -> Model:
    """Uneven layers, as passes leave them: layer 0 keeps 2 query heads, 1 KV head and an MLP width of 96;
    layer 1 has q_proj and up_proj factorized at ``rank`` (32 keeps whole 32-wide blocks in the B factors)."""
    m = tiny_model(seed=4)
    t, hd = m.tensors, m.spec.head_dim
    w = lambda role: L.linear(0, role) + ".weight"  # noqa: E731
    t[w(L.Q)] = t[w(L.Q)][: 2 * hd]
    t[w(L.O)] = t[w(L.O)][:, : 2 * hd]
    for kv in (L.K, L.V):
        t[w(kv)] = t[w(kv)][:hd]
    for g in (L.GATE, L.UP):
        t[w(g)] = t[w(g)][:96]
    t[w(L.DOWN)] = t[w(L.DOWN)][:, :96]
    rng = np.random.default_rng(5)
    for base in (L.linear(1, L.Q), L.linear(1, L.UP)):
        w = t.pop(base + ".weight")
        t[base + L.LOWRANK_A] = (rng.standard_normal((rank, w.shape[1])) / np.sqrt(w.shape[1])).astype(np.float32)
        t[base + L.LOWRANK_B] = (rng.standard_normal((w.shape[0], rank)) / np.sqrt(rank)).astype(np.float32)
    return m


def run_cli(*args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "edgekit"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def tiny():
    return tiny_model()


@pytest.fixture(scope="session")
def e2e_artifacts(tmp_path_factory):
    """The default model converted once per test session at q8_0, q4_0 and int4."""
    from edgekit.pipeline import ConvertRequest, convert

    root = tmp_path_factory.mktemp("e2e")
    out = {}
    for quant in ("q8_0", "q4_0", "int4"):
        manifest = convert(ConvertRequest(None, "gguf", quant, root / quant))
        out[quant] = (root / quant, manifest)
    return out
