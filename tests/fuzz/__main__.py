"""``python -m tests.fuzz [--cases N] [--seed S] [--workers W] [--only KIND ...] [--replay KIND:INDEX ...]``:
run the fuzzing suite, print the outcome table, write it as JSON; exit 1 when any case is bad."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from tests.fuzz import cases as C
from tests.fuzz.runner import BAD, OUTCOMES, run, table


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz")
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", nargs="*", choices=sorted(C.KINDS))
    ap.add_argument("--replay", nargs="*", default=None, help="KIND:INDEX cases to run again")
    ap.add_argument("--seeds", type=Path, default=Path("out/fuzz/seeds"), help="where the good inputs are built (kept)")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/fuzz.json"))
    ap.add_argument("--failures", type=Path, default=Path("out/fuzz/failures"))
    a = ap.parse_args()
    replay = [(k, int(i)) for k, i in (r.rsplit(":", 1) for r in a.replay)] if a.replay else None
    t0 = time.monotonic()

    def write(results, final: bool = False) -> dict:
        counts = table(results)
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"seed": a.seed, "cases": len(results), "seconds": round(time.monotonic() - t0, 1),
                                      "complete": final, "table": counts,
                                      "bad": [r.__dict__ for r in results if r.outcome != "good"],
                                      "cases_run": [r.__dict__ for r in results]}, indent=2))
        return counts

    with tempfile.TemporaryDirectory(prefix="edgekit-fuzz-") as work:
        results = run(a.cases, a.seed, a.seeds.resolve(), Path(work), a.workers, a.only, replay, a.failures.resolve(),
                      checkpoint=write)
    counts = write(results, final=True)
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"fuzzing: {len(results)} cases, seed {a.seed}, {time.monotonic() - t0:.0f} s")
    t.add_column("input", no_wrap=True)
    for col in ("cases", *OUTCOMES, "s/case"):
        t.add_column(col, justify="right", no_wrap=True)
    for kind, row in counts.items():
        secs = [r.seconds for r in results if kind in (r.kind, "total")]
        t.add_row(kind, *(str(row[c]) for c in ("cases", *OUTCOMES)), f"{sum(secs) / max(1, len(secs)):.1f}",
                  end_section=kind == list(counts)[-2])
    Console(width=160).print(t)
    return 1 if any(counts["total"][b] for b in BAD) else 0


if __name__ == "__main__":
    sys.exit(main())
