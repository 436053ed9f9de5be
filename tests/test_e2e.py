"""End to end on the embedded SmolLM2-135M: convert, run, profile, and the quality targets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.e2e


def other_prose(tmp_path: Path) -> Path:
    """English prose from a different source than the shipped texts (the GNU GPL, on Debian systems)."""
    gpl = Path("/usr/share/common-licenses/GPL-3")
    path = tmp_path / "other.txt"
    if gpl.exists():
        path.write_text(gpl.read_text())
    else:
        from pydoc_data.topics import topics

        path.write_text("\n\n".join(topics[k] for k in ("import", "typesseq", "try")))
    return path


def test_manifest_describes_the_artifact(e2e_artifacts):
    out, m = e2e_artifacts["int4"]
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["recipe"]["quant"] == "int4" and on_disk["artifact"]["file"] == "model.gguf"
    f = {e["path"]: e for e in on_disk["files"]}["model.gguf"]
    assert f["bytes"] == (out / "model.gguf").stat().st_size and len(f["sha256"]) == 64
    assert on_disk["source"]["kind"] == "default" and len(on_disk["source"]["sha256"]) == 64
    assert 4.5 <= on_disk["bits_per_weight"] < 6.0
    assert on_disk["recipe"]["calibration"]["tokens"] >= 2048
    assert {"gguf", "llama-cpp-python", "torch"} <= set(on_disk["tools"])
    assert on_disk["quality"]["tokens"] > 2000


def test_q8_0_perplexity_within_one_percent(e2e_artifacts):
    q = e2e_artifacts["q8_0"][1]["quality"]
    assert abs(q["ppl"] / q["ref_ppl"] - 1) < 0.01, q


def test_int4_beats_round_to_nearest_on_shipped_text(e2e_artifacts):
    rtn = e2e_artifacts["q4_0"][1]["quality"]
    ours = e2e_artifacts["int4"][1]["quality"]
    assert ours["kld_mean"] < 0.8 * rtn["kld_mean"], (ours, rtn)
    assert ours["ppl"] < rtn["ppl"]


def test_int4_beats_round_to_nearest_on_other_prose(e2e_artifacts, tmp_path):
    import edgekit
    from edgekit.evaluate import measure_quality
    from edgekit.harness.quality import read_text
    from edgekit.sources import load_reference, resolve

    text, label = read_text(other_prose(tmp_path))
    src = resolve(None)
    ref = load_reference(src)
    kld = {}
    for quant in ("q4_0", "int4"):
        with edgekit.load(e2e_artifacts[quant][0]) as s:
            kld[quant] = measure_quality(s, ref, src.sha256, text, label)["kld_mean"]
    assert kld["int4"] < 0.8 * kld["q4_0"], kld


def test_run_streams_a_reply(e2e_artifacts):
    proc = run_cli("run", str(e2e_artifacts["int4"][0]), "What is the capital of France?", "--max-tokens", "24")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip()) > 5


def test_profile_json(e2e_artifacts, tmp_path):
    proc = run_cli("profile", str(e2e_artifacts["q4_0"][0]), "--json", "--reps", "2", "--decode-tokens", "16",
                   "--eval-text", str(other_prose(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    for key in ("format", "size_bytes", "bits_per_weight", "load_s", "ttft_ms", "prefill_tok_s", "decode_tok_s", "peak_rss_bytes"):
        assert r[key], key
    assert r["format"] == "gguf" and r["peak_rss_bytes"] > r["size_bytes"] * 0.5
    q = r["quality"]
    for key in ("ppl", "ref_ppl", "kld_mean", "kld_p99", "top1_agreement"):
        assert q[key] > 0, key
    assert q["text"] == "other.txt"
