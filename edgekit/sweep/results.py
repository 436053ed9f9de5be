"""A sweep's results: one table of every candidate with its measured and predicted figures per device, the
Pareto front per device under the constraints, the chosen artifact per device copied to ``OUT/best/<device>/``,
and ``sweep.json``, ``sweep.csv`` and ``report.html`` (the report page with the sweep's fronts)."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from typing import Any

from edgekit.sweep.spec import SweepSpec

FIGURES = ("size_bytes", "kld_mean", "top1_agreement", "decode_tok_s", "ttft_ms", "peak_memory_bytes")


def figures(row: dict[str, Any], device: str, measured: list[str]) -> dict[str, Any] | None:
    """The row's figures on ``device``: measured there, or predicted from the host's measurement."""
    conv = row.get("conversion") or {}
    if not conv.get("ok"):
        return None
    source = device if device in measured else measured[0]
    m = (row.get("measurements") or {}).get(source) or {}
    if not m.get("ok"):
        return None
    prof = m["profile"]
    q = prof.get("quality") or {}
    out = {"size_bytes": prof.get("size_bytes"), "kld_mean": q.get("kld_mean"), "top1_agreement": q.get("top1_agreement"),
           "ppl": q.get("ppl")}
    if device in measured:
        return out | {"how": "measured", "decode_tok_s": prof.get("decode_tok_s"), "ttft_ms": prof.get("ttft_ms"),
                      "peak_memory_bytes": prof.get("peak_rss_bytes"), "fits": True}
    pred = (prof.get("targets") or {}).get(device)
    if not pred:
        return None
    return out | {"how": "predicted", "decode_tok_s": pred.get("decode_tok_s"), "ttft_ms": pred.get("ttft_ms"),
                  "peak_memory_bytes": pred.get("peak_memory_bytes"), "fits": pred.get("fits", True),
                  "calibration": pred.get("calibration")}


def feasible(f: dict[str, Any], c: dict[str, float]) -> tuple[bool, list[str]]:
    why = []
    checks = [("max_size_mb", "size_bytes", 1e6, max), ("max_peak_memory_mb", "peak_memory_bytes", 1e6, max),
              ("min_decode_tok_s", "decode_tok_s", 1, min), ("max_ttft_ms", "ttft_ms", 1, max), ("max_kld", "kld_mean", 1, max),
              ("min_top1", "top1_agreement", 1, min)]
    for key, fig, scale, kind in checks:
        if key not in c:
            continue
        v = f.get(fig)
        if v is None or (kind is max and v / scale > c[key]) or (kind is min and v / scale < c[key]):
            why.append(key)
    if f.get("fits") is False:
        why.append("memory budget")
    return not why, why


def _objective(f: dict[str, Any], name: str) -> float:
    if name == "neg_decode_tok_s":
        return -(f.get("decode_tok_s") or 0.0)
    v = f.get(name)
    return float("inf") if v is None else float(v)


def pareto(points: list[tuple[str, dict[str, Any]]], minimize: list[str]) -> list[str]:
    """Names of the points no other point beats on every objective (and strictly on one)."""
    vals = {n: [_objective(f, o) for o in minimize] for n, f in points}
    front = []
    for n, v in vals.items():
        dominated = any(all(w[i] <= v[i] for i in range(len(v))) and any(w[i] < v[i] for i in range(len(v)))
                        for m, w in vals.items() if m != n)
        if not dominated:
            front.append(n)
    return front


def finish(spec: SweepSpec, out: Path, rows: list[dict], measured: list[str], profiles: list[str],
           stats: dict[str, Any]) -> dict[str, Any]:
    from edgekit.atomic import write_atomic

    devices = [d for d in spec.targets] or measured
    table, fronts, best = [], {}, {}
    for row in rows:
        entry = {k: row[k] for k in ("candidate", "key", "quant", "format", "prune", "recover", "rank")}
        entry["ok"] = bool((row.get("conversion") or {}).get("ok"))
        entry["error"] = (row.get("conversion") or {}).get("error")
        if entry["ok"]:
            failed = [f"{d}: {m['error']}" for d, m in (row.get("measurements") or {}).items() if not m.get("ok")]
            if failed:
                entry["error"] = "; ".join(failed)
        entry["devices"] = {}
        for d in devices:
            f = figures(row, d, measured)
            if f is not None:
                ok, why = feasible(f, spec.constraints)
                entry["devices"][d] = f | {"feasible": ok, "violates": why}
        table.append(entry)
    for d in devices:
        pts = [(e["candidate"], e["devices"][d]) for e in table if d in e["devices"] and e["devices"][d]["feasible"]]
        fronts[d] = pareto(pts, spec.minimize)
        if pts:  # the best quality that meets the constraints; a smaller file breaks a tie
            name, _ = min(pts, key=lambda p: (_objective(p[1], "kld_mean"), _objective(p[1], "size_bytes")))
            best[d] = name
    by_name = {r["candidate"]: r for r in rows}
    best_dir = out / "best"
    shutil.rmtree(best_dir, ignore_errors=True)
    for d, name in best.items():
        src = Path(by_name[name]["conversion"]["artifact"])
        dest = best_dir / "".join(c if c.isalnum() or c in "._-" else "_" for c in d)
        shutil.copytree(src, dest)
        (dest / "sweep-choice.json").write_text(json.dumps({"device": d, "candidate": name, "figures": next(
            e for e in table if e["candidate"] == name)["devices"][d], "constraints": spec.constraints}, indent=2))
    result = {"spec": spec.path, "devices": devices, "measured_on": measured, "objectives": spec.minimize,
              "constraints": spec.constraints, "candidates": table, "fronts": fronts, "best": best, "stats": stats}
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "sweep.json", json.dumps(result, indent=2))
    write_atomic(out / "sweep.csv", to_csv(table, devices))
    _report(result, rows, profiles, out)
    return result


def to_csv(table: list[dict], devices: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["candidate", "quant", "format", "prune", "recover", "rank", "ok", "device", "how", *FIGURES, "feasible", "error"])
    for e in table:
        if not e["devices"]:
            w.writerow([e["candidate"], e["quant"], e["format"], e["prune"], e["recover"], e["rank"], e["ok"], "", "",
                        *[""] * len(FIGURES), "", e.get("error") or ""])
        for d, f in e["devices"].items():
            w.writerow([e["candidate"], e["quant"], e["format"], e["prune"], e["recover"], e["rank"], e["ok"], d, f["how"],
                        *[f.get(k) for k in FIGURES], f["feasible"], e.get("error") or ""])
    return buf.getvalue()


def _report(result: dict[str, Any], rows: list[dict], profiles: list[str], out: Path) -> None:
    from edgekit.report_html import render_report
    from edgekit.targets.report_data import collect

    dirs = [r["conversion"]["artifact"] for r in rows if (r.get("conversion") or {}).get("ok")]
    data = collect(dirs, profiles or None, measure_missing=False) if dirs else {"artifacts": [], "title": "edgekit sweep"}
    for a in data.get("artifacts", []):  # name artifacts by candidate, not by the cache folder
        a["name"] = next((r["candidate"] for r in rows if (r.get("conversion") or {}).get("artifact") == a["dir"]), a["name"])
    data["title"] = "edgekit sweep"
    data["sweep"] = {k: result[k] for k in ("devices", "objectives", "constraints", "fronts", "best", "candidates")}
    render_report(data, out / "report.html")
