"""Every script in examples/ runs as a user would run it (a subprocess, torch unimportable) on tiny
artifacts built here, and its output says it did what it promises."""

from __future__ import annotations

import inspect
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_model

EXAMPLES = REPO / "examples"

# each example and the tests that run it: a new example without a test fails test_every_example_is_exercised
EXERCISED = {
    "embed_runtime.py": ["test_embed_runtime"],
    "chat.py": ["test_chat_two_turns_and_reset", "test_chat_trims_history_to_the_context", "test_chat_errors_are_one_line"],
    "semantic_search.py": ["test_semantic_search_ranks_the_matching_line_first", "test_semantic_search_errors_are_one_line"],
    "openai_client.py": ["test_openai_client_against_edgekit_serve"],
    "pick_for_device.py": ["test_pick_for_device_prefers_quality_within_the_budget", "test_pick_for_device_when_nothing_fits"],
}

# the documents semantic_search.py ranks (and the encoder fixture validates on)
DOCS = [
    "The cat sat on the warm windowsill all afternoon.",
    "Quarterly revenue grew by twelve percent thanks to strong sales in Europe.",
    "",
    "To reset your password, open Settings and choose Security.",
    "The recipe needs two eggs, flour, sugar and a pinch of salt.",
    "The train to Berlin leaves from platform nine at noon.",
]


def test_every_example_is_exercised():
    on_disk = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert on_disk == sorted(EXERCISED), "add the new example (and a test that runs it) to EXERCISED"
    missing = [t for tests in EXERCISED.values() for t in tests if not callable(globals().get(t))]
    assert not missing, f"EXERCISED names tests that do not exist: {missing}"
    idle = [t for name, tests in EXERCISED.items() for t in tests if f'"{name}"' not in inspect.getsource(globals()[t])]
    assert not idle, f"these tests do not run the example they are listed under: {idle}"


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def no_torch(tmp_path_factory) -> dict:
    """An environment in which `import torch` fails: the examples promise they never need it."""
    d = tmp_path_factory.mktemp("no-torch")
    (d / "torch").mkdir()
    (d / "torch" / "__init__.py").write_text('raise ImportError("the examples must not import torch")\n')
    path = [str(d), str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def run_example(env: dict, name: str, *args: str, stdin: str | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / name), *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The failure contract: exit 2, one `error: ...` line on stderr, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def tiny_llama():
    return tiny_model()


@pytest.fixture(scope="module")
def decoders(tmp_path_factory, tiny_llama) -> dict[str, Path]:
    """One tiny model converted by the real pipeline at f16 and q8_0: artifacts with real manifests (quality
    measured against the float reference). Not q4_0: llama.cpp repacks Q4_0 weights into a second, interleaved
    copy, so memory_fit rightly predicts a tiny q4_0 build to need no less memory than its q8_0 one."""
    import edgekit
    from edgekit.converters.gguf import GGUFExporter

    root = tmp_path_factory.mktemp("decoders")
    (root / "src").mkdir()
    GGUFExporter().export(tiny_llama, root / "src")
    out = {}
    for quant in ("f16", "q8_0"):
        out[quant] = root / f"tiny-{quant}"
        edgekit.convert(edgekit.ConvertRequest(str(root / "src" / "model.gguf"), "gguf", quant, out[quant],
                                               eval_tokens=256, calib_tokens=256))
    return out


@pytest.fixture(scope="module")
def onnx_decoder(tmp_path_factory, tiny_llama) -> Path:
    """The same tiny model as an ONNX decoder (no manifest: the directory's model file is opened)."""
    from edgekit.converters.onnx import ONNXExporter

    out = tmp_path_factory.mktemp("onnx-decoder")
    ONNXExporter().export(tiny_llama, out)
    return out


@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> Path:
    """The packaged all-MiniLM-L6-v2 at int8 (~15 s): a real encoder, so that search results mean something.
    Validated on a dozen sentences rather than the shipped 205 (10 s less)."""
    import edgekit

    root = tmp_path_factory.mktemp("enc")
    sentences = root / "sentences.txt"
    sentences.write_text("\n".join(DOCS + [f"Sentence {n} is about the weather, the sea or a quiet library." for n in range(8)]))
    out = root / "minilm-int8"
    edgekit.convert(edgekit.ConvertRequest("minilm", "onnx", "int8", out, eval_text=str(sentences)))
    return out


# ---------------------------------------------------------------- embed_runtime.py


def test_embed_runtime(no_torch, decoders):
    proc = run_example(no_torch, "embed_runtime.py", str(decoders["q8_0"]), "Hello", "there")
    assert proc.returncode == 0, proc.stderr
    *reply, last = proc.stdout.rstrip("\n").split("\n")
    assert "".join(reply).strip(), proc.stdout  # a streamed reply
    assert re.fullmatch(r"most likely next token: (['\"]).*\1", last), last


# ---------------------------------------------------------------- chat.py


def _turns(stdout: str) -> list[str]:
    """The assistant's replies, in order (each starts after 'assistant> ' and runs to the next prompt)."""
    return [chunk.split("assistant> ", 1)[1].rstrip("\n") for chunk in stdout.split("you> ") if "assistant> " in chunk]


def _stats(stderr: str) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in re.findall(r"\[prompt (\d+) tokens, reply (\d+) tokens", stderr)]


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_chat_two_turns_and_reset(no_torch, request, fmt):
    artifact = request.getfixturevalue("decoders")["q8_0"] if fmt == "gguf" else request.getfixturevalue("onnx_decoder")
    lines = "Hello there\nTell me more\n/reset\nHello there\n/quit\nnever read\n"
    proc = run_example(no_torch, "chat.py", str(artifact), "--temperature", "0", "--max-tokens", "12",
                       "--stats", stdin=lines)
    assert proc.returncode == 0, proc.stderr
    replies, stats = _turns(proc.stdout), _stats(proc.stderr)
    assert len(replies) == 3 and len(stats) == 3, (proc.stdout, proc.stderr)  # /quit stopped before "never read"
    assert all(r.strip() for r in replies) and all(0 < n <= 12 for _, n in stats)
    # the second turn's prompt holds the first exchange; /reset forgets it: the same question, the same
    # prompt and (greedy) the same answer as the first time
    assert stats[1][0] > stats[0][0] + stats[0][1]
    assert "(conversation cleared)" in proc.stdout
    assert stats[2] == stats[0] and replies[2] == replies[0]


def test_chat_trims_history_to_the_context(no_torch, decoders):
    words = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor"
    lines = "".join(f"{n} {words} {words}\n" for n in ("first", "second", "third", "fourth"))
    # 256: llama.cpp rounds a context up to a multiple of 256
    proc = run_example(no_torch, "chat.py", str(decoders["q8_0"]), "--temperature", "0", "--max-tokens", "32",
                       "--n-ctx", "256", "--stats", stdin=lines)
    assert proc.returncode == 0, proc.stderr
    stats = _stats(proc.stderr)
    assert len(stats) == 4 and "trimmed 2 old messages" in proc.stderr, proc.stderr
    assert all(p + 32 <= 256 for p, _ in stats)


def test_chat_errors_are_one_line(no_torch, decoders, tmp_path):
    assert "does not exist" in one_error_line(run_example(no_torch, "chat.py", str(tmp_path / "nothing"), stdin=""))
    # a message that cannot fit even alone is refused, and the chat goes on
    proc = run_example(no_torch, "chat.py", str(decoders["q8_0"]), "--temperature", "0", "--max-tokens", "8",
                       "--n-ctx", "256", "--stats", stdin="word " * 400 + "\nhi\n")
    assert proc.returncode == 0, proc.stderr
    assert "exceeds the context of 256" in proc.stderr and len(_stats(proc.stderr)) == 1, proc.stderr


# ---------------------------------------------------------------- semantic_search.py



def _hits(stdout: str) -> list[tuple[int, float, int, str]]:
    rows = re.findall(r"^\s*(\d+)\s+(-?[\d.]+)\s+line (\d+): (.*)$", stdout, re.M)
    return [(int(r), float(s), int(n), t) for r, s, n, t in rows]


def test_semantic_search_ranks_the_matching_line_first(no_torch, minilm, tmp_path):
    docs = tmp_path / "docs.txt"
    docs.write_text("\n".join(DOCS) + "\n")
    proc = run_example(no_torch, "semantic_search.py", str(minilm), str(docs), "how do I change my password?", "--top-k", "3")
    assert proc.returncode == 0, proc.stderr
    hits = _hits(proc.stdout)
    assert [h[0] for h in hits] == [1, 2, 3] and "top 3 of 5 lines" in proc.stdout
    assert hits[0][2:] == (4, DOCS[3])  # the blank line is skipped but line numbers are the file's
    assert hits[0][1] > hits[1][1] + 0.2 and hits[1][1] >= hits[2][1]
    # a line searched for verbatim is its own best match, at cosine 1; every line is listed when top-k allows
    proc = run_example(no_torch, "semantic_search.py", str(minilm), str(docs), DOCS[5], "--top-k", "10")
    hits = _hits(proc.stdout)
    assert len(hits) == 5 and hits[0][2] == 6 and hits[0][1] == pytest.approx(1.0, abs=1e-3)
    assert all(-1.0 <= h[1] <= 1.0 + 1e-3 for h in hits)


def test_semantic_search_errors_are_one_line(no_torch, minilm, decoders, tmp_path):
    docs = tmp_path / "docs.txt"
    docs.write_text("one line\n")
    assert "not a sentence encoder" in one_error_line(run_example(no_torch, "semantic_search.py", str(decoders["q8_0"]),
                                                                  str(docs), "q"))
    assert "cannot read" in one_error_line(run_example(no_torch, "semantic_search.py", str(minilm), str(tmp_path / "no.txt"),
                                                       "q"))
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert "no non-empty lines" in one_error_line(run_example(no_torch, "semantic_search.py", str(minilm),
                                                              str(tmp_path / "empty.txt"), "q"))


# ---------------------------------------------------------------- openai_client.py


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return json.load(resp) if resp.status == 200 else None
    except OSError:
        return None


def test_openai_client_against_edgekit_serve(no_torch, decoders, minilm, tmp_path):
    port, key = _free_port(), "test-key"
    log = tmp_path / "serve.log"
    with open(log, "w") as fh:
        server = subprocess.Popen([str(Path(sys.executable).parent / "edgekit"), "serve", str(decoders["q8_0"]), str(minilm),
                                   "--host", "127.0.0.1", "--port", str(port), "--api-key", key],
                                  stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while _get(f"http://127.0.0.1:{port}/health") is None:
            assert server.poll() is None, f"edgekit serve exited {server.returncode}: {log.read_text()[-2000:]}"
            assert time.time() < deadline, f"edgekit serve was not healthy within 60 s: {log.read_text()[-2000:]}"
            time.sleep(0.3)
        base = ["--base-url", f"http://127.0.0.1:{port}/v1", "--max-tokens", "12"]
        proc = run_example(no_torch, "openai_client.py", *base, "--api-key", key)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out = proc.stdout
        # both models listed under their directory names, with their kinds
        assert re.search(r"^\s+tiny-q8_0\s+\(decoder", out, re.M) and re.search(r"^\s+minilm-int8\s+\(encoder", out, re.M), out
        full = re.search(r"^chat \(tiny-q8_0\):\n\s+(['\"])(.+)\1\n"
                         r"\s+finish_reason=(\w+) prompt_tokens=(\d+) completion_tokens=(\d+)$", out, re.M)
        assert full and full.group(2).strip() and 0 < int(full.group(5)) <= 12 and int(full.group(4)) > 0, out
        streamed = re.search(r"^streamed chat \(tiny-q8_0\):\n\s+(.*?)\n\s+\((\d+) deltas\)$", out, re.M | re.S)
        assert streamed and streamed.group(1).strip() and int(streamed.group(2)) >= 2, out  # text in several deltas
        emb = re.search(r"^embeddings \(minilm-int8\): 2 vectors of 384 dimensions\n\s+cosine\(.*\) = ([\d.]+)$", out, re.M)
        assert emb and 0.5 < float(emb.group(1)) <= 1.0001, out  # two sentences about a sitting cat
        # a wrong key is the server's 401, as one line
        assert "401" in one_error_line(run_example(no_torch, "openai_client.py", *base, "--api-key", "wrong"))
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


# ---------------------------------------------------------------- pick_for_device.py


def _table(stdout: str) -> dict[str, tuple[str, str, str]]:
    """artifact -> (fits, KLD, bits/w) from the candidates table."""
    rows = re.findall(r"^\s+(\S+)\s+(\S+)\s+([\d.]+ \w+)\s+(yes|no)\s+(\S+)\s+(\S+)$", stdout, re.M)
    return {Path(r[0]).name: (r[3], r[4], r[5]) for r in rows}


def test_pick_for_device_prefers_quality_within_the_budget(no_torch, decoders):
    from edgekit import memory_fit
    from edgekit.manifest import read_manifest

    big, small = decoders["f16"], decoders["q8_0"]
    need = {k: memory_fit.estimate(p, n_ctx=512).total_bytes for k, p in decoders.items()}
    kld = {k: read_manifest(p)["quality"]["kld_mean"] for k, p in decoders.items()}
    assert need["q8_0"] < need["f16"] and kld["f16"] < kld["q8_0"]  # the premise: better costs more
    args = [str(big), str(small), "--n-ctx", "512", "--max-tokens", "8"]

    # room for both: the better quality (f16) wins
    proc = run_example(no_torch, "pick_for_device.py", *args, "--max-memory", str(need["f16"]))
    assert proc.returncode == 0, proc.stderr
    table = _table(proc.stdout)
    assert table == {"tiny-f16": ("yes", f"{kld['f16']:.4f}", table["tiny-f16"][2]),
                     "tiny-q8_0": ("yes", f"{kld['q8_0']:.4f}", table["tiny-q8_0"][2])}, proc.stdout
    assert float(table["tiny-f16"][2]) > float(table["tiny-q8_0"][2])  # bits per weight
    assert re.search(rf"^picked: {re.escape(str(big))} \(lowest KL divergence", proc.stdout, re.M), proc.stdout
    assert re.search(r"^  needs weights .* = [\d.]+ MiB$", proc.stdout, re.M), proc.stdout  # memory_fit's breakdown
    reply = re.search(r"^reply: (.*)$", proc.stdout, re.M | re.S)
    assert reply and reply.group(1).strip(), proc.stdout

    # one byte less: only q8_0 fits, and it is picked
    proc = run_example(no_torch, "pick_for_device.py", *args, "--max-memory", str(need["f16"] - 1))
    assert proc.returncode == 0, proc.stderr
    assert {k: v[0] for k, v in _table(proc.stdout).items()} == {"tiny-f16": "no", "tiny-q8_0": "yes"}, proc.stdout
    assert re.search(rf"^picked: {re.escape(str(small))} ", proc.stdout, re.M), proc.stdout

    # sizes with units, and the default budget (what this machine has available) fits both tiny builds
    proc = run_example(no_torch, "pick_for_device.py", *args, "--max-memory", "1TiB")
    assert proc.returncode == 0 and "memory budget: 1024.00 GiB" in proc.stdout and f"picked: {big}" in proc.stdout, proc.stdout
    proc = run_example(no_torch, "pick_for_device.py", *args)
    assert proc.returncode == 0 and "(available now)" in proc.stdout and f"picked: {big}" in proc.stdout, (proc.stdout,
                                                                                                      proc.stderr)


def test_pick_for_device_when_nothing_fits(no_torch, decoders):
    proc = run_example(no_torch, "pick_for_device.py", str(decoders["f16"]), str(decoders["q8_0"]), "--max-memory", "1MiB")
    assert "none of the 2 artifacts fits in 1.00 MiB" in one_error_line(proc)
    assert {v[0] for v in _table(proc.stdout).values()} == {"no"}, proc.stdout
    proc = run_example(no_torch, "pick_for_device.py", str(decoders["q8_0"]), "--max-memory", "lots")
    assert "is not a size" in one_error_line(proc)
