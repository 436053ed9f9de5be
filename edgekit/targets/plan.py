"""Budget-driven conversion: pick the recipe predicted to give the best quality that fits a device.

Each candidate (recipe x format the device runs) is predicted before anything is converted: size and
bytes per token from the architecture and the recipe's storage types, speed and memory from the
calibrated predictor, quality from what edgekit measured for this source before (the quality ledger
every ``convert`` appends to) or, when never measured, from the priors below.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from edgekit.cache import cache_dir
from edgekit.errors import EdgekitError
from edgekit.targets import predict as pr
from edgekit.targets.facts import FORMAT_RUNTIME, RECIPE_TYPES, estimate_facts

# Mean KL divergence measured on SmolLM2-135M with the shipped text (make bench); used only for
# recipes never measured for the source at hand, and labelled as priors in the plan.
# GGUF and ONNX hold the same numbers (measured: int4 0.1069 vs 0.1066), so one prior serves both.
QUALITY_PRIORS = {"f16": 1e-4, "q8_0": 4e-3, "int4": 0.11, "q4_0": 0.24}
RECIPES = ("f16", "q8_0", "int4", "q4_0")
# candidates whose quality is this close to the best count as equal: the fastest predicted decode wins
QUALITY_TIE = 0.05


def ledger_path():
    return cache_dir() / "quality-ledger.jsonl"


def record_quality(source_sha: str, quant: str, fmt: str, quality: dict[str, Any], size: int) -> None:
    """Append one line (one write, flushed): a crash can cut only that line short, and the next append starts on a
    fresh line so the cut one stays the only damaged record (readers skip it)."""
    import os

    line = json.dumps({"source": source_sha, "quant": quant, "format": fmt, "size_bytes": size,
                       "kld_mean": quality["kld_mean"], "top1_agreement": quality["top1_agreement"],
                       "ppl": quality["ppl"], "ref_ppl": quality["ref_ppl"], "text": quality.get("text")}) + "\n"
    path = ledger_path()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size_now = os.fstat(fd).st_size
        if size_now:
            with open(path, "rb") as f:
                f.seek(size_now - 1)
                if f.read(1) != b"\n":
                    line = "\n" + line
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def known_quality(source_sha: str) -> dict[tuple[str, str], dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    if ledger_path().exists():
        for line in ledger_path().read_text().splitlines():
            try:
                e = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                continue
            if not isinstance(e, dict) or e.get("source") != source_sha or "quant" not in e or "format" not in e:
                continue
            key = (e["quant"], e["format"])
            # figures on the shipped text compare recipes on equal terms: they win over others;
            # among equals, the latest measurement wins
            shipped = str(e.get("text", "")).startswith("edgekit:")
            if key not in out or shipped or not str(out[key].get("text", "")).startswith("edgekit:"):
                out[key] = e
    return out


@dataclass
class Candidate:
    quant: str
    format: str
    predicted: dict[str, Any]
    kld_mean: float
    quality_from: str
    rejected: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        return {"quant": self.quant, "format": self.format, "kld_mean": self.kld_mean, "quality_from": self.quality_from,
                "size_bytes": self.predicted["size_bytes"], "decode_tok_s": self.predicted["decode_tok_s"],
                "ttft_ms": self.predicted["ttft_ms"], "peak_memory_bytes": self.predicted["peak_memory_bytes"],
                "fits": not self.rejected, "why_not": self.rejected}


def _metadata_bytes(tokenizer: dict[str, Any]) -> int:
    total = 0
    for kv in tokenizer.values():
        v = kv["value"]
        if isinstance(v, list):
            total += sum(len(str(x).encode()) + 8 for x in v)
        else:
            total += len(str(v).encode()) + 8
    return total


def plan(reference, source_sha: str, profile, max_latency_ms: float | None = None, min_tok_s: float | None = None,
         max_kld: float | None = None, min_top1: float | None = None, context: int = 1024,
         prompt_tokens: int = 128) -> dict[str, Any]:
    from edgekit.registry import EXPORTERS

    machine = pr.profile_machine(profile)
    measured = known_quality(source_sha)
    meta = _metadata_bytes(reference.tokenizer)
    cands, notes = [], {}
    for fmt in profile.formats:
        if fmt not in EXPORTERS.names() or fmt not in FORMAT_RUNTIME:
            continue  # Core ML runs nowhere here: nothing to calibrate its predictions with
        runtime = FORMAT_RUNTIME[fmt][0]
        cal = pr.load(runtime, fmt)
        notes[fmt] = cal.describe() if cal else f"{runtime}/{fmt} uncalibrated (run `edgekit calibrate`); default efficiencies"
        if cal is None:
            from edgekit.targets.host import host_figures

            cal = pr.Calibration(runtime, fmt, {}, 1 / pr.UNCALIBRATED_EFFICIENCY, {}, 1 / pr.UNCALIBRATED_EFFICIENCY,
                                 150e6, 0.2, host_figures())
        for quant in RECIPES:
            facts = estimate_facts(reference.spec, quant, fmt, meta)
            p = pr.predict(facts, cal, machine, context, prompt_tokens) | {"size_bytes": facts.size_bytes}
            if (quant, fmt) in measured:
                m = measured[(quant, fmt)]
                kld, top1, src = m["kld_mean"], m["top1_agreement"], "measured"
            else:
                kld, top1, src = QUALITY_PRIORS[quant], None, "prior"
            c = Candidate(quant, fmt, p, kld, src)
            if not p.get("fits", True):
                c.rejected.append(f"memory {p['peak_memory_bytes'] / 1e9:.2f} GB > budget {p['memory_budget_bytes'] / 1e9:.2f} GB")
            if max_latency_ms is not None and p["ttft_ms"] > max_latency_ms:
                c.rejected.append(f"TTFT {p['ttft_ms']:.0f} ms > {max_latency_ms:g} ms")
            if min_tok_s is not None and p["decode_tok_s"] < min_tok_s:
                c.rejected.append(f"decode {p['decode_tok_s']:.1f} tok/s < {min_tok_s:g}")
            if max_kld is not None and kld > max_kld:
                c.rejected.append(f"KLD {kld:.3g} > {max_kld:g}")
            if min_top1 is not None and top1 is not None and top1 < min_top1:
                c.rejected.append(f"top-1 {top1:.1%} < {min_top1:.0%}")
            cands.append(c)
    if not cands:
        raise EdgekitError(f"{profile.name} runs {', '.join(profile.formats)}, none of which edgekit exports yet",
                           "choose another --target")
    ok = [c for c in cands if not c.rejected]
    if not ok:
        closest = min(cands, key=lambda c: len(c.rejected))
        raise EdgekitError(f"nothing fits {profile.name}: the closest candidate ({closest.quant}) fails "
                           + "; ".join(closest.rejected), "relax the limits, or choose a smaller model or another --target")
    # best predicted quality; among (nearly) equals the fastest predicted decode, then the smaller artifact
    best = min(c.kld_mean for c in ok)
    equal = [c for c in ok if c.kld_mean <= best * (1 + QUALITY_TIE) + 1e-12]
    winner = min(equal, key=lambda c: (-c.predicted["decode_tok_s"], c.predicted["size_bytes"]))
    why = (f"lowest {'measured' if winner.quality_from == 'measured' else 'expected'} KL divergence "
           f"({winner.kld_mean:.3g}) of the {len(ok)} candidates that fit"
           + (f", and the fastest predicted decode of the {len(equal)} within {QUALITY_TIE:.0%} of it" if len(equal) > 1 else ""))
    return {"target": profile.name, "winner": {"quant": winner.quant, "format": winner.format}, "why": why,
            "calibration": "; ".join(f"{f}: {n}" for f, n in notes.items()), "context": context, "prompt_tokens": prompt_tokens,
            "limits": {"max_latency_ms": max_latency_ms, "min_tok_s": min_tok_s, "max_kld": max_kld, "min_top1": min_top1},
            "candidates": [c.row() for c in cands]}


assert set(RECIPES) <= set(RECIPE_TYPES)
