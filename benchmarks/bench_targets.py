"""Cross-validation of the calibrated predictor on this machine.

Measures the embedded model at f16, q8_0, q4_0 and int4 (short and long context), fits the predictor
on a calibration subset and predicts what was held out, then compares with the measurement:

* held-out recipe: calibrate on f16 + q8_0 + q4_0, predict int4 (same Q4_0 kernels, other numbers),
  also at a prompt length and context never measured in calibration;
* held-out storage type: calibrate on two of f16 / q8_0 / q4_0, predict the third (its kernel's
  efficiency is then unknown and taken as the median of the others: the hardest case);
* peak memory: the overhead fitted without the artifact predicted;
* ONNX Runtime (``--formats onnx``), measured in the same run: calibrate on the ONNX f16 + q8_0 + q4_0
  exports and predict the held-out int4 recipe (what ``edgekit calibrate`` fits by default); and,
  harder, calibrate on f16 + q8_0 and predict q4_0 (MatMulNBits 4-bit, a kernel never measured).

Prints a table (predicted, measured, error) and writes benchmarks/results/targets.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent


def main() -> None:
    from edgekit.harness.quality import read_text
    from edgekit.targets.host import host_figures

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE.parent / "out" / "bench")
    ap.add_argument("--remeasure-host", action="store_true")
    ap.add_argument("--formats", default="gguf,onnx", help="comma-separated: gguf, onnx")
    ap.add_argument("--reps", type=int, default=3, help="measured repetitions per speed figure")
    args = ap.parse_args()
    console = Console()
    host = host_figures(args.remeasure_host)
    text, _ = read_text(None)
    formats = args.formats.split(",")
    rows = []

    def compare(case, quant, metric, predicted, measured):
        rows.append({"case": case, "artifact": quant, "metric": metric, "predicted": predicted, "measured": measured,
                     "error_pct": 100 * (predicted - measured) / measured, "ratio": predicted / measured})

    if "gguf" in formats:
        _gguf(args, console, host, text, compare)
    if "onnx" in formats:
        _onnx(args, console, host, text, compare)
    _print(console, host, rows)
    dest = HERE / "results" / "targets.json"
    old = json.loads(dest.read_text()) if dest.exists() else {}
    # rows of a format not run this time are kept from the last run
    kept = [r for r in old.get("rows", []) if ("onnx" if r["artifact"].startswith("onnx:") else "gguf") not in formats]
    dest.write_text(json.dumps({"rows": kept + rows, "host": host,
                                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2) + "\n")
    console.print(f"wrote {dest}")


def _check(compare, case, name, facts, cal, speed, host):
    from edgekit.targets import predict as pr

    st = speed["settings"]
    short = int(st["prompt_tokens"] + st["decode_tokens"] / 2)
    p = pr.predict(facts, cal, pr.host_machine(host), short, st["prompt_tokens"], speed["n_ctx"])
    compare(case, name, f"decode tok/s @ctx {short}", p["decode_tok_s"], speed["decode_tok_s"])
    compare(case, name, f"TTFT ms @{st['prompt_tokens']} prompt", p["ttft_ms"], speed["ttft_ms"])
    if "long_context" in speed:
        lc = speed["long_context"]
        long_ctx = int(lc["prompt_tokens"] + st["decode_tokens"] / 2)
        pl = pr.predict(facts, cal, pr.host_machine(host), long_ctx, lc["prompt_tokens"], speed["n_ctx"])
        compare(case, name, f"decode tok/s @ctx {long_ctx}", pl["decode_tok_s"], lc["decode_tok_s"])
        compare(case, name, f"TTFT ms @{lc['prompt_tokens']} prompt", pl["ttft_ms"], lc["ttft_ms"])
    compare(case, name, "peak memory MB", p["peak_memory_bytes"] / 1e6, speed["peak_rss_bytes"] / 1e6)


def _onnx(args, console, host, text, compare) -> None:
    """ONNX Runtime: held-out int4 recipe (calibrated on f16 + q8_0 + q4_0) and held-out 4-bit kernel (q4_0
    predicted from f16 + q8_0), all measured in the same run."""
    from edgekit.pipeline import ConvertRequest, convert
    from edgekit.harness.speed import SpeedConfig, measure
    from edgekit.targets import predict as pr
    from edgekit.targets.facts import artifact_facts

    facts, points, speeds = {}, {}, {}
    for quant in ("f16", "q8_0", "q4_0", "int4"):
        d = args.out / f"onnx-{quant}"
        if not (d / "manifest.json").exists():
            console.print(f"[dim]converting the default model to ONNX {quant}...[/dim]")
            convert(ConvertRequest(None, "onnx", quant, d, force=True))
        facts[quant] = artifact_facts(d)
        console.print(f"[dim]measuring ONNX {quant}...[/dim]")
        speeds[quant] = measure(str(d / "model.onnx"), text, SpeedConfig(reps=args.reps, long_context=1024))
        speeds[quant]["name"] = f"onnx-{quant}"
        points[quant] = pr.point_from_speed(facts[quant], speeds[quant])
    cal = pr.fit([points[q] for q in ("f16", "q8_0", "q4_0")], host)
    _check(compare, "ONNX held-out recipe (calibrated on f16 + q8_0 + q4_0)", "onnx:int4", facts["int4"], cal,
           speeds["int4"], host)
    two = pr.fit([points["f16"], points["q8_0"]], host)
    _check(compare, "ONNX held-out type (calibrated on f16 + q8_0)", "onnx:q4_0", facts["q4_0"], two, speeds["q4_0"], host)
    for q in ("f16", "q8_0", "q4_0"):
        _check(compare, "ONNX in-sample (fit quality)", f"onnx:{q}", facts[q], cal, speeds[q], host)


def _print(console, host, rows) -> None:
    t = Table(title=f"predicted vs measured on this host (read {host['read_bandwidth_bytes_s'] / 1e9:.1f} GB/s, "
                    f"f32 matmul {host['compute_flops']['f32'] / 1e9:.0f} GFLOP/s)")
    for c in ("case", "artifact", "metric", "predicted", "measured", "ratio", "error"):
        t.add_column(c)
    for r in rows:
        style = "" if abs(r["error_pct"]) <= 15 else "red"
        t.add_row(r["case"], r["artifact"], r["metric"], f"{r['predicted']:.1f}", f"{r['measured']:.1f}", f"{r['ratio']:.2f}",
                  f"[{style}]{r['error_pct']:+.1f}%[/{style}]" if style else f"{r['error_pct']:+.1f}%")
    console.print(t)


def _gguf(args, console, host, text, compare) -> None:
    from edgekit.pipeline import ConvertRequest, convert
    from edgekit.harness.speed import SpeedConfig, measure
    from edgekit.targets import predict as pr
    from edgekit.targets.facts import artifact_facts

    arts, points, speeds = {}, {}, {}
    for quant in ("f16", "q8_0", "q4_0", "int4"):
        d = args.out / quant
        if not (d / "manifest.json").exists():
            convert(ConvertRequest(None, "gguf", quant, d, force=True))
        arts[quant] = artifact_facts(d)
        console.print(f"[dim]measuring {quant}...[/dim]")
        speeds[quant] = measure(str(d / "model.gguf"), text, SpeedConfig(reps=args.reps, long_context=1024))
        points[quant] = pr.point_from_speed(arts[quant], speeds[quant])
    # a held-out operating point never used for calibration: longer prompt, longer context
    console.print("[dim]measuring int4 at a held-out prompt length and context...[/dim]")
    held = measure(str(args.out / "int4" / "model.gguf"), text,
                   SpeedConfig(reps=3, prompt_tokens=256, prefill_tokens=256, long_context=1536))

    def check_all(case, quant, cal, speed):
        _check(compare, case, quant, arts[quant], cal, speed, host)

    cal = pr.fit([points[q] for q in ("f16", "q8_0", "q4_0")], host)
    check_all("held-out recipe", "int4", cal, speeds["int4"])
    check_all("held-out recipe + operating point", "int4", cal, held)
    for q in ("f16", "q8_0", "q4_0"):
        others = [points[o] for o in ("f16", "q8_0", "q4_0") if o != q]
        check_all("held-out storage type", q, pr.fit(others, host), speeds[q])
    for q in ("f16", "q8_0", "q4_0"):
        check_all("in-sample (fit quality)", q, cal, speeds[q])

    eff = cal.efficiencies()
    console.print("fitted efficiencies (fraction of roofline): decode " +
                  ", ".join(f"{k} {v:.0%}" for k, v in eff["decode"].items()) + "; prefill " +
                  ", ".join(f"{k} {v:.0%}" for k, v in eff["prefill"].items()))


if __name__ == "__main__":
    main()
