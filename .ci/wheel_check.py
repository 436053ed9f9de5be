"""Helpers of .ci/wheel_check.sh, run by the fresh venvs' own Python (never the dev venv's).

    python wheel_check.py tiny-model REPO DIR      a tiny Qwen2 Hugging Face directory (needs [convert])
    python wheel_check.py run OUT.npz ARTIFACT...  edgekit.load each artifact: generate + logits, saved
    python wheel_check.py compare A.npz B.npz      the two installs computed the same numbers
    python wheel_check.py no-torch                 torch / transformers are not importable here
    python wheel_check.py serve EDGEKIT ARTIFACT... `edgekit serve` answers a chat completion per artifact

``edgekit`` must come from the installed wheel: the repository root is never put on sys.path (its
``edgekit/`` folder would shadow the wheel); only ``tests/`` is, for the tiny-model builders.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PROMPT = "The capital of France is"


def tiny_model(repo: str, out: str) -> None:
    sys.path.insert(0, str(Path(repo) / "tests"))
    from tiny_archs import save_hf_dir
    from tiny_tokenizers import qwen_tokenizer_dir

    import edgekit

    assert "site-packages" in edgekit.__file__, f"edgekit imported from {edgekit.__file__}, not the wheel"
    out = Path(out)
    vocab = qwen_tokenizer_dir(out.parent / "tiny-tokenizer")
    save_hf_dir("qwen2", out, tokenizer_dir=out.parent / "tiny-tokenizer", vocab_size=vocab)
    print(f"tiny qwen2 ({vocab} tokens) in {out}")


def run(out: str, artifacts: list[str]) -> None:
    import numpy as np

    import edgekit

    assert "site-packages" in edgekit.__file__, f"edgekit imported from {edgekit.__file__}, not the wheel"
    results = {}
    for i, path in enumerate(artifacts):
        with edgekit.load(path) as model:
            ids = model.tokenize(PROMPT)
            logits = np.asarray(model.logits(ids), dtype=np.float32)
            assert logits.shape[0] == len(ids) and np.isfinite(logits).all(), (path, logits.shape)
            text = model.generate(PROMPT, max_tokens=8)
            chat = "".join(model.generate("Hi", max_tokens=4, stream=True, chat=True))  # chat template (jinja2)
            print(f"{path}: {type(model).__name__}, {len(ids)} tokens, logits {logits.shape}, "
                  f"generate {text!r}, chat {chat!r}")
            results[f"logits{i}"] = logits
    np.savez(out, **results)
    assert "torch" not in sys.modules, "edgekit.load imported torch"


def compare(a: str, b: str) -> None:
    import numpy as np

    x, y = np.load(a), np.load(b)
    assert sorted(x.files) == sorted(y.files)
    for k in x.files:
        diff = float(np.abs(x[k] - y[k]).max())
        assert diff < 1e-4, f"{k}: the two installs differ by {diff}"
    print(f"same logits in both installs ({len(x.files)} artifacts)")


def no_torch() -> None:
    for mod in ("torch", "transformers", "safetensors", "sentencepiece", "onnx"):
        assert importlib.util.find_spec(mod) is None, f"{mod} is installed in the runtime-only venv"
    print("runtime-only venv: no torch, transformers, safetensors, sentencepiece, onnx")


def serve(edgekit: str, artifacts: list[str]) -> None:
    import json
    import socket
    import subprocess
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([edgekit, "serve", *artifacts, "--port", str(port)])
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            assert proc.poll() is None, f"edgekit serve exited {proc.returncode}"
            try:
                urllib.request.urlopen(base + "/health", timeout=2).read()
                break
            except OSError:
                time.sleep(0.2)
        for a in artifacts:
            body = json.dumps({"model": Path(a).name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}).encode()
            req = urllib.request.Request(base + "/v1/chat/completions", body, {"Content-Type": "application/json"})
            reply = json.loads(urllib.request.urlopen(req, timeout=60).read())
            assert reply["object"] == "chat.completion" and reply["usage"]["completion_tokens"] >= 1, reply
        print(f"edgekit serve answered chat completions for {len(artifacts)} artifacts")
    finally:
        proc.terminate()
        proc.wait(timeout=20)


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"tiny-model": lambda: tiny_model(*args), "run": lambda: run(args[0], args[1:]),
     "compare": lambda: compare(*args), "no-torch": no_torch, "serve": lambda: serve(args[0], args[1:])}[cmd]()
