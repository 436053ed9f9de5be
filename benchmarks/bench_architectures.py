"""Architecture benchmark: every architecture x format x recipe against transformers itself.

Tiny random models of each family (tests/tiny_archs.py: transformers' own classes, randomised norms and
biases, SmolLM2's vocabulary) are compressed, exported and run by each format's runtime (GGUF through
llama.cpp, ONNX through ONNX Runtime) on 1,024 tokens of the shipped evaluation text in windows of 128;
the KL divergence of the next-token distributions and the top-1 agreement are taken against
transformers' float logits for the same ids. Core ML packages build on Linux but need macOS to run:
their cell says so. These are random models: KLD measures how faithfully each format computes the
architecture and carries the quantized numbers, not how good a quantizer is on trained weights
(for that see bench_spine / bench_onnx on SmolLM2).

Prints a table and writes benchmarks/results/architectures.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

RECIPES = ("f16", "q8_0", "int4")
FORMATS = ("gguf", "onnx")


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def stats(got: np.ndarray, want: np.ndarray) -> dict:
    p, q = log_softmax(want), log_softmax(got)
    kl = (np.exp(p) * (p - q)).sum(-1)
    return {"kld_mean": float(kl.mean()), "kld_p99": float(np.percentile(kl, 99)),
            "top1": float((got.argmax(-1) == want.argmax(-1)).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--out", default=str(HERE / "results" / "architectures.json"))
    args = ap.parse_args()

    from conftest import smollm_tokenizer  # noqa: F401  (tiny_archs reads it)
    from tiny_archs import NAMES, edgekit_model, hf_logits

    from edgekit.converters.gguf import GGUFExporter
    from edgekit.converters.onnx import ONNXExporter
    from edgekit.harness.quality import read_text
    from edgekit.model import Model
    from edgekit.passes import PassContext
    from edgekit.registry import PASSES
    from edgekit.runtimes.llamacpp import LlamaCppSession
    from edgekit.runtimes.onnxruntime import OnnxRuntimeSession
    from edgekit.sources import default_model_path

    tokenize = LlamaCppSession(default_model_path(), vocab_only=True).tokenize
    ids = tokenize(read_text(None)[0])[: args.tokens]
    windows = [ids[i: i + args.window] for i in range(0, len(ids) - args.window + 1, args.window)]
    calib = windows[:4]
    rows = []
    for name in NAMES:
        m, hf = edgekit_model(name)
        want = np.concatenate([hf_logits(hf, w) for w in windows])
        for recipe in RECIPES:
            q = Model(m.spec, dict(m.tensors), m.tokenizer, m.name, {})
            PASSES.get(recipe)().apply(q, PassContext(calibration_tokens=lambda: calib, reference=m))
            for fmt in FORMATS:
                exporter = {"gguf": GGUFExporter, "onnx": ONNXExporter}[fmt]()
                row = {"architecture": name, "format": fmt, "recipe": recipe}
                why = exporter.supports(q)
                if why:
                    rows.append(row | {"refused": why})
                    continue
                with tempfile.TemporaryDirectory() as d:
                    exporter.export(q, Path(d))
                    if fmt == "gguf":
                        sess = LlamaCppSession(Path(d) / "model.gguf", n_ctx=args.window)
                    else:
                        sess = OnnxRuntimeSession(Path(d) / "model.onnx", n_ctx=args.window)
                    with sess:
                        got = np.concatenate([sess.logits(w) for w in windows])
                rows.append(row | stats(got, want))
                Console().print(f"{name:8} {fmt:5} {recipe:5} KLD {rows[-1]['kld_mean']:.2e}", highlight=False)
    table = Table(title=f"KLD against transformers ({len(windows) * args.window} tokens, tiny random models)")
    for col in ("architecture", "recipe", *(f"{f} KLD mean / top-1" for f in FORMATS)):
        table.add_column(col)
    for name in NAMES:
        for recipe in RECIPES:
            cells = []
            for fmt in FORMATS:
                r = next(r for r in rows if (r["architecture"], r["recipe"], r["format"]) == (name, recipe, fmt))
                cells.append(r.get("refused") or f"{r['kld_mean']:.2e} / {r['top1']:.1%}")
            table.add_row(name, recipe, *cells)
    Console(width=160).print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"tokens": len(windows) * args.window, "window": args.window,
                                          "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
