"""Quality per bit: edgekit's recipes against llama.cpp's own quantizer, in and out of the calibration domain.

Every row is a GGUF of the embedded SmolLM2-135M scored by llama.cpp (edgekit's llama.cpp session) against
the float reference in torch, with edgekit's quality harness on two texts:

- in-domain: edgekit's shipped evaluation text (Python documentation; the calibration text is other
  sections of the same documentation);
- out-of-domain: English prose from another source (default /usr/share/common-licenses/GPL-3), never
  used for calibration or tuning.

llama.cpp rows: edgekit writes the f16 GGUF, then llama.cpp's own ``llama-quantize`` (Q4_0, IQ4_NL,
Q4_K_M) makes each file from it, with and without an importance matrix computed by ``llama-imatrix``
from edgekit's shipped calibration text (the same text edgekit's data-aware passes read). The two
binaries are built from the sources vendored in the pinned llama-cpp-python (benchmarks/build_llama_tools.sh,
about 25 minutes on 2 cores the first time); without them those rows are listed as missing, never faked.

Columns: file size, bits per weight over the 2-D weight tensors, mean / p99 KL divergence, top-1
agreement and perplexity (reference perplexity in the header). Prints a table and writes
benchmarks/results/quality.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OTHER_PROSE = Path("/usr/share/common-licenses/GPL-3")
LLAMA_TYPES = ("Q4_0", "IQ4_NL", "Q4_K_M")
# edgekit rows: (name, recipe passes)
EDGEKIT_ROWS = {
    "q4_0": [{"pass": "q4_0"}],
    "int4": [{"pass": "int4"}],
    "nl4": [{"pass": "nl4"}],
    "qat-int4": [{"pass": "qat"}],
    "qat-nl4": [{"pass": "qat", "grid": "nl4"}],
    "prune25-recover": "prune25-recover",
    "ternary-recover": "ternary-recover",
    "qat-ternary": [{"pass": "qat", "grid": "ternary"}],
    # mixed precision under a budget below Q4_0's 4.5 bits: 2-bit blocks exist in ONNX (MatMulNBits), not GGUF
    "int4-head4-onnx": ("int4-head4", "onnx"),
    # uniform int4 at 4.25 bits per weight (one fp16 scale per 64 weights): mixed-4.25's like-for-like rival
    "int4-g64-onnx": ([{"pass": "int4", "head": "int4", "block": 64}], "onnx"),
    "mixed-4.25-onnx": ([{"pass": "mixed", "bpw": 4.25}], "onnx"),
    "mixed-4.5-onnx": ([{"pass": "mixed", "bpw": 4.5}], "onnx"),  # the same size as int4-head4: a like-for-like test
}


def weight_bits(path: Path) -> float:
    """Bits per weight over the 2-D tensors (the linear weights and the embedding) of a GGUF file."""
    from edgekit.converters.gguf_layout import open_reader

    r = open_reader(path)
    mats = [t for t in r.tensors if len([d for d in t.shape if d > 1]) == 2]
    return 8 * sum(int(t.n_bytes) for t in mats) / max(1, sum(int(t.n_elements) for t in mats))


def model_mb(path: Path) -> float:
    """The artifact's weights on disk: the file, and an ONNX model's external data beside it."""
    from edgekit.cache import model_bytes

    return model_bytes(path) / 1e6


def score(path: Path, texts: dict[str, tuple[str, str]], tokens: int) -> dict:
    from edgekit.evaluate import measure_quality
    from edgekit.harness.quality import EvalConfig
    from edgekit.runtimes.llamacpp import LlamaCppSession
    from edgekit.sources import load_reference, resolve

    src = resolve(None)
    ref = load_reference(src)
    out = {}
    from edgekit.registry import RUNTIMES

    session = LlamaCppSession(path, n_ctx=512) if path.suffix == ".gguf" else RUNTIMES.get("onnxruntime").open(path)
    with session as s:
        for key, (body, label) in texts.items():
            q = measure_quality(s, ref, src.sha256, body, label, EvalConfig(max_tokens=tokens))
            out[key] = {k: q[k] for k in ("kld_mean", "kld_p99", "top1_agreement", "ppl", "ref_ppl")}
    return out


def edgekit_artifact(name: str, passes, out: Path, reuse: bool) -> tuple[Path, dict]:
    from edgekit import recipes
    from edgekit.manifest import read_manifest
    from edgekit.pipeline import ConvertRequest, convert

    passes, fmt = passes if isinstance(passes, tuple) else (passes, "gguf")
    d = out / f"edgekit-{name}"
    if reuse and read_manifest(d):
        return d / read_manifest(d)["artifact"]["file"], read_manifest(d)
    recipe = recipes.load(passes) if isinstance(passes, str) else recipes.check(recipes.Recipe(name, passes))
    t0 = time.perf_counter()
    m = convert(ConvertRequest(None, fmt, None, d, force=True, recipe=recipe))
    m["timings_s"]["bench_total_s"] = time.perf_counter() - t0
    return d / m["artifact"]["file"], m


def llama_tools(build: bool) -> Path | None:
    bin_dir = REPO / "out" / "llama-tools" / "build" / "bin"
    if (bin_dir / "llama-quantize").exists() and (bin_dir / "llama-imatrix").exists():
        return bin_dir
    if not build:
        return None
    subprocess.run(["bash", str(HERE / "build_llama_tools.sh")], check=True, cwd=REPO)
    return bin_dir


def llama_rows(out: Path, f16: Path, tools: Path, reuse: bool) -> dict[str, Path]:
    from edgekit.harness.quality import default_text_path

    files: dict[str, Path] = {}
    imatrix = out / "imatrix.gguf"
    if not (reuse and imatrix.exists()):
        subprocess.run([str(tools / "llama-imatrix"), "-m", str(f16), "-f", str(default_text_path("calibration")),
                        "-o", str(imatrix), "-c", "512", "-t", "2"], check=True, capture_output=True)
    for t in LLAMA_TYPES:
        for with_imatrix in (False, True):
            name = f"llama.cpp {t}" + (" + imatrix" if with_imatrix else "")
            path = out / f"llamacpp-{t}{'-imatrix' if with_imatrix else ''}.gguf"
            if not (reuse and path.exists()):
                cmd = [str(tools / "llama-quantize")] + (["--imatrix", str(imatrix)] if with_imatrix else []) \
                    + [str(f16), str(path), t, "2"]
                subprocess.run(cmd, check=True, capture_output=True)
            files[name] = path
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench-quality")
    ap.add_argument("--text", type=Path, default=OTHER_PROSE, help="out-of-domain English prose")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens scored per text")
    ap.add_argument("--rows", default=",".join(EDGEKIT_ROWS), help="edgekit rows to run (comma-separated)")
    ap.add_argument("--reuse", action="store_true", help="reuse artifacts already in --out")
    ap.add_argument("--no-build", action="store_true", help="do not build llama.cpp's tools when missing")
    args = ap.parse_args()
    from edgekit.harness.quality import read_text

    args.out.mkdir(parents=True, exist_ok=True)
    texts = {"in": read_text(None, "eval"), "out": (args.text.read_text(encoding="utf-8"), args.text.name)}
    rows: list[dict] = []

    f16, _ = edgekit_artifact("f16", [{"pass": "f16"}], args.out, True)
    files: dict[str, tuple[Path, dict]] = {"f16 (edgekit)": (f16, {})}
    tools = llama_tools(not args.no_build)
    if tools is None:
        rows += [{"name": f"llama.cpp {t}{s}", "missing": "llama.cpp tools not built (benchmarks/build_llama_tools.sh)"}
                 for t in LLAMA_TYPES for s in ("", " + imatrix")]
    else:
        files.update({k: (v, {}) for k, v in llama_rows(args.out, f16, tools, args.reuse).items()})
    for name in [r for r in args.rows.split(",") if r]:
        try:
            files[f"edgekit {name}"] = edgekit_artifact(name, EDGEKIT_ROWS[name], args.out, args.reuse)
        except Exception as exc:  # a recipe that fails is a row saying so, the others still run
            rows.append({"name": f"edgekit {name}", "missing": f"{type(exc).__name__}: {str(exc)[:160]}"})
    for name, (path, manifest) in files.items():
        t0 = time.perf_counter()
        q = score(path, texts, args.tokens)
        bpw = weight_bits(path) if path.suffix == ".gguf" else manifest["artifact"]["weights_bpw"]
        row = {"name": name, "file": str(path), "size_mb": model_mb(path), "bpw": bpw,
               "score_s": round(time.perf_counter() - t0, 1), **q}
        if manifest:
            row["convert_s"] = manifest.get("timings_s", {}).get("total_s")
            row["passes"] = [{k: v for k, v in p.items() if k in ("pass", "grid", "seconds", "seconds_training")}
                             for p in manifest.get("recipe", {}).get("passes", [])]
        rows.append(row)

    table = Table(title=f"quality per bit on the embedded SmolLM2-135M; in-domain = shipped eval text, "
                        f"out-of-domain = {args.text.name} ({args.tokens} tokens each)")
    for col in ("artifact", "MB", "bpw", "KLD in", "p99 in", "top-1 in", "ppl in", "KLD out", "p99 out", "top-1 out",
                "ppl out", "convert s"):
        table.add_column(col, justify="left" if col == "artifact" else "right")
    for r in rows:
        if "missing" in r:
            table.add_row(r["name"], *["-"] * 10, r["missing"][:40])
            continue
        i, o = r["in"], r["out"]
        table.add_row(r["name"], f"{r['size_mb']:.1f}", f"{r['bpw']:.2f}", f"{i['kld_mean']:.3f}", f"{i['kld_p99']:.2f}",
                      f"{i['top1_agreement']:.1%}", f"{i['ppl']:.2f}", f"{o['kld_mean']:.3f}", f"{o['kld_p99']:.2f}",
                      f"{o['top1_agreement']:.1%}", f"{o['ppl']:.2f}",
                      f"{r['convert_s']:.0f}" if r.get("convert_s") else "")
    first = next((r for r in rows if "in" in r), None)
    if first:
        table.caption = f"reference perplexity: in-domain {first['in']['ref_ppl']:.2f}, out-of-domain {first['out']['ref_ppl']:.2f}"
    Console().print(table)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "quality.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
