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
    v = m["validation"]
    t.add_row("validation", "passed" if v["passed"] else (f"not run: {v.get('why')}" if v["passed"] is None else "FAILED"))
    t.add_row("time", f"{m['timings_s']['total_s']:.1f} s")
    return t


def _spread(r: dict, key: str, fmt: str) -> str:
    s = r.get("spread", {}).get(key)
    val = format(r[key], fmt)
    return val if not s else f"{val}  (min {format(s['min'], fmt)}, max {format(s['max'], fmt)}, n={s['n']})"


def profile_table(r: dict[str, Any]) -> Table:
    t = Table(title=f"edgekit profile {r['artifact']}", show_header=False)
    bpw = r.get("bits_per_weight")
    if r.get("speed_note"):  # nothing could be measured here (the runtime does not exist on this OS)
        t.add_row("format / runtime", f"{r['format']}{' encoder' if r.get('kind') == 'encoder' else ''} / {r['runtime']}")
        t.add_row("size", f"{_mb(r['size_bytes'])}" + (f" at {bpw:.2f} bits/weight" if bpw else ""))
        t.add_row("speed and memory", f"not measured: {r['speed_note']}")
        t.add_row("quality", r.get("quality_note") or "-")
        return t
    t.add_row("format / runtime", f"{r['format']} / {r['runtime']} ({r['n_threads']} threads)")
    t.add_row("size", f"{_mb(r['size_bytes'])}" + (f" at {bpw:.2f} bits/weight" if bpw else ""))
    t.add_row("load", _spread(r, "load_s", ".3f") + " s")
    t.add_row("time to first token", _spread(r, "ttft_ms", ".1f") + f" ms ({r['settings']['prompt_tokens']}-token prompt)")
    t.add_row("prefill", _spread(r, "prefill_tok_s", ".1f") + f" tok/s ({r['settings']['prefill_tokens']} tokens)")
    t.add_row("decode", _spread(r, "decode_tok_s", ".1f") + f" tok/s ({r['settings']['decode_tokens']} tokens)")
    t.add_row("peak resident memory", _mb(r["peak_rss_bytes"]))
    quality_rows(t, r.get("quality"))
    if r.get("quality_note"):
        t.add_row("quality", r["quality_note"])
    if r.get("roofline_percent"):
        rp = r["roofline_percent"]
        t.add_row("% of host roofline", f"decode {rp['decode']:.0f}% of read bandwidth, prefill {rp['prefill']:.0f}% of f32 matmul")
    return t


def _fmt(v: Any, fmt: str, none: str = "-") -> str:
    return none if v is None else format(v, fmt)


def predictions_table(r: dict[str, Any]) -> Table | None:
    """Measured host figures next to predicted ones, per target, and cloud baselines."""
    if not r.get("targets") and not r.get("cloud"):
        return None
    if r.get("kind") == "encoder":
        return encoder_predictions_table(r)
    t = Table(title=f"predicted per target ({r.get('calibration', '')})")
    for c in ("target", "kind", "decode tok/s", "TTFT ms", "load s", "peak memory", "budget", "fits", "$/1k tok"):
        t.add_column(c)
    if "decode_tok_s" in r:  # absent when the runtime cannot run on this host
        t.add_row("host (measured)", "cpu", f"{r['decode_tok_s']:.1f}", f"{r['ttft_ms']:.0f}", f"{r['load_s']:.2f}",
                  _mb(r["peak_rss_bytes"]), "-", "-", "0 (on device)")
    ph = r.get("predicted_host")
    if ph:
        t.add_row("host (predicted)", "cpu", f"{ph['decode_tok_s']:.1f}", f"{ph['ttft_ms']:.0f}", f"{ph['load_s']:.2f}",
                  _mb(ph["peak_memory_bytes"]), "-", "-", "")
    for name, p in (r.get("targets") or {}).items():
        fits = p.get("fits")
        t.add_row(name, p.get("kind", ""), f"{p['decode_tok_s']:.1f}", f"{p['ttft_ms']:.0f}", f"{p['load_s']:.2f}",
                  _mb(p["peak_memory_bytes"]), _mb(p.get("memory_budget_bytes")),
                  "-" if fits is None else ("yes" if fits else "[red]NO[/red]"), "0 (on device)")
    for name, c in (r.get("cloud") or {}).items():
        t.add_row(name, f"cloud ({c['source']})", f"{c['decode_tok_s']:.1f}", f"{c['ttft_ms']:.0f}", "-", "-", "-", "-",
                  _fmt(c.get("usd_per_1k_tokens"), ".5f", "unknown"))
    return t


def encoder_predictions_table(r: dict[str, Any]) -> Table:
    """Texts/s and latency per batch: measured on the host, predicted per target."""
    preds = dict(r.get("targets") or {})
    some = next(iter(preds.values()), None) or r.get("predicted_host") or {}
    sizes = list((some.get("batches") or {"1": 0, "32": 0}).keys())
    tokens = some.get("tokens_per_text")
    t = Table(title=f"predicted per target, encoder at {_fmt(tokens, '.0f')} tokens per text ({r.get('calibration', '')})")
    for c in ["target", "kind"] + [f"batch {b}: ms" for b in sizes] + [f"texts/s @{sizes[-1]}", "memory", "budget", "fits"]:
        t.add_column(c)
    if "texts_s" in r and r.get("settings"):  # measured here (at the set's own lengths, not the table's)
        t.add_row("host (measured)", "cpu", *["-"] * (len(sizes) - 1), f"{r['batch_latency_ms']:.1f} (@{r['settings']['batch_size']})",
                  f"{r['texts_s']:.0f}", _mb(r.get("peak_rss_bytes")), "-", "-")
    rows = ([("host (predicted)", r["predicted_host"])] if r.get("predicted_host") else []) + list(preds.items())
    for name, p in rows:
        fits = p.get("fits")
        t.add_row(name, p.get("kind", ""), *[f"{p['batches'][b]['latency_ms']:.2f}" for b in sizes],
                  f"{p['texts_s']:.0f}", _mb(p.get("peak_memory_bytes")), _mb(p.get("memory_budget_bytes")),
                  "-" if fits is None else ("yes" if fits else "[red]NO[/red]"))
    return t


def calibration_table(cal) -> Table:
    if hasattr(cal, "overhead_s"):  # an encoder calibration: one compute efficiency and a per-call cost
        t = Table(title=f"calibration {cal.describe()}", show_header=False)
        t.add_row("compute efficiency (% of f32 matmul)", _fmt(100 / cal.y if cal.y else None, ".1f"))
        t.add_row("fixed cost per call", f"{1000 * cal.overhead_s:.2f} ms")
        return t
    t = Table(title=f"calibration {cal.runtime}/{cal.format} ({len(cal.points)} artifacts, host read "
                    f"{cal.host['read_bandwidth_bytes_s'] / 1e9:.1f} GB/s, f32 matmul {cal.host['compute_flops']['f32'] / 1e9:.0f} GFLOP/s)")
    for c in ("weight type", "decode: % of bandwidth roofline", "prefill: % of compute roofline"):
        t.add_column(c)
    eff = cal.efficiencies()
    for typ in sorted(set(eff["decode"]) | set(eff["prefill"])):
        t.add_row(typ, _fmt(100 * eff["decode"].get(typ, 0) if typ in eff["decode"] else None, ".1f"),
                  _fmt(100 * eff["prefill"].get(typ, 0) if typ in eff["prefill"] else None, ".1f"))
    t.add_row("KV cache (per context token)", _fmt(100 / cal.x_kv if cal.x_kv else None, ".1f"),
              _fmt(100 / cal.y_attn if cal.y_attn else None, ".1f"))
    t.add_row("runtime memory overhead", _mb(cal.mem_overhead_bytes), "")
    return t


def targets_table(profiles: dict, host: dict | None = None) -> Table:
    t = Table(title="device profiles")
    for c in ("name", "kind", "bandwidth GB/s", "compute", "RAM GB", "budget GB", "formats"):
        t.add_column(c, no_wrap=c in ("name", "kind"))
    if host:
        t.add_row("host", "cpu (measured)", f"{host['read_bandwidth_bytes_s'] / 1e9:.1f} (read)",
                  f"{host['compute_flops']['f32'] / 1e9:.0f} GFLOPS f32", f"{host['ram_bytes'] / 1e9:.1f}", "-", "gguf")
    for name, p in sorted(profiles.items()):
        bw = p.get("copy_bandwidth") or p.get("memory_bandwidth")
        comp = p.get("compute_f32") or p.get("compute_f16") or p.get("compute_int8")
        budget = p.memory_budget_bytes() / 1e9
        t.add_row(name, p.kind, f"{bw.value:g}" + (" (copy)" if p.get("copy_bandwidth") else " (peak)"),
                  f"{comp.value:g} {comp.unit}", f"{p.get('ram').value:g}", f"{budget:.1f}", ",".join(p.formats))
    return t


def plan_table(plan: dict[str, Any]) -> Table:
    w = plan["winner"]
    t = Table(title=f"plan for {plan['target']}: {w['quant']} ({w['format']}) - {plan['why']}; {plan['calibration']}",
              caption=f"predicted at context {plan['context']}, {plan['prompt_tokens']}-token prompt")
    for c in ("recipe", "format", "size", "decode tok/s", "TTFT ms", "peak memory", "KLD", "quality from", "verdict"):
        t.add_column(c)
    for c in plan["candidates"]:
        win = c["quant"] == w["quant"] and c["format"] == w["format"]
        verdict = "[bold green]chosen[/bold green]" if win else ("fits" if c["fits"] else "; ".join(c["why_not"]))
        t.add_row(c["quant"], c["format"], _mb(c["size_bytes"]), f"{c['decode_tok_s']:.1f}", f"{c['ttft_ms']:.0f}",
                  _mb(c["peak_memory_bytes"]), f"{c['kld_mean']:.3g}", c["quality_from"], verdict)
    return t


def sweep_tables(result: dict) -> list[Table]:
    """One rich table per device: every candidate's figures there, constraints, the front and the choice."""
    tables = []
    for dev in result["devices"]:
        front, best = set(result["fronts"].get(dev) or []), result["best"].get(dev)
        t = Table(title=f"sweep: {dev} (* chosen, + Pareto front)")
        for col in ("candidate", "figures", "size MB", "KLD", "decode tok/s", "TTFT ms", "peak MB", "meets constraints"):
            t.add_column(col, justify="left" if col in ("candidate", "figures", "meets constraints") else "right")
        for c in result["candidates"]:
            mark = ("*" if c["candidate"] == best else "") + ("+" if c["candidate"] in front else "")
            f = c["devices"].get(dev)
            if f is None:
                t.add_row(f"{mark}{c['candidate']}", "failed", "", "", "", "", "", (c.get("error") or "")[:80])
                continue
            num = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
            t.add_row(f"{mark}{c['candidate']}", f["how"], num((f.get("size_bytes") or 0) / 1e6, ".1f"), num(f.get("kld_mean"), ".4f"),
                      num(f.get("decode_tok_s"), ".1f"), num(f.get("ttft_ms"), ".0f"),
                      num((f.get("peak_memory_bytes") or 0) / 1e6, ".0f"),
                      "yes" if f["feasible"] else "no: " + ", ".join(f["violates"]))
        tables.append(t)
    return tables
