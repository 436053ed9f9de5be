"""Rich tables for the terminal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f} MB"


def _q(quality: dict | None, key: str, fmt: str) -> str:
    return "-" if not quality or quality.get(key) is None else format(quality[key], fmt)


def quality_rows(t: Table, q: dict | None) -> None:
    t.add_row("perplexity (artifact / reference)", f"{_q(q, 'ppl', '.3f')} / {_q(q, 'ref_ppl', '.3f')}")
    t.add_row("KL divergence mean / p99", f"{_q(q, 'kld_mean', '.4f')} / {_q(q, 'kld_p99', '.4f')}")
    t.add_row("top-1 agreement", _q(q, "top1_agreement", ".2%"))
    if q:
        t.add_row("evaluated on", f"{q['tokens']} tokens of {q['text']}")


def manifest_table(m: dict[str, Any], out: Path) -> Table:
    t = Table(title=f"edgekit convert -> {out}", show_header=False)
    t.add_row("artifact", f"{out / m['artifact']['file']} ({m['artifact']['format']}, {m['recipe']['quant']})")
    t.add_row("source", f"{m['model']['name']} ({m['model']['parameters'] / 1e6:.1f}M parameters)")
    t.add_row("size", f"{_mb(m['size_bytes'])} at {m['bits_per_weight']:.2f} bits/weight")
    t.add_row("tensor types", ", ".join(f"{k}x{v}" for k, v in m["artifact"].get("tensor_types", {}).items()))
    quality_rows(t, m.get("quality"))
    t.add_row("validation", "passed" if m["validation"]["passed"] else "FAILED")
    t.add_row("time", f"{m['timings_s']['total_s']:.1f} s")
    return t


def _spread(r: dict, key: str, fmt: str) -> str:
    s = r.get("spread", {}).get(key)
    val = format(r[key], fmt)
    return val if not s else f"{val}  (min {format(s['min'], fmt)}, max {format(s['max'], fmt)}, n={s['n']})"


def profile_table(r: dict[str, Any]) -> Table:
    t = Table(title=f"edgekit profile {r['artifact']}", show_header=False)
    t.add_row("format / runtime", f"{r['format']} / {r['runtime']} ({r['n_threads']} threads)")
    bpw = r.get("bits_per_weight")
    t.add_row("size", f"{_mb(r['size_bytes'])}" + (f" at {bpw:.2f} bits/weight" if bpw else ""))
    t.add_row("load", _spread(r, "load_s", ".3f") + " s")
    t.add_row("time to first token", _spread(r, "ttft_ms", ".1f") + f" ms ({r['settings']['prompt_tokens']}-token prompt)")
    t.add_row("prefill", _spread(r, "prefill_tok_s", ".1f") + f" tok/s ({r['settings']['prefill_tokens']} tokens)")
    t.add_row("decode", _spread(r, "decode_tok_s", ".1f") + f" tok/s ({r['settings']['decode_tokens']} tokens)")
    t.add_row("peak resident memory", _mb(r["peak_rss_bytes"]))
    quality_rows(t, r.get("quality"))
    if r.get("quality_note"):
        t.add_row("quality", r["quality_note"])
    return t
