"""Reliability: verified artifacts, crash-safe writes (SIGKILL mid-conversion, a full disk), sandboxed chat
templates, no code execution from user files, and a quick slice of the fuzzing suite (tests/fuzz)."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgekit.errors import InputError
from tests.conftest import REPO, run_cli, tiny_model
from tests.test_bad_inputs import assert_one_line_error, leftovers

EDGEKIT = str(Path(sys.executable).parent / "edgekit")


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory) -> Path:
    from edgekit.converters.gguf import GGUFExporter

    d = tmp_path_factory.mktemp("src")
    GGUFExporter().export(tiny_model(), d)
    return d / "model.gguf"


@pytest.fixture(scope="module")
def artifact(tiny_src, tmp_path_factory) -> Path:
    from edgekit.pipeline import ConvertRequest, convert

    out = tmp_path_factory.mktemp("art") / "q8"
    convert(ConvertRequest(str(tiny_src), "gguf", "q8_0", out, eval_tokens=512))
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _flip_weight_byte(art: Path) -> None:
    f = art / "model.gguf"
    data = bytearray(f.read_bytes())
    data[len(data) - 1000] ^= 0x01  # inside the last tensor's data: the header still parses
    f.write_bytes(bytes(data))


# ---------------------------------------------------------------- verified artifacts


def test_a_flipped_weight_byte_is_refused_by_verify_load_profile_and_serve(artifact, tmp_path):
    import edgekit

    good = run_cli("verify", str(artifact))
    assert good.returncode == 0 and "match manifest.json" in good.stdout, good.stderr
    bad = _copy(artifact, tmp_path / "bad")
    _flip_weight_byte(bad)
    assert_one_line_error(run_cli("verify", str(bad)), "model.gguf", "sha256")
    with pytest.raises(InputError, match="model.gguf does not match the sha256"):
        edgekit.load(bad, verify=True)
    with edgekit.load(bad) as s:  # without verify only sizes are compared: same size, so it opens
        assert s.n_vocab > 0
    assert_one_line_error(run_cli("profile", str(bad), "--no-quality", "--reps", "1", "--decode-tokens", "2"), "sha256")
    proc = subprocess.run([EDGEKIT, "serve", str(bad), "--port", "0"], capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc, "model.gguf", "sha256")


def test_a_truncated_or_swapped_file_is_refused_on_every_load(artifact, tmp_path):
    import edgekit

    bad = _copy(artifact, tmp_path / "short")
    f = bad / "model.gguf"
    f.write_bytes(f.read_bytes()[:-4096])
    with pytest.raises(InputError, match=r"model.gguf is \d+ bytes; its manifest says \d+"):
        edgekit.load(bad)


def test_a_manifest_naming_files_outside_its_directory_is_refused(artifact, tmp_path):
    import edgekit

    bad = _copy(artifact, tmp_path / "escape")
    m = json.loads((bad / "manifest.json").read_text())
    m["files"].append({"path": "../../etc/passwd", "bytes": 1, "sha256": "0" * 64})
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(InputError, match="not a file inside the artifact directory"):
        edgekit.load(bad)
    assert_one_line_error(run_cli("verify", str(bad)), "not a file inside")


def test_verified_digests_are_remembered_until_the_file_changes(artifact, tmp_path, monkeypatch):
    from edgekit import cache, verify

    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache"))
    art = _copy(artifact, tmp_path / "a")
    calls = []
    real = cache.sha256_file
    monkeypatch.setattr(cache, "sha256_file", lambda p, *a: calls.append(p) or real(p, *a))
    verify.verify(art)
    n = len(calls)
    verify.verify(art)
    assert len(calls) == n  # nothing hashed again
    _flip_weight_byte(art)
    os.utime(art / "model.gguf", ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(InputError, match="sha256"):
        verify.verify(art)


# ---------------------------------------------------------------- crash-safe writes


def _complete(out: Path) -> bool:
    from edgekit.verify import verify

    try:
        verify(out)
        return True
    except InputError:
        return False


@pytest.mark.parametrize("kills", [pytest.param(2, id="2-kills"), pytest.param(20, id="20-kills", marks=pytest.mark.slow)])
def test_sigkill_mid_conversion_leaves_the_previous_artifact_or_nothing(tiny_src, tmp_path, kills):
    """Kill `edgekit convert` at random points (uniform over one whole run's duration, shared cache so the
    kills also land in reference-cache writes): the output is the previous good artifact, a new complete one,
    or absent; never partial; and the next run succeeds."""
    env = {**os.environ, "EDGEKIT_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "out"
    argv = [EDGEKIT, "convert", str(tiny_src), "-q", "q8_0", "-o", str(out), "--force"]
    t0 = time.monotonic()
    subprocess.run(argv, env=env, check=True, capture_output=True, timeout=600)
    full = time.monotonic() - t0
    shutil.rmtree(tmp_path / "cache")  # the kills start cold, so some land in the cache writes
    previous = json.loads((out / "manifest.json").read_text())["files"]
    rng = random.Random(20)
    outcomes = []
    for k in range(kills):
        if k % 2:
            shutil.rmtree(out, ignore_errors=True)  # half the kills with no previous artifact
        had = out.exists()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.0, full))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():
            assert _complete(out), f"kill {k}: {out} is a partial artifact"
            files = json.loads((out / "manifest.json").read_text())["files"]
            outcomes.append("previous" if had and files == previous else "new")
        else:
            outcomes.append("nothing")
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (outcomes, done.stderr[-2000:])
    assert _complete(out) and not leftovers(out), (leftovers(out), outcomes)


def test_a_full_disk_is_one_line_and_leaves_nothing(tiny_src, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and tmpfs mounts (CI runs as root)")
    try:
        out = mnt / "out"
        proc = run_cli("convert", str(tiny_src), "-q", "q8_0", "-o", str(out))  # 5 MB into 2 MB
        assert_one_line_error(proc, "cannot write", "no space left")
        assert not out.exists() and not list(mnt.iterdir()), list(mnt.iterdir())
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_damaged_reference_cache_is_rebuilt(tiny_src, tmp_path):
    env = {"EDGEKIT_CACHE": str(tmp_path / "cache")}
    assert run_cli("convert", str(tiny_src), "-q", "q8_0", "-o", str(tmp_path / "a"), env=env).returncode == 0
    metas = list((tmp_path / "cache" / "reference").rglob("meta.json"))
    assert metas
    for m in metas:
        m.write_text(m.read_text()[:100])  # a write cut short by a crash (before writes were atomic)
    proc = run_cli("convert", str(tiny_src), "-q", "q8_0", "-o", str(tmp_path / "b"), env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ---------------------------------------------------------------- untrusted metadata


ESCAPE = "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}"


@pytest.mark.parametrize("runtime", ["llamacpp", "onnxruntime"])
def test_a_chat_template_cannot_reach_python_internals(runtime, tmp_path):
    import edgekit
    from edgekit.converters.gguf import GGUFExporter
    from edgekit.converters.onnx import ONNXExporter

    marker = tmp_path / "pwned"
    m = tiny_model()
    m.tokenizer["tokenizer.chat_template"] = dict(m.tokenizer["tokenizer.chat_template"],
                                                  value=ESCAPE.replace("MARKER", str(marker)))
    (GGUFExporter if runtime == "llamacpp" else ONNXExporter)().export(m, tmp_path)
    path = tmp_path / ("model.gguf" if runtime == "llamacpp" else "model.onnx")
    try:
        with edgekit.load(path) as s:
            with pytest.raises(InputError, match="chat template"):
                s.chat_prompt([{"role": "user", "content": "hi"}])
    except InputError as exc:  # llama-cpp-python compiles the template while loading: refused there
        assert "chat template" in str(exc)
    assert not marker.exists()


def test_no_pickle_torch_load_or_remote_code_on_user_files():
    """safetensors only: nothing edgekit ships unpickles a file or runs a model's own code."""
    pattern = re.compile(r"\bpickle\b|torch\.load\(|trust_remote_code\s*=\s*True|np\.load\([^)]*allow_pickle\s*=\s*True")
    hits = []
    for d in ("edgekit", "runtimes", "converters"):
        for f in (REPO / d).rglob("*.py"):
            for n, line in enumerate(f.read_text().splitlines(), 1):
                if pattern.search(line) and not line.lstrip().startswith("#"):
                    hits.append(f"{f.relative_to(REPO)}:{n}: {line.strip()}")
    assert not hits, hits


# ---------------------------------------------------------------- the fuzzing suite, a quick slice


def test_fuzzing_quick_slice_has_no_bad_outcome(tmp_path):
    """About 24 seeded cases over every input kind (the full run is `make fuzz`)."""
    proc = subprocess.run([sys.executable, "-m", "tests.fuzz", "--cases", "24", "--seed", "7", "--seeds",
                           str(tmp_path / "seeds"), "--json", str(tmp_path / "fuzz.json"), "--failures",
                           str(tmp_path / "failures")], cwd=REPO, capture_output=True, text=True, timeout=1500)
    report = json.loads((tmp_path / "fuzz.json").read_text())
    assert report["cases"] >= 20 and len(report["table"]) == 12  # every kind, and the total
    assert proc.returncode == 0, [b for b in report["bad"]] or proc.stderr[-3000:]


def test_a_ledger_line_cut_by_a_crash_costs_only_that_line(tmp_path, monkeypatch):
    from edgekit.targets import plan

    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path))
    q = {"kld_mean": 0.1, "top1_agreement": 0.9, "ppl": 10.0, "ref_ppl": 9.0, "text": "edgekit:eval"}
    plan.record_quality("src", "q8_0", "gguf", q, 100)
    with open(plan.ledger_path(), "a") as f:
        f.write('{"source": "src", "quant": "q4_0", "for')  # the process died mid-line
    plan.record_quality("src", "int4", "gguf", q, 50)
    assert set(plan.known_quality("src")) == {("q8_0", "gguf"), ("int4", "gguf")}


def test_the_gguf_check_passes_good_files(tiny_src, artifact):
    from edgekit.formats.gguf_header import check
    from edgekit.sources import default_model_path

    for f in (default_model_path(), tiny_src, artifact / "model.gguf"):
        h = check(f)
        assert h.tensors and h.value("general.architecture") == "llama"


@pytest.mark.parametrize("role,key,value,words", [
    ("kv.value", "llama.block_count", (1 << 32) - 2, "block_count"),  # aborted llama.cpp (SIGABRT)
    ("kv.value", "llama.context_length", 1 << 31, "context_length"),  # a Python error inside llama-cpp-python
    ("tensor.type", "output_norm.weight", 1, "not F32"),  # F16 norm: aborted llama.cpp
    ("tensor.offset", "blk.1.ffn_down.weight", 1 << 40, "past the end"),
    ("kv.count", "tokenizer.ggml.tokens", 1 << 60, "past the end"),
    ("header.n_kv", "", 1 << 50, "more than the file holds"),
    ("tensor.dim", "token_embd.weight", 0, "dimension 0"),
])
def test_the_gguf_check_refuses_what_llama_cpp_trusts(tiny_src, tmp_path, role, key, value, words):
    import edgekit
    from tests.fuzz.mutate import gguf_layout

    lay = gguf_layout(str(tiny_src))
    part = next(p for p in lay.parts if p.role == role and p.key == key)
    data = bytearray(tiny_src.read_bytes())
    data[part.offset : part.offset + part.size] = (value & ((1 << (8 * part.size)) - 1)).to_bytes(part.size, "little")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(InputError, match=words) as exc:
        edgekit.load(bad)
    assert "not a valid GGUF" in exc.value.one_line() and "\n" not in exc.value.one_line()
