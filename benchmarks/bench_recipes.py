"""Recipe benchmark: what each compression pass costs and buys on the embedded SmolLM2-135M.

For every recipe (built-in names, see ``edgekit recipes``) and every format, convert the default
model, then profile the artifact in a clean process: size, bits per weight, quality against the float
reference on the shipped held-in text (from the export-time validation) and on user-supplied text
(default: the GNU GPL-3 text, other English prose), decode tok/s and peak RSS. A format that cannot
express a recipe is listed with the one-line reason edgekit gives. The passes run once per recipe and
format (pruning chooses per-layer widths only where the format can express them).

Prints a table and writes benchmarks/results/recipes.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
OTHER_PROSE = Path("/usr/share/common-licenses/GPL-3")
# each recipe in the format that expresses it (GGUF: uniform widths; ONNX: per-layer widths, low-rank),
# plus rows showing a format refusing what it cannot express; --formats runs every recipe in every format
DEFAULT_RECIPES = ["int4@gguf", "prune20@gguf", "prune20-recover@gguf", "prune25@gguf", "prune25-recover@gguf",
                   "prune40@gguf", "prune40-recover@gguf", "prune25-recover-int4@gguf", "prune25-recover-int4@onnx",
                   "ternary@gguf", "ternary@onnx", "ternary-recover@onnx", "lowrank75@onnx", "lowrank50@onnx",
                   "lowrank50-plain@onnx", "lowrank75-int4@onnx", "lowrank50@gguf"]


def run_one(recipe_name: str, fmt: str, out: Path, user_text: Path | None, reuse: bool) -> dict:
    from edgekit import recipes
    from edgekit.pipeline import ConvertRequest, convert
    from edgekit.errors import EdgekitError
    from edgekit.harness.speed import SpeedConfig
    from edgekit.manifest import read_manifest
    from edgekit.profile import profile

    row: dict = {"recipe": recipe_name, "format": fmt}
    d = out / f"{recipe_name}-{fmt}"
    try:
        if reuse and read_manifest(d):
            manifest = read_manifest(d)
        else:
            if recipe_name in recipes.builtin_names():
                recipe = recipes.load(recipe_name)
            else:  # a plain storage pass (int4, q4_0, ...)
                recipe = recipes.check(recipes.Recipe(recipe_name, [{"pass": recipe_name}]))
            t0 = time.perf_counter()
            manifest = convert(ConvertRequest(None, fmt, None, d, force=True, recipe=recipe))
            manifest["timings_s"]["bench_total_s"] = time.perf_counter() - t0
    except EdgekitError as exc:
        row["refused"] = exc.one_line()
        return row
    q = manifest["quality"]
    row.update(label=manifest["recipe"]["label"], size_bytes=manifest["size_bytes"], bpw=manifest["bits_per_weight"],
               ppl=q["ppl"], ref_ppl=q["ref_ppl"], kld=q["kld_mean"],
               top1=q["top1_agreement"], convert_s=manifest["timings_s"]["total_s"],
               passes=[{k: v for k, v in r.items() if k not in ("ranks",)} for r in manifest["recipe"]["passes"]],
               warnings=manifest.get("warnings", []))
    rec = next((r.get("recovery") for r in manifest["recipe"]["passes"] if r.get("recovery")), None)
    if rec:
        row["recovery_loss_first_last"] = [rec["loss_first10_mean"], rec["loss_last10_mean"]]
    prof = profile(d, eval_text=str(user_text) if user_text else None,
                   speed_cfg=SpeedConfig(prompt_tokens=128, prefill_tokens=256, decode_tokens=64, reps=3, load_reps=2),
                   quality=user_text is not None, eval_tokens=2048)
    row["decode_tok_s"] = prof.get("decode_tok_s")
    row["peak_rss_bytes"] = prof.get("peak_rss_bytes")
    if prof.get("quality"):
        row.update(user_ppl=prof["quality"]["ppl"], user_ref_ppl=prof["quality"]["ref_ppl"], user_kld=prof["quality"]["kld_mean"])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE.parent / "out" / "bench-recipes")
    ap.add_argument("--recipes", default=",".join(DEFAULT_RECIPES))
    ap.add_argument("--formats", default="gguf,onnx")
    ap.add_argument("--text", type=Path, default=OTHER_PROSE if OTHER_PROSE.exists() else None,
                    help="user-supplied text for a second quality figure")
    ap.add_argument("--reuse", action="store_true", help="reuse artifacts already converted under --out")
    args = ap.parse_args()
    console = Console(width=170)
    rows = []
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    for item in args.recipes.split(","):
        name, _, only = item.partition("@")  # "lowrank50@onnx": that format only
        for fmt in ([only] if only else args.formats.split(",")):
            console.print(f"[dim]{name} -> {fmt}...[/dim]")
            rows.append(run_one(name, fmt, args.out, args.text, args.reuse))
            (results / "recipes.json").write_text(json.dumps({"rows": rows, "user_text": str(args.text)}, indent=1))

    table = Table(title="recipes on SmolLM2-135M (quality vs the float reference; user text: "
                        f"{args.text.name if args.text else 'none'})")
    for col in ("recipe", "fmt", "MB", "bpw", "ppl", "KLD", "top-1", "user ppl", "user KLD", "tok/s", "RSS MB", "conv s"):
        table.add_column(col, justify="left" if col in ("recipe", "fmt") else "right")

    def f(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v)

    for r in rows:
        if "refused" in r:
            table.add_row(r["recipe"], r["format"], f"[yellow]{r['refused']}[/yellow]", *[""] * 9)
            continue
        table.add_row(r["recipe"], r["format"], f(r["size_bytes"] / 1e6, "{:.1f}"), f(r["bpw"], "{:.2f}"), f(r["ppl"], "{:.2f}"),
                      f(r["kld"], "{:.4f}"), f(r["top1"], "{:.1%}"), f(r.get("user_ppl"), "{:.2f}"), f(r.get("user_kld"), "{:.4f}"),
                      f(r.get("decode_tok_s"), "{:.1f}"), f((r.get("peak_rss_bytes") or 0) / 1e6, "{:.0f}"), f(r["convert_s"], "{:.0f}"))
    console.print(table)
    console.print(f"[dim]wrote {results / 'recipes.json'}[/dim]")


if __name__ == "__main__":
    main()
