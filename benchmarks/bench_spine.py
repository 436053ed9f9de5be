"""Spine benchmark: wrapper overhead and quantizer quality on the embedded SmolLM2-135M, in one run.

1. Decode tokens/s through ``edgekit.load`` and through llama-cpp-python called directly on the same
   file with the same settings, measured in alternating rounds in one process (ratios, not absolute
   times, are what this shared machine can compare).
2. Quality of edgekit q8_0 / q4_0 / int4 and llama.cpp's own Q4_0 (llama_model_quantize from the float
   reference) against the float reference, on the shipped text and on other English prose.

Prints a table and writes benchmarks/results/spine.json.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
OTHER_PROSE = Path("/usr/share/common-licenses/GPL-3")


def convert_all(root: Path, reuse: bool) -> dict[str, Path]:
    from edgekit.pipeline import ConvertRequest, convert

    out = {}
    for quant in ("f16", "q8_0", "q4_0", "int4"):
        d = root / quant
        if not (reuse and (d / "manifest.json").exists()):
            convert(ConvertRequest(None, "gguf", quant, d, force=True))
        out[quant] = d / "model.gguf"
    return out


def llama_quantize_q4_0(root: Path) -> Path:
    """llama.cpp's own Q4_0 from an F32 GGUF of the same float reference."""
    import llama_cpp

    from edgekit.converters.gguf import GGUFExporter
    from edgekit.sources import load_reference, resolve

    f32_dir, dst = root / "f32-for-llama-quantize", root / "llama-quantize-q4_0.gguf"
    if not dst.exists():
        f32_dir.mkdir(parents=True, exist_ok=True)
        GGUFExporter().export(load_reference(resolve(None)), f32_dir)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(str(f32_dir / "model.gguf").encode(), str(dst).encode(), ctypes.byref(params))
        assert rc == 0, "llama_model_quantize failed"
        (f32_dir / "model.gguf").unlink()
    return dst


def decode_rounds(path: Path, rounds: int, tokens: int) -> dict:
    """Alternate edgekit.load and direct llama-cpp-python decode runs on one file; medians and ratio."""
    import llama_cpp

    import edgekit
    from edgekit.runtimes.llamacpp import default_threads

    threads = default_threads()
    session = edgekit.load(path, n_threads=threads)
    direct = llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                             n_batch=512, verbose=False)
    prompt = direct.tokenize(b"The history of the printing press begins", add_bos=False)

    def run_edgekit() -> float:
        stamps = [time.perf_counter() for _ in session.stream_tokens(prompt, tokens, ignore_eos=True)]
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    def run_direct() -> float:
        direct.reset()
        stamps = []
        for _ in direct.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=False):
            stamps.append(time.perf_counter())
            if len(stamps) == tokens:
                break
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    run_edgekit(), run_direct()  # warm-up
    ours, theirs = [], []
    for r in range(rounds):
        # alternate the order too, so neither side always runs on a warmer machine
        if r % 2:
            ours.append(run_edgekit()), theirs.append(run_direct())
        else:
            theirs.append(run_direct()), ours.append(run_edgekit())
    session.close()
    direct.close()
    ratios = [a / b for a, b in zip(ours, theirs)]
    return {"edgekit_tok_s": statistics.median(ours), "direct_tok_s": statistics.median(theirs),
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "rounds": rounds, "tokens": tokens, "threads": threads}


def quality_rows(files: dict[str, Path], texts: list[Path | None]) -> dict:
    import edgekit
    from edgekit.evaluate import measure_quality
    from edgekit.harness.quality import read_text
    from edgekit.sources import load_reference, resolve

    src = resolve(None)
    ref = load_reference(src)
    out: dict[str, dict] = {}
    for t in texts:
        body, label = read_text(t)
        for name, path in files.items():
            with edgekit.load(path) as s:
                q = measure_quality(s, ref, src.sha256, body, label)
            q["size_bytes"] = path.stat().st_size
            out.setdefault(label, {})[name] = q
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE.parent / "out" / "bench")
    ap.add_argument("--reuse", action="store_true", help="reuse artifacts already converted under --out")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--eval-text", type=Path, action="append", help="extra English text(s) to score on")
    args = ap.parse_args()

    console = Console()
    console.print("[dim]converting the default model (f16, q8_0, q4_0, int4)...[/dim]")
    files = convert_all(args.out, args.reuse)
    files["llama-quantize Q4_0"] = llama_quantize_q4_0(args.out)

    console.print("[dim]decode speed: edgekit.load vs llama-cpp-python directly...[/dim]")
    speed = {q: decode_rounds(files[q], args.rounds, args.tokens) for q in ("int4", "q8_0")}

    texts: list[Path | None] = [None] + (args.eval_text or ([OTHER_PROSE] if OTHER_PROSE.exists() else []))
    console.print("[dim]quality against the float reference...[/dim]")
    quality = quality_rows({k: files[k] for k in ("q8_0", "q4_0", "llama-quantize Q4_0", "int4")}, texts)

    t = Table(title="decode tok/s: edgekit.load vs llama-cpp-python directly (same file, same settings)")
    for c in ("artifact", "edgekit tok/s", "direct tok/s", "ratio (median)", "ratio range", "rounds"):
        t.add_column(c)
    for q, s in speed.items():
        t.add_row(q, f"{s['edgekit_tok_s']:.1f}", f"{s['direct_tok_s']:.1f}", f"{s['ratio_median']:.3f}",
                  f"{s['ratio_min']:.3f}-{s['ratio_max']:.3f}", str(s["rounds"]))
    console.print(t)
    for label, rows in quality.items():
        t = Table(title=f"quality vs float reference on {label}")
        for c in ("artifact", "size MB", "ppl", "ref ppl", "KLD mean", "KLD p99", "top-1"):
            t.add_column(c)
        for name, q in rows.items():
            t.add_row(name, f"{q['size_bytes'] / 1e6:.1f}", f"{q['ppl']:.3f}", f"{q['ref_ppl']:.3f}",
                      f"{q['kld_mean']:.4f}", f"{q['kld_p99']:.3f}", f"{q['top1_agreement']:.2%}")
        console.print(t)
        console.print(f"int4 / q4_0 mean KLD ratio: {rows['int4']['kld_mean'] / rows['q4_0']['kld_mean']:.3f}")

    result = {"speed": speed, "quality": quality, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    dest = HERE / "results" / "spine.json"
    dest.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {dest}")


if __name__ == "__main__":
    main()
