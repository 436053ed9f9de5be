"""Ship several builds of one model and let the app pick, at start-up, the best one this machine can hold.

    edgekit convert -q q8_0 -o out/smollm2-q8_0
    edgekit convert -q q4_0 -o out/smollm2-q4_0
    python examples/pick_for_device.py out/smollm2-q8_0 out/smollm2-q4_0
    python examples/pick_for_device.py out/smollm2-* --max-memory 1GiB --n-ctx 4096

For each artifact, ``edgekit.memory_fit.estimate`` predicts the memory it needs at the given context
(weights, KV cache, compute buffers) without loading it. Among those that fit in the budget (the
memory available now, or ``--max-memory``), the best quality wins: the lowest KL divergence from the
float model recorded in the manifest by ``edgekit convert``, or, when some artifact has no quality
figure, the most bits per weight. The winner is then loaded and answers a prompt.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import edgekit
from edgekit import memory_fit
from edgekit.manifest import read_manifest


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


@dataclass
class Candidate:
    path: str
    label: str  # the recipe, e.g. "q4_0", from the manifest (else the file name)
    needs: int  # predicted bytes at this context
    breakdown: str  # weights + KV cache + runtime, as memory_fit explains it
    kld: float | None  # mean KL divergence from the float model (lower is better); None: not measured
    bits: float | None  # bits per weight
    fits: bool = False


def describe(path: str, n_ctx: int) -> Candidate:
    """What an artifact needs and how good it is, without loading it."""
    estimate = memory_fit.estimate(path, n_ctx=n_ctx)
    manifest: dict[str, Any] = (read_manifest(Path(path)) if Path(path).is_dir() else None) or {}
    quality = manifest.get("quality") or {}
    recipe = manifest.get("recipe") or {}
    return Candidate(path=path, label=recipe.get("label") or recipe.get("quant") or Path(path).name,
                     needs=int(estimate.total_bytes), breakdown=estimate.describe(),
                     kld=quality.get("kld_mean"), bits=manifest.get("bits_per_weight"))


def choose(candidates: list[Candidate]) -> tuple[Candidate, str]:
    """The best candidate among those that fit, and why."""
    fitting = [c for c in candidates if c.fits]
    if all(c.kld is not None for c in fitting):
        best = min(fitting, key=lambda c: (c.kld, c.needs))
        return best, f"lowest KL divergence ({best.kld:.4g}) of the {len(fitting)} that fit"
    best = max(fitting, key=lambda c: (c.bits or 0.0, -c.needs))
    return best, (f"most bits per weight ({best.bits or 0:.2f}) of the {len(fitting)} that fit "
                  "(not every one has a quality figure)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Pick the best artifact that fits this machine's memory, then run it.")
    ap.add_argument("artifacts", nargs="+", help="builds of the same model (directories written by `edgekit convert`)")
    ap.add_argument("--max-memory", help="memory budget: bytes, 800MB (decimal) or 1GiB (binary); default: what is available now")
    ap.add_argument("--n-ctx", type=int, default=2048, help="context length the app will open the model with (default 2048)")
    ap.add_argument("--prompt", default="In one sentence, what is the sea?")
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args(argv)

    try:
        # edgekit's own size parser: "512MB" is decimal, "2GiB" / "2g" binary; an unreadable size is an EdgekitError
        budget = memory_fit.parse_bytes(args.max_memory) if args.max_memory else memory_fit.available_bytes()
        candidates = [describe(p, args.n_ctx) for p in args.artifacts]
        for c in candidates:
            c.fits = c.needs <= budget

        where = "--max-memory" if args.max_memory else "available now"
        print(f"memory budget: {human(budget)} ({where}); context {args.n_ctx} tokens")
        width, lw = max(len(c.path) for c in candidates), max(6, *(len(c.label) for c in candidates))
        print(f"  {'artifact':<{width}}  {'recipe':<{lw}}  {'needs':>10}  {'fits':<4}  {'KLD':>8}  {'bits/w':>6}")
        for c in candidates:
            kld = f"{c.kld:.4f}" if c.kld is not None else "-"
            bits = f"{c.bits:.2f}" if c.bits is not None else "-"
            fits = "yes" if c.fits else "no"
            print(f"  {c.path:<{width}}  {c.label:<{lw}}  {human(c.needs):>10}  {fits:<4}  {kld:>8}  {bits:>6}")

        if not any(c.fits for c in candidates):
            smallest = min(candidates, key=lambda c: c.needs)
            raise edgekit.EdgekitError(
                f"none of the {len(candidates)} artifacts fits in {human(budget)} at context {args.n_ctx} "
                f"(the smallest, {smallest.path}, needs {human(smallest.needs)})",
                "free memory, lower --n-ctx, or convert a smaller build (e.g. -q int4)")
        best, why = choose(candidates)
        print(f"picked: {best.path} ({why})")
        print(f"  needs {best.breakdown}")

        # open it with the context the estimate assumed, and use it
        with edgekit.load(best.path, n_ctx=args.n_ctx) as model:
            print("reply: ", end="", flush=True)
            for piece in model.generate(args.prompt, max_tokens=args.max_tokens, stream=True, chat=True):
                print(piece, end="", flush=True)
            print()
    except edgekit.EdgekitError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
