"""Bad inputs give one clear line, a non-zero exit, and leave nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from edgekit.converters.gguf import GGUFExporter
from edgekit.errors import ValidationError
from tests.conftest import run_cli, tiny_model


def assert_one_line_error(proc, *words):
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w.lower() in errors[0].lower(), errors[0]


def leftovers(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny")
    GGUFExporter().export(tiny_model(), d)
    return d / "model.gguf"


def test_missing_path(tmp_path):
    out = tmp_path / "out"
    assert_one_line_error(run_cli("convert", str(tmp_path / "nope.gguf"), "-o", str(out)), "does not exist")
    assert not out.exists()


def test_truncated_gguf(tmp_path, tiny_gguf):
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    out = tmp_path / "out"
    assert_one_line_error(run_cli("convert", str(bad), "-o", str(out)), "not a valid GGUF", "truncated")
    assert not out.exists() and not leftovers(out)


def test_random_bytes_gguf(tmp_path):
    bad = tmp_path / "random.gguf"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    out = tmp_path / "out"
    assert_one_line_error(run_cli("convert", str(bad), "-o", str(out)), "not a valid GGUF")
    assert not out.exists()


def _stub_gguf(path, arch: str):
    """A GGUF with one layer count and one tensor: enough header for the architecture checks."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_architecture_gguf(tmp_path):
    proc = run_cli("convert", str(_stub_gguf(tmp_path / "mamba.gguf", "mamba")), "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, "architecture 'mamba' is not supported", "convertible: gemma3, llama, phi3, qwen2, qwen3")


def test_supported_architecture_with_missing_metadata_gguf(tmp_path):
    proc = run_cli("convert", str(_stub_gguf(tmp_path / "qwen.gguf", "qwen2")), "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, "qwen2.attention.head_count is missing")


def test_unsupported_architecture_hf_dir(tmp_path):
    d = tmp_path / "t5"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "t5", "hidden_size": 8}))
    (d / "model.safetensors").write_bytes(b"")
    assert_one_line_error(run_cli("convert", str(d), "-o", str(tmp_path / "out")), "'t5' is not supported", "llama")


def test_existing_output_dir_needs_force(tmp_path, tiny_gguf):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert_one_line_error(run_cli("convert", str(tiny_gguf), "-q", "q8_0", "-o", str(out)), "not empty", "--force")
    assert (out / "keep.txt").read_text() == "user data"


def test_unknown_quant_and_format(tmp_path):
    assert_one_line_error(run_cli("convert", "-q", "q3_x", "-o", str(tmp_path / "o")), "no compression pass named 'q3_x'")
    assert_one_line_error(run_cli("convert", "-f", "tflite", "-o", str(tmp_path / "o")), "no exporter named 'tflite'")


def test_run_and_profile_on_corrupt_or_missing_artifacts(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    assert_one_line_error(run_cli("run", str(bad), "hi"), "not a valid GGUF")
    assert_one_line_error(run_cli("profile", str(tmp_path / "missing")), "does not exist")


# ------------------------------------------------------------------ atomic writes, in process


def test_failed_validation_leaves_nothing(tmp_path, tiny_gguf, monkeypatch):
    """A real validation failure (tolerance tightened below what q8_0 achieves) writes nothing."""
    from edgekit import pipeline as conv
    from edgekit.passes.rtn import Q8_0Pass

    monkeypatch.setattr(Q8_0Pass, "tolerance", {"kld_mean": 0.0})
    out = tmp_path / "out"
    with pytest.raises(ValidationError) as err:
        conv.convert(conv.ConvertRequest(str(tiny_gguf), "gguf", "q8_0", out, eval_tokens=512))
    assert "mean KL divergence" in err.value.one_line() and "tolerance" in err.value.one_line()
    assert not out.exists() and not leftovers(out)


def test_interrupt_during_export_leaves_nothing_and_keeps_old_artifact(tmp_path, tiny_gguf, monkeypatch):
    from edgekit import pipeline as conv

    out = tmp_path / "out"
    out.mkdir()
    (out / "model.gguf").write_bytes(b"previous good artifact")

    def half_write(self, model, stage):
        (stage / "model.gguf").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(GGUFExporter, "export", half_write)
    with pytest.raises(KeyboardInterrupt):
        conv.convert(conv.ConvertRequest(str(tiny_gguf), "gguf", "q8_0", out, force=True, eval_tokens=512))
    assert (out / "model.gguf").read_bytes() == b"previous good artifact"
    assert not leftovers(out)


def test_manifest_is_read_back_with_validation(tmp_path):
    """A hand-edited or foreign manifest.json is one clear line, never a KeyError deep inside a runtime."""
    import json

    import edgekit
    from edgekit.errors import InputError
    from edgekit.manifest import read_manifest

    good = {"schema": 2, "artifact": {"file": "model.gguf", "format": "gguf", "runtime": "llamacpp"},
            "size_bytes": 10, "source": {"kind": "gguf", "path": "/x.gguf", "sha256": "0" * 64}}
    cases = {"schema": ({"schema": 99}, "schema 99"),
             "no file": ({"artifact": {"format": "gguf"}}, "artifact.file"),
             "escapes": ({"artifact": {"file": "../model.gguf", "format": "gguf"}}, "not a file name"),
             "type": ({"size_bytes": "big"}, "size_bytes"),
             "source": ({"source": {"kind": "gguf"}}, "source must record")}
    d = tmp_path / "art"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps(good))
    assert read_manifest(d)["artifact"]["file"] == "model.gguf"
    for patch, words in cases.values():
        (d / "manifest.json").write_text(json.dumps({**good, **patch}))
        with pytest.raises(InputError, match=words):
            edgekit.load(d)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        read_manifest(d)


@pytest.mark.parametrize("args, words", [
    (("convert", "--recipe", "prune20", "--prune", "0.2"), ("does not combine",)),
    (("convert", "--draft-for", "somewhere", "--quant", "int4"), ("--draft-for", "--quant")),
    (("convert", "--draft-for", "somewhere"), ("not an artifact directory",)),
])
def test_flags_that_do_not_go_together_are_one_line(tmp_path, args, words):
    """Usage errors raised inside a command (typer's vendored click) are one line too, not a traceback."""
    assert_one_line_error(run_cli(*args, "-o", str(tmp_path / "out")), *words)
