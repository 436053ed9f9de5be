"""ONNX benchmark: edgekit's ONNX Runtime artifacts against llama.cpp GGUF of the same model, in one run.

Artifacts of the embedded default model, converted (and validated) by ``edgekit convert``: ONNX int4,
int8 and fp32; GGUF q4_0, int4 and q8_0. For each:

- decode tok/s through ``edgekit.load`` (``stream_tokens``), in alternating rounds in one process,
  the order rotating every round (only ratios measured this way mean anything on a shared machine);
  the headline is ONNX int4 over GGUF q4_0, round by round;
- TTFT of a 128-token prompt, alternating the same way; peak RSS in a fresh process per artifact
  (``edgekit.harness.speed``);
- size, KLD and perplexity from each artifact's manifest (measured at export against the float reference).

Foreign artifacts of the same model sit in the same table, measured the same way: the float reference
written as a Hugging Face directory (``edgekit.hf_export``), exported by ``optimum-cli export onnx``
(fp32, run by optimum's ``ORTModelForCausalLM``: "optimum fp32") and built by onnxruntime-genai's model
builder (int4, run by ``og.Generator``: "genai int4"); their KLD and perplexity are measured here
against the same float reference on the same text (they have no manifest).

Prints a table and writes benchmarks/results/onnx-<threads>t.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
ARTIFACTS = [("onnx", "int4"), ("gguf", "q4_0"), ("gguf", "int4"), ("onnx", "int8"), ("gguf", "q8_0"), ("onnx", "fp32")]
FOREIGN = ("optimum fp32", "genai int4")
BASELINE = "gguf q4_0"
PROMPT = "The history of the printing press begins"


def convert_all(root: Path, reuse: bool, which: list[tuple[str, str]]) -> dict[str, Path]:
    from edgekit.pipeline import ConvertRequest, convert

    out = {}
    for fmt, quant in which:
        d = root / f"{fmt}-{quant}"
        if not (reuse and (d / "manifest.json").exists()):
            convert(ConvertRequest(None, fmt, quant, d, force=True))
        out[f"{fmt} {quant}"] = d
    return out


def foreign_artifacts(root: Path, reuse: bool, which: list[str]) -> dict[str, Path]:
    """The default model exported by other tools (see the module docstring); built once under ``root``."""
    import subprocess
    import sys

    from edgekit.hf_export import build_genai, write_hf_dir
    from edgekit.sources import load_reference, resolve

    hf, out = root / "hf-fp32", {}
    if not (reuse and (hf / "model.safetensors").exists()):
        write_hf_dir(load_reference(resolve(None)), hf)
    if "optimum fp32" in which:
        d = root / "optimum-fp32"
        if not (reuse and (d / "model.onnx").exists()):
            cli = Path(sys.executable).parent / "optimum-cli"
            subprocess.run([str(cli), "export", "onnx", "--model", str(hf), "--task", "text-generation-with-past", str(d)],
                           check=True, capture_output=True)
        out["optimum fp32"] = d
    if "genai int4" in which:
        d = root / "genai-int4"
        if not (reuse and (d / "genai_config.json").exists()):
            build_genai(hf, d, "int4")
        out["genai int4"] = d
    return out


def foreign_quality(dirs: dict[str, Path]) -> dict[str, dict]:
    """Manifest-shaped size and quality of foreign artifacts: KLD against the float reference, the
    way a conversion measures it (same text, same windows, cached reference statistics)."""
    import edgekit
    from edgekit.evaluate import measure_quality
    from edgekit.harness.quality import EvalConfig, read_text
    from edgekit.sources import load_reference, resolve

    src = resolve(None)
    model = load_reference(src)
    text, label = read_text(None)
    out = {}
    for k, d in dirs.items():
        size = sum(f.stat().st_size for f in d.iterdir() if f.name.startswith("model.onnx"))  # graph + external data
        with edgekit.load(d) as s:
            q = measure_quality(s, model, src.sha256, text, label, EvalConfig())
        out[k] = {"size_bytes": size, "quality": q, "artifact": {"runtime": s.runtime}}
    return out


def llamacpp_works(gguf: Path) -> bool:
    """Whether llama.cpp decodes here as built. On CPUs that advertise AMX, a llama.cpp built with
    GGML_NATIVE runs its AMX kernels, which die with SIGILL on some VMs (seen here: ``tilezero`` in
    ggml_backend_amx_mul_mat). Checked in a child process so the benchmark survives it."""
    import subprocess
    import sys

    code = ("import edgekit, sys; s = edgekit.load(sys.argv[1], n_threads=1); "
            "print(len(list(s.stream_tokens(s.tokenize('Hello there'), 4, ignore_eos=True))))")
    return subprocess.run([sys.executable, "-c", code, str(gguf)], capture_output=True).returncode == 0


_KEEP: list = []  # ctypes arrays llama.cpp reads while loading models
# forcing CPU_REPACK on Q8_0 matrices crashes llama.cpp (it normally checks support tensor by tensor):
# the override applies to Q4_0 files only, which decode_rounds says before each load
REPACK_NEXT_LOAD = {"on": True}


def _repack_buffer_type():
    """llama.cpp's CPU_REPACK buffer type (Q4_0/Q8_0 weights in interleaved blocks), or None."""
    import ctypes
    import os

    import llama_cpp

    lib = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    ggml, base = ctypes.CDLL(os.path.join(lib, "libggml.so")), ctypes.CDLL(os.path.join(lib, "libggml-base.so"))
    ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    base.ggml_backend_buft_name.restype = ctypes.c_char_p
    base.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
    llama_cpp.llama_backend_init()
    dev = ggml.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    fn = ggml.ggml_backend_reg_get_proc_address(ggml.ggml_backend_dev_backend_reg(dev), b"ggml_backend_dev_get_extra_bufts")
    if not fn:
        return None
    bufts = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(fn)(dev)
    i = 0
    while bufts[i]:
        if base.ggml_backend_buft_name(bufts[i]) == b"CPU_REPACK":
            return bufts[i]
        i += 1
    return None


def avoid_llamacpp_amx() -> str:
    """Load GGUF models without llama.cpp's AMX buffer type (the fallback when its kernels crash) but with
    the CPU repack of the layer weights, as llama.cpp uses on a CPU without AMX: no extra buffer types by
    default, and an override that puts every layer matrix in CPU_REPACK. Returns what was set."""
    import ctypes

    import llama_cpp
    import llama_cpp.llama as ll

    class Override(ctypes.Structure):
        _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]

    repack = _repack_buffer_type()
    table = (Override * 2)(Override(rb"blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight",
                                    repack), Override(None, None))
    _KEEP.append(table)
    original = llama_cpp.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = False
        if repack and REPACK_NEXT_LOAD["on"]:
            p.tensor_buft_overrides = ctypes.addressof(table)
        return p

    llama_cpp.llama_model_default_params = params
    ll.llama_cpp.llama_model_default_params = params
    return "no AMX; Q4_0 layer matrices in CPU_REPACK" if repack else "no AMX, no repack (CPU_REPACK not found)"


def decode_rounds(dirs: dict[str, Path], rounds: int, tokens: int, threads: int) -> dict[str, dict]:
    """Decode tok/s of every artifact, alternating artifacts within each round."""
    import edgekit

    from edgekit.harness.quality import default_text_path

    sessions = {}
    for k, d in dirs.items():
        REPACK_NEXT_LOAD["on"] = k.endswith(("q4_0", "int4"))
        sessions[k] = edgekit.load(d, n_threads=threads)
    first = next(iter(sessions.values()))
    prompt = first.tokenize(PROMPT)
    long_prompt = first.tokenize(Path(default_text_path()).read_text())[:128]

    def run(s) -> float:
        stamps = [time.perf_counter() for _ in s.stream_tokens(prompt, tokens, ignore_eos=True)]
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    def ttft(s) -> float:
        t0 = time.perf_counter()
        next(iter(s.stream_tokens(long_prompt, 1, ignore_eos=True)))
        return (time.perf_counter() - t0) * 1000

    for s in sessions.values():
        run(s)  # warm-up
    names = list(sessions)
    rates: dict[str, list[float]] = {k: [] for k in names}
    firsts: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            rates[k].append(run(sessions[k]))
            firsts[k].append(ttft(sessions[k]))
    for s in sessions.values():
        s.close()
    out = {}
    for k in names:
        row = {"decode_tok_s": statistics.median(rates[k]), "decode_tok_s_all": rates[k],
               "ttft_128_ms": statistics.median(firsts[k])}
        if BASELINE in rates:
            ratios = [a / b for a, b in zip(rates[k], rates[BASELINE])]
            row |= {"ratio_vs_q4_0_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
        out[k] = row
    return out


def fresh_process(dirs: dict[str, Path], threads: int) -> dict[str, dict]:
    """TTFT (128-token prompt) and peak RSS of each artifact, each in its own process."""
    from edgekit.harness.quality import default_text_path
    from edgekit.harness.speed import SpeedConfig, measure

    text = Path(default_text_path()).read_text()
    cfg = SpeedConfig(prompt_tokens=128, prefill_tokens=256, decode_tokens=32, reps=3, load_reps=1, n_threads=threads)
    return {k: measure(str(d), text, cfg) for k, d in dirs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE.parent / "out" / "bench-onnx")
    ap.add_argument("--reuse", action="store_true", help="reuse artifacts already converted under --out")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=None, help="default: every core this process may use")
    ap.add_argument("--only", nargs="*", help="a subset, e.g. 'onnx int4' 'gguf q4_0' 'optimum fp32' 'genai int4'")
    args = ap.parse_args()

    from edgekit.runtimes.onnxruntime import default_threads

    threads = args.threads or default_threads()
    which = [a for a in ARTIFACTS if not args.only or " ".join(a) in args.only]
    import importlib.util

    foreign = [k for k in FOREIGN if (not args.only or k in args.only)
               and importlib.util.find_spec("onnxruntime_genai" if k.startswith("genai") else "optimum.onnxruntime")]
    console = Console(width=150)
    from edgekit.sources import default_model_path

    # before converting: GGUF export validates through llama.cpp in this process
    llamacpp_setup = "as built"
    if any(fmt == "gguf" for fmt, _ in which) and not llamacpp_works(default_model_path()):
        llamacpp_setup = avoid_llamacpp_amx()
        console.print(f"[yellow]llama.cpp's AMX kernels crash on this CPU: GGUF runs with {llamacpp_setup}[/yellow]")
    extra_bufts = llamacpp_setup == "as built"
    console.print(f"[dim]converting {', '.join(' '.join(a) for a in which)} (validated at export)...[/dim]")
    dirs = convert_all(args.out, args.reuse, which)
    manifests = {k: json.loads((d / "manifest.json").read_text()) for k, d in dirs.items()}
    if foreign:
        console.print(f"[dim]exporting {', '.join(foreign)} with their own tools, KLD against the float reference...[/dim]")
        others = foreign_artifacts(args.out, args.reuse, foreign)
        manifests |= foreign_quality(others)
        dirs |= others
    console.print(f"[dim]decode: {args.rounds} alternating rounds of {args.tokens} tokens, {threads} threads...[/dim]")
    speed = decode_rounds(dirs, args.rounds, args.tokens, threads)
    console.print("[dim]TTFT and peak RSS, one fresh process per artifact...[/dim]")
    fresh = fresh_process({k: d for k, d in dirs.items() if extra_bufts or not k.startswith("gguf")}, threads)

    t = Table(title=f"ONNX Runtime vs llama.cpp, default model, {threads} threads (decode: median of "
                    f"{args.rounds} alternating rounds)")
    for c in ("artifact", "size MB", "KLD mean", "ppl", "decode tok/s", f"x {BASELINE}", "ratio range", "TTFT ms (128)",
              "peak RSS MB"):
        t.add_column(c)
    rows = {}
    for k in dirs:
        m, s = manifests[k], speed[k]
        f = fresh.get(k, {"ttft_ms": float("nan"), "peak_rss_bytes": float("nan"), "decode_tok_s": None,
                          "prefill_tok_s": None, "load_s": None})
        q = m["quality"]
        rows[k] = {"size_bytes": m["size_bytes"], "kld_mean": q["kld_mean"], "ppl": q["ppl"], "ref_ppl": q["ref_ppl"],
                   **s, "ttft_ms": f["ttft_ms"], "peak_rss_bytes": f["peak_rss_bytes"],
                   "fresh_process": {x: f[x] for x in ("decode_tok_s", "prefill_tok_s", "load_s")},
                   "tensor_types": m["artifact"].get("tensor_types"), "int8_scheme": m["artifact"].get("int8_scheme")}
        t.add_row(k, f"{m['size_bytes'] / 1e6:.1f}", f"{q['kld_mean']:.4f}", f"{q['ppl']:.3f}",
                  f"{s['decode_tok_s']:.1f}", f"{s.get('ratio_vs_q4_0_median', float('nan')):.2f}",
                  f"{s.get('ratio_min', float('nan')):.2f}-{s.get('ratio_max', float('nan')):.2f}",
                  f"{s['ttft_128_ms']:.0f}", f"{f['peak_rss_bytes'] / 1e6:.0f}")
    console.print(t)
    ref = next(iter(manifests.values()))["quality"]["ref_ppl"]
    console.print(f"float reference perplexity {ref:.3f}")
    result = {"rows": rows, "threads": threads, "llamacpp_buffers": llamacpp_setup, "rounds": args.rounds, "tokens": args.tokens, "ref_ppl": ref,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    dest = HERE / "results" / f"onnx-{threads}t.json"
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {dest}")


if __name__ == "__main__":
    main()
