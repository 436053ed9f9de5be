"""`edgekit profile` of a GGUF whose architecture edgekit cannot convert (a tiny "gpt2" that llama.cpp runs):
speed, memory and predictions as for any GGUF; quality against another artifact given as --reference."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from edgekit.cache import sha256_file
from tests.conftest import run_cli, smollm_tokenizer

N_EMBD, N_LAYER, N_HEAD, N_FF, N_CTX = 64, 2, 4, 256, 2048
QUICK = ("--reps", "2", "--decode-tokens", "16")  # speed settings for a quick run
TABLE_ENV = {"COLUMNS": "250"}  # keep rich's table rows on one line


def gpt2_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """GPT-2 layout in llama.cpp's names (gguf.constants.MODEL_TENSORS[MODEL_ARCH.GPT2] plus the biases
    llama.cpp's gpt2 loader requires), numpy shapes = reversed ggml shapes. Tied output (no output.weight)."""
    vocab = len(smollm_tokenizer()["tokenizer.ggml.tokens"]["value"])
    rng = np.random.default_rng(seed)

    def mat(rows: int, cols: int, scale: float = 1.0) -> np.ndarray:
        return (scale * rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def vec(n: int, base: float = 0.0) -> np.ndarray:
        return (base + 0.1 * rng.standard_normal(n)).astype(np.float32)

    # embeddings 4x larger than 1/sqrt(n): logits std ~4, so top-1 is not a coin toss over 49k tokens
    t = {"token_embd.weight": mat(vocab, N_EMBD, 4.0), "position_embd.weight": mat(N_CTX, N_EMBD, 0.5),
         "output_norm.weight": vec(N_EMBD, 1.0), "output_norm.bias": vec(N_EMBD)}
    for i in range(N_LAYER):
        p = f"blk.{i}."
        t |= {p + "attn_norm.weight": vec(N_EMBD, 1.0), p + "attn_norm.bias": vec(N_EMBD),
              p + "attn_qkv.weight": mat(3 * N_EMBD, N_EMBD), p + "attn_qkv.bias": vec(3 * N_EMBD),
              p + "attn_output.weight": mat(N_EMBD, N_EMBD), p + "attn_output.bias": vec(N_EMBD),
              p + "ffn_norm.weight": vec(N_EMBD, 1.0), p + "ffn_norm.bias": vec(N_EMBD),
              p + "ffn_up.weight": mat(N_FF, N_EMBD), p + "ffn_up.bias": vec(N_FF),
              p + "ffn_down.weight": mat(N_EMBD, N_FF), p + "ffn_down.bias": vec(N_EMBD)}
    return t


def write_gpt2_gguf(path: Path, qtype: str = "F32", skip_keys: tuple[str, ...] = ()) -> Path:
    """A tiny GPT-2 GGUF with the packaged SmolLM2's tokenizer; matrices stored as ``qtype``."""
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_name("tiny-gpt2")
    keys = {"context_length": N_CTX, "embedding_length": N_EMBD, "feed_forward_length": N_FF,
            "block_count": N_LAYER, "attention.head_count": N_HEAD}
    for key, value in keys.items():
        if key not in skip_keys:
            w.add_uint32(f"gpt2.{key}", value)
    w.add_layer_norm_eps(1e-5)
    tokenizer = dict(smollm_tokenizer())
    tokenizer["tokenizer.ggml.model"] = {"type": "STRING", "sub": None, "value": "gpt2"}  # byte-level BPE, as SmolLM2's
    for key, kv in tokenizer.items():
        sub = gguf.GGUFValueType[kv["sub"]] if kv.get("sub") else None
        w.add_key_value(key, kv["value"], gguf.GGUFValueType[kv["type"]], sub_type=sub)
    for name, arr in gpt2_tensors().items():
        if arr.ndim == 2 and qtype == "F16":
            w.add_tensor(name, arr.astype(np.float16))
        elif arr.ndim == 2 and qtype == "Q8_0":
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gpt2")
    out = {q: write_gpt2_gguf(d / f"tiny-gpt2-{q.lower()}.gguf", q) for q in ("F32", "Q8_0")}
    # the shipped evaluation text's first ~1500 tokens (three 512-token windows) keep quality runs short
    from edgekit.harness.quality import read_text

    out["text"] = d / "eval.txt"
    out["text"].write_text(read_text(None)[0][:6000])
    return out


def profile_json(*args: str) -> dict:
    proc = run_cli("profile", *args, "--json", *QUICK)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stdout)


def test_tiny_gpt2_is_not_convertible(gpt2):
    """The premise: edgekit has no float reference for this architecture, llama.cpp runs it."""
    import edgekit
    from edgekit.errors import UnsupportedArchitectureError
    from edgekit.sources import load_reference, resolve

    with pytest.raises(UnsupportedArchitectureError):
        load_reference(resolve(str(gpt2["F32"])))
    with edgekit.load(gpt2["F32"], n_ctx=256) as s:
        logits = s.logits(s.tokenize("The quick brown fox jumps over the lazy dog."))
    assert logits.shape[1] == 49152 and np.isfinite(logits).all() and logits.std() > 1


def test_unknown_architecture_profiles_speed_memory_and_predictions(gpt2):
    r = profile_json(str(gpt2["Q8_0"]), "-t", "raspberry-pi-5")
    for key in ("size_bytes", "load_s", "ttft_ms", "prefill_tok_s", "decode_tok_s", "peak_rss_bytes"):
        assert r[key] > 0, key
    assert r["format"] == "gguf" and r["runtime"] == "llamacpp" and r["tensor_types"]["Q8_0"] == 2 + 4 * N_LAYER
    # quality: skipped, for one stated reason
    assert r["quality"] is None
    note = r["quality_note"]
    assert note.startswith("skipped") and "--reference" in note and "\n" not in note
    # predictions from the GGUF's generic metadata
    pred = r["targets"]["raspberry-pi-5"]
    assert pred["decode_tok_s"] > 0 and pred["ttft_ms"] > 0 and pred["peak_memory_bytes"] > 0 and pred["fits"]
    assert r["roofline_percent"]["decode"] > 0 and "predictions_note" not in r


def test_unknown_architecture_table_says_why_quality_is_skipped(gpt2):
    proc = run_cli("profile", str(gpt2["Q8_0"]), *QUICK, env=TABLE_ENV)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if "skipped: no manifest and no --reference" in ln]
    assert len(lines) == 1, proc.stdout
    assert "decode" in proc.stdout and "peak resident memory" in proc.stdout


def test_quality_against_an_f32_artifact(gpt2):
    r = profile_json(str(gpt2["Q8_0"]), "--reference", str(gpt2["F32"]), "--eval-text", str(gpt2["text"]))
    q = r["quality"]
    assert 0 < q["kld_mean"] < 0.05 and q["kld_p99"] >= q["kld_mean"]
    assert q["top1_agreement"] > 0.9
    assert q["ppl"] > 1 and q["ref_ppl"] > 1 and q["tokens"] > 1000 and q["text"] == "eval.txt"
    ref = q["reference"]
    assert ref["kind"] == "artifact" and ref["runtime"] == "llamacpp"
    assert ref["path"] == str(gpt2["F32"]) and ref["sha256"] == sha256_file(gpt2["F32"])
    assert "gpt2" in ref["why"]  # why the .gguf was run as an artifact rather than as a float source
    assert q["tokenizers_agree"] and "quality_note" not in r


def test_an_artifact_against_itself_has_no_divergence(gpt2, tmp_path):
    # the reference as an artifact directory (manifest.json beside the model file)
    d = tmp_path / "ref"
    d.mkdir()
    (d / "model.gguf").write_bytes(gpt2["Q8_0"].read_bytes())
    (d / "manifest.json").write_text(json.dumps({"schema": 2, "artifact": {"file": "model.gguf", "format": "gguf",
                                                                          "runtime": "llamacpp"}}))
    r = profile_json(str(gpt2["Q8_0"]), "--reference", str(d), "--eval-text", str(gpt2["text"]))
    q = r["quality"]
    assert q["kld_mean"] < 1e-4 and q["top1_agreement"] > 0.999
    assert q["ppl"] == pytest.approx(q["ref_ppl"], rel=1e-3)
    ref = q["reference"]
    assert ref["kind"] == "artifact" and ref["path"] == str(d / "model.gguf") and "why" not in ref
    assert ref["sha256"] == sha256_file(gpt2["Q8_0"])


def test_manifest_source_without_a_float_reference_is_run_as_an_artifact(gpt2, tmp_path):
    """An artifact whose recorded source has no float reference: the UnsupportedArchitectureError becomes
    the reason the source GGUF is run by llama.cpp instead, not a failure; the table says what the reference was."""
    d = tmp_path / "q8"
    d.mkdir()
    (d / "model.gguf").write_bytes(gpt2["Q8_0"].read_bytes())
    (d / "manifest.json").write_text(json.dumps({
        "schema": 2, "artifact": {"file": "model.gguf", "format": "gguf", "runtime": "llamacpp"},
        "source": {"kind": "gguf", "path": str(gpt2["F32"]), "sha256": sha256_file(gpt2["F32"])}}))
    proc = run_cli("profile", str(d), "--eval-text", str(gpt2["text"]), *QUICK, env=TABLE_ENV)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("reference: "))
    assert line.startswith(f"reference: {gpt2['F32']} (artifact, llamacpp, sha256 {sha256_file(gpt2['F32'])[:16]}); no float reference")
    assert "gpt2" in line and "run as an artifact" in line
    top1 = next(ln for ln in out.splitlines() if "top-1 agreement" in ln)
    assert "%" in top1 and "skipped" not in out


def assert_one_line_error(proc, *words):
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w.lower() in errors[0].lower(), errors[0]


def test_bad_reference_is_one_line(gpt2, tmp_path):
    assert_one_line_error(run_cli("profile", str(gpt2["Q8_0"]), "--reference", str(tmp_path / "nope.gguf")),
                          "--reference", "does not exist")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(gpt2["F32"].read_bytes()[:5000])
    assert_one_line_error(run_cli("profile", str(gpt2["Q8_0"]), "--reference", str(bad)), "not a valid GGUF", "bad.gguf")
    junk = tmp_path / "notes.txt"
    junk.write_text("not a model")
    assert_one_line_error(run_cli("profile", str(gpt2["Q8_0"]), "--reference", str(junk)), "no runtime opens")


def test_gguf_facts_of_any_architecture(gpt2, tmp_path):
    from edgekit.errors import InputError
    from edgekit.profile import predictions
    from edgekit.targets.facts import artifact_facts

    f = artifact_facts(gpt2["F32"])
    head = N_EMBD // N_HEAD
    assert f.kv_bytes_per_token == N_LAYER * N_HEAD * 2 * head * 2  # K and V, f16, every layer
    assert f.attn_flops_per_token_per_ctx == 4 * N_LAYER * N_HEAD * head
    assert f.extra == {"num_layers": N_LAYER, "tied_embeddings": True, "architecture": "gpt2"}
    assert f.vocab_size == 49152 and f.hidden_size == N_EMBD
    # the tied embedding is streamed as the output head; position embeddings are only gathered
    t = gpt2_tensors()
    matrices = sum(a.size for n, a in t.items() if a.ndim == 2 and n != "position_embd.weight")
    assert f.params_by_type == {"F32": matrices}
    assert f.bytes_by_type["F32"] == 4 * sum(a.size for n, a in t.items() if n != "position_embd.weight")

    # a needed key missing: predictions are skipped with one reason, not a traceback
    lacking = write_gpt2_gguf(tmp_path / "lacking.gguf", skip_keys=("embedding_length",))
    with pytest.raises(InputError, match="no gpt2.embedding_length"):
        artifact_facts(lacking)
    out = predictions(lacking, {}, "", ["raspberry-pi-5"], None, None, {}, None)
    assert list(out) == ["predictions_note"] and "gpt2.embedding_length" in out["predictions_note"]
