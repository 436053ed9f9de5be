"""Decode speed against llama.cpp itself: llama-bench, raw llama-cpp-python, edgekit's GGUF and ONNX sessions,
with and without speculative decoding, with the roofline fraction of each.

Artifacts (converted once into --out): the embedded SmolLM2-135M as Q4_0 and Q8_0 GGUF (round-to-nearest),
data-aware int4 as ONNX (with the head at 8 and at 4 bits), and the draft `convert --draft-for` makes for the Q4_0.
Rows, measured in alternating rounds in this one process (the C++ binary as
a child process, between the Python rows) so that slow phases of a shared machine hit every row alike:

- ``llama-bench`` (llama.cpp's own C++ benchmark, built from the sources vendored in the pinned
  llama-cpp-python by benchmarks/build_llama_tools.sh) on Q4_0: ``-p 0 -n N``, with flash attention off and on;
- raw llama-cpp-python on Q4_0 (``Llama.generate``, greedy), as an app using the binding would;
- edgekit's GGUF session on Q4_0 (C API loop), flash attention off and on;
- edgekit's ONNX int4 session, and int4 with the output head at 4 bits too (recipe int4-head4);
- batch-invariant (``batch_invariant=True``) GGUF and ONNX sessions, plain and with prompt lookup / the draft: greedy
  output identical with and without a draft by construction, at the cost of a second row per plain step;
- speculative: each edgekit session with prompt lookup; the Q4_0 GGUF with the draft `edgekit convert --draft-for`
  makes for it (layers dropped and distilled; built into --out once); the Q8_0 GGUF drafted by its own Q4_0.

The measuring process never imports torch (the artifacts are converted in a child process first), as an
app embedding ``edgekit.load`` would not: measured here, a process that has imported torch and run one
matmul decodes llama.cpp's Q4_0 8-10% slower (torch's OpenMP workers stay resident beside ggml's), which
is the gap to llama-bench an earlier version of this bench reported.

Every Python row decodes N tokens greedily after the same prompt (``ignore_eos``); speculative rows are
checked token for token against the same session without a draft. Two prompts: open-ended (a story) and
input-grounded (rewrite a passage of the shipped evaluation text), both through the model's chat template.
Roofline fraction = decode tok/s x bytes read per token (weights streamed + KV cache at that context) / the
host's measured read bandwidth (the denominator `edgekit profile` uses); for speculative rows, per target step
(tok/s / tokens per target step), since the target streams its weights once per verification.

Prints a table per prompt and writes benchmarks/results/speed.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edgekit.drafts import timed_decode

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OPEN_ENDED = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def grounded_prompt() -> str:
    text = (REPO / "edgekit" / "data" / "eval.txt").read_text()
    passage = " ".join(text.split()[200:420])
    return f"Rewrite the following passage in your own words, keeping every detail:\n\n{passage}"


def artifacts(out: Path, draft_recipes: list[str] | None = None, head4: bool = True) -> dict[str, Path]:
    from edgekit import recipes
    from edgekit.manifest import read_manifest
    from edgekit.pipeline import ConvertRequest, convert

    # GGUF rows use Q4_0: edgekit's int4 is the same container, so it decodes at the same speed
    want = {"q4_0-gguf": ("gguf", "q4_0"), "q8_0-gguf": ("gguf", "q8_0"), "int4-onnx": ("onnx", "int4")}
    if head4:
        want["int4h4-onnx"] = ("onnx", "int4-head4")  # the head at 4 bits too
    paths = {}
    for name, (fmt, quant) in want.items():
        d = out / name
        if not read_manifest(d):
            recipe = recipes.load(quant) if quant in recipes.builtin_names() else None
            convert(ConvertRequest(None, fmt, None if recipe else quant, d, force=True, recipe=recipe))
        paths[name] = d / f"model.{fmt}"
    # the draft `edgekit convert --draft-for` makes for the Q4_0 GGUF (candidates converted and measured there)
    d = out / "draft-q4_0-gguf"
    if not read_manifest(d):
        from edgekit.drafts import build_draft

        build_draft(out / "q4_0-gguf", d, draft_recipes, force=True, log=print)
    paths["draft-q4_0-gguf"] = d / "model.gguf"
    return paths


def llama_bench_bin() -> Path | None:
    b = REPO / "out" / "llama-tools" / "build" / "bin" / "llama-bench"
    return b if b.exists() else None


def llama_bench(binary: Path, model: Path, n: int, threads: int, fa: bool) -> float:
    r = subprocess.run([str(binary), "-m", str(model), "-p", "0", "-n", str(n), "-t", str(threads), "-r", "1",
                        "-fa", "on" if fa else "off", "-o", "json"], capture_output=True, text=True, check=True, timeout=600)
    return float(json.loads(r.stdout)[0]["avg_ts"])


def raw_llama_cpp(llm, ids: list[int], n: int):
    llm.reset()
    k = 0
    for tok in llm.generate(list(ids), temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=False):
        yield tok
        k += 1
        if k >= n:
            return


def roofline(path: Path, tok_s: float, ctx: int, bandwidth: float) -> float:
    from edgekit.targets.facts import artifact_facts

    f = artifact_facts(path)
    return tok_s * (f.bytes_per_token + f.kv_bytes_per_token * ctx) / bandwidth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("out/bench-speed"))
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-build", action="store_true", help="Skip building llama-bench when it is missing.")
    ap.add_argument("--draft-recipe", action="append", help="Draft candidates for `--draft-for` (default: its own).")
    ap.add_argument("--no-head4", action="store_true", help="Leave out the ONNX int4 with a 4-bit head.")
    ap.add_argument("--prepare-only", action="store_true", help="Convert the artifacts and stop (the child process).")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.prepare_only:
        artifacts(args.out, args.draft_recipe, not args.no_head4)
        return
    # conversion imports torch: it runs in a child, so that this process measures as a torch-free app would
    child = [sys.executable, __file__, "--prepare-only", "--out", str(args.out)] + (["--no-head4"] if args.no_head4 else []) \
        + [a for r in (args.draft_recipe or []) for a in ("--draft-recipe", r)]
    subprocess.run(child, check=True)
    import llama_cpp

    import edgekit
    from edgekit.runtimes.llamacpp import default_threads
    from edgekit.targets.host import host_figures

    console = Console(width=200)  # tables go to logs too: keep every column
    threads = default_threads()
    arts = artifacts(args.out, args.draft_recipe, not args.no_head4)
    if "torch" in sys.modules:
        raise SystemExit("bench_speed: torch was imported in the measuring process; the rows would be slowed by it")
    binary = llama_bench_bin()
    if binary is None and not args.no_build:
        subprocess.run(["bash", str(HERE / "build_llama_tools.sh")], check=True, cwd=REPO)
        binary = llama_bench_bin()
    bw = host_figures()["read_bandwidth_bytes_s"]
    n = args.tokens
    sessions = {
        "edgekit gguf q4_0": edgekit.load(arts["q4_0-gguf"], n_ctx=1024),
        "edgekit gguf q4_0 +fa": edgekit.load(arts["q4_0-gguf"], n_ctx=1024, flash_attn=True),
        "edgekit onnx int4": edgekit.load(arts["int4-onnx"], n_ctx=1024),
        "edgekit gguf q8_0": edgekit.load(arts["q8_0-gguf"], n_ctx=1024),
        "edgekit gguf q4_0, batch-invariant": edgekit.load(arts["q4_0-gguf"], n_ctx=1024, batch_invariant=True),
        "edgekit onnx int4, batch-invariant": edgekit.load(arts["int4-onnx"], n_ctx=1024, batch_invariant=True),
    }
    if "int4h4-onnx" in arts:
        sessions["edgekit onnx int4, 4-bit head"] = edgekit.load(arts["int4h4-onnx"], n_ctx=1024)
    spec = {
        "edgekit gguf q4_0 + prompt lookup": (edgekit.load(arts["q4_0-gguf"], n_ctx=1024, draft="prompt-lookup"), "edgekit gguf q4_0"),
        "edgekit onnx int4 + prompt lookup": (edgekit.load(arts["int4-onnx"], n_ctx=1024, draft="prompt-lookup"), "edgekit onnx int4"),
        "edgekit gguf q4_0 + edgekit draft": (edgekit.load(arts["q4_0-gguf"], n_ctx=1024, draft=arts["draft-q4_0-gguf"]), "edgekit gguf q4_0"),
        "edgekit gguf q8_0 + q4_0 draft": (edgekit.load(arts["q8_0-gguf"], n_ctx=1024, draft=arts["q4_0-gguf"]), "edgekit gguf q8_0"),
    }
    # batch-invariant sessions: greedy output the same with and without a draft by construction; compared with
    # their own plain mode ("x same without draft") and with the faster default plain mode ("x default plain")
    for fmt, art, base in (("gguf q4_0", "q4_0-gguf", "edgekit gguf q4_0"), ("onnx int4", "int4-onnx", "edgekit onnx int4")):
        spec[f"edgekit {fmt} + prompt lookup, batch-invariant"] = (
            edgekit.load(arts[art], n_ctx=1024, draft="prompt-lookup", batch_invariant=True), f"{base}, batch-invariant")
    spec["edgekit gguf q4_0 + edgekit draft, batch-invariant"] = (
        edgekit.load(arts["q4_0-gguf"], n_ctx=1024, draft=arts["draft-q4_0-gguf"], batch_invariant=True),
        "edgekit gguf q4_0, batch-invariant")
    raw = llama_cpp.Llama(model_path=str(arts["q4_0-gguf"]), n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)
    any_s = sessions["edgekit gguf q4_0"]
    prompts = {"open-ended": OPEN_ENDED, "input-grounded": grounded_prompt()}
    ids = {k: any_s.tokenize(any_s.chat_prompt([{"role": "user", "content": v}]), special=True) for k, v in prompts.items()}
    rates: dict[str, dict[str, list[float]]] = {p: {} for p in prompts}
    accept: dict[str, dict[str, list[dict]]] = {p: {} for p in prompts}
    identical: dict[str, dict[str, bool]] = {p: {} for p in prompts}
    path_of = {"edgekit gguf q4_0": arts["q4_0-gguf"], "edgekit gguf q4_0 +fa": arts["q4_0-gguf"],
               "edgekit onnx int4": arts["int4-onnx"], "edgekit onnx int4, batch-invariant": arts["int4-onnx"],
               "edgekit gguf q4_0, batch-invariant": arts["q4_0-gguf"],
               "edgekit gguf q8_0": arts["q8_0-gguf"], "edgekit onnx int4, 4-bit head": arts.get("int4h4-onnx"),
               "raw llama-cpp-python q4_0": arts["q4_0-gguf"],
               "llama-bench q4_0": arts["q4_0-gguf"], "llama-bench q4_0 +fa": arts["q4_0-gguf"]}
    for name, (_, base) in spec.items():
        path_of[name] = path_of[base]
    for rnd in range(args.rounds + 1):  # round 0 warms every row up
        for p, pid in ids.items():
            plain_tokens = {}
            row = rates[p]

            def add(name, rate, rnd=rnd, row=row):
                if rnd:
                    row.setdefault(name, []).append(rate)

            if binary is not None and p == "open-ended":  # llama-bench decodes from an empty context: one row
                add("llama-bench q4_0", llama_bench(binary, arts["q4_0-gguf"], n, threads, False))
                add("llama-bench q4_0 +fa", llama_bench(binary, arts["q4_0-gguf"], n, threads, True))
            add("raw llama-cpp-python q4_0", timed_decode(raw_llama_cpp(raw, pid, n))[0])
            for name, s in sessions.items():
                r, toks = timed_decode(s.stream_tokens(pid, n, ignore_eos=True))
                plain_tokens[name] = toks
                add(name, r)
            for name, (s, base) in spec.items():
                r, toks = timed_decode(s.stream_tokens(pid, n, ignore_eos=True))
                add(name, r)
                identical[p][name] = identical[p].get(name, True) and toks == plain_tokens[base]
                if rnd:
                    accept[p].setdefault(name, []).append(s.last_speculation)
        console.print(f"round {rnd}/{args.rounds} done")
    result = {"tokens": n, "threads": threads, "rounds": args.rounds, "read_bandwidth_bytes_s": bw,
              "torch_in_process": "torch" in sys.modules, "prompts": {}}
    for p in prompts:
        ctx = len(ids[p]) + n // 2
        ref = statistics.median(rates[p]["llama-bench q4_0"]) if "llama-bench q4_0" in rates[p] else \
            statistics.median(rates["open-ended"].get("llama-bench q4_0", [float("nan")]))
        t = Table(title=f"{p} prompt ({len(ids[p])} tokens), {n} tokens decoded, {threads} threads, median of {args.rounds} rounds")
        for c in ("row", "tok/s", "x llama-bench q4_0", "x same without draft", "x default plain", "acceptance",
                  "tokens / target step", "identical greedy", "roofline"):
            t.add_column(c)
        out = {}
        for name, vals in rates[p].items():
            med = statistics.median(vals)
            base = spec.get(name, (None, None))[1]
            acc = accept[p].get(name)
            rec = {"tok_s": med, "rounds": vals, "vs_llama_bench": med / ref if ref == ref else None,
                   "roofline_fraction": roofline(path_of[name], med, 0 if name.startswith("llama-bench") else ctx, bw)}
            if base:
                rec["vs_no_draft"] = med / statistics.median(rates[p][base])
                rec["vs_default_plain"] = med / statistics.median(rates[p][base.removesuffix(", batch-invariant")])
                rec["acceptance_rate"] = statistics.mean(a["acceptance_rate"] or 0 for a in acc)
                rec["tokens_per_target_step"] = statistics.mean(a["tokens_per_target_step"] or 0 for a in acc)
                rec["identical_greedy"] = identical[p][name]
                # the target streams its weights once per verification step, not once per token
                rec["roofline_fraction"] /= max(1.0, rec["tokens_per_target_step"])
            out[name] = rec
            t.add_row(name, f"{med:.1f}", f"{rec['vs_llama_bench']:.2f}" if rec["vs_llama_bench"] else "-",
                      f"{rec['vs_no_draft']:.2f}" if base else "", f"{rec['vs_default_plain']:.2f}" if base else "",
                      f"{rec['acceptance_rate']:.0%}" if base else "",
                      f"{rec['tokens_per_target_step']:.2f}" if base else "", str(rec["identical_greedy"]) if base else "",
                      f"{rec['roofline_fraction']:.0%}")
        console.print(t)
        result["prompts"][p] = {"prompt_tokens": len(ids[p]), "rows": out}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "speed.json").write_text(json.dumps(result, indent=2))
    for s in sessions.values():
        s.close()
    for s, _ in spec.values():
        s.close()


if __name__ == "__main__":
    main()
