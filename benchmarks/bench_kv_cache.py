"""Quantized KV caches in llama.cpp at long context: memory held and quality lost, against the f16 cache.

For the embedded SmolLM2-135M as Q8_0 (weights near-lossless, so the cache's error shows) and as Q4_0 (the
container of edgekit's int4), each KV-cache type edgekit exposes (``edgekit.load(path, kv_type=...)``: f16 without and with
flash attention, q8_0, q4_0) scores windows of 2,048 tokens of the shipped evaluation text through edgekit's
llama.cpp session. Per row:

- KV bytes held for the 2,048 positions: ``llama_state_seq_get_size`` of the filled sequence (what llama.cpp
  serialises for it: the cache tensors in their storage type), next to edgekit's memory model
  (``kv_bytes_per_token x n_ctx`` with the type's factor, what `profile` and the memory guard use);
- mean KL divergence from the f16 cache of the same artifact (flash attention on, as the quantized caches
  need it) over the last 512 positions of each window (the positions that attend to ~2,000 cached tokens)
  and over every position, and the KLD from the float model (transformers) so the increase is explicit.

Prints a table and writes benchmarks/results/kv_cache.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
CTX = 2048
TAIL = 512
ROWS = (("f16", False), ("f16", True), ("q8_0", True), ("q4_0", True))


def kld(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(p || q) per row, from logits."""
    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def kv_state_bytes(session) -> int:
    """Bytes llama.cpp serialises for sequence 0 after the last scoring (the session keeps its cache filled)."""
    lib = session._lib
    return int(lib.llama_state_seq_get_size(session._llm._ctx.ctx, 0))


def fill_and_measure(session, ids: list[int]) -> tuple[np.ndarray, int]:
    """All-position logits of ``ids``, then the KV bytes of the same positions held in the cache."""
    logits = session.logits(ids)
    session._decode(ids, all_logits=False)  # logits() clears the cache afterwards: fill it again to weigh it
    size = kv_state_bytes(session)
    session._clear()
    return logits, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("out/bench-kv-cache"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from importlib.resources import files

    import edgekit
    from edgekit.manifest import read_manifest
    from edgekit.pipeline import ConvertRequest, convert
    from edgekit.reference import TorchReference
    from edgekit.sources import load_reference, resolve
    from edgekit.targets.facts import artifact_facts

    console = Console(width=200)  # tables go to logs too: keep every column
    arts = {}
    for quant in ("q8_0", "q4_0"):
        d = args.out / f"{quant}-gguf"
        if not read_manifest(d):
            convert(ConvertRequest(None, "gguf", quant, d, force=True))
        arts[quant] = d / "model.gguf"
    text = files("edgekit").joinpath("data/eval.txt").read_text(encoding="utf-8")
    probe = edgekit.load(arts["q8_0"], n_ctx=CTX, check_memory=False)
    ids = probe.tokenize(text)
    probe.close()
    if len(ids) < CTX:
        raise SystemExit(f"the evaluation text has {len(ids)} tokens, fewer than {CTX}")
    windows = [ids[:CTX], ids[-CTX:]]  # two windows (overlapping when the text is under 4,096 tokens)
    ref = TorchReference(load_reference(resolve(None)))
    ref_logits = [ref.logits(w) for w in windows]
    del ref
    result = {"context": CTX, "tail_positions": TAIL, "windows": len(windows), "text_tokens": len(ids), "artifacts": {}}
    for quant, path in arts.items():
        facts = artifact_facts(path)
        rows = {}
        for kv, fa in ROWS:
            s = edgekit.load(path, n_ctx=CTX, kv_type=kv, flash_attn=fa, check_memory=False)
            per_window = [fill_and_measure(s, w) for w in windows]
            s.close()
            rows[(kv, fa)] = {"logits": [lg for lg, _ in per_window], "kv_bytes": per_window[0][1]}
        base = rows[("f16", True)]
        t = Table(title=f"{quant} GGUF, KV cache at {CTX} tokens of context ({len(windows)} windows, KLD over the last "
                        f"{TAIL} positions and all)")
        for c in ("KV cache", "flash attn", "KV bytes (llama.cpp)", "x f16", "edgekit's model", "KLD vs f16 cache (last 512)",
                  "(all)", "KLD vs float (last 512)", "increase"):
            t.add_column(c)
        out = {}
        ref_tail = {}
        for (kv, fa), r in rows.items():
            vs_f16 = np.concatenate([kld(b[-TAIL:], q[-TAIL:]) for b, q in zip(base["logits"], r["logits"])])
            vs_f16_all = np.concatenate([kld(b, q) for b, q in zip(base["logits"], r["logits"])])
            vs_ref = np.concatenate([kld(f[-TAIL:], q[-TAIL:]) for f, q in zip(ref_logits, r["logits"])])
            ref_tail[(kv, fa)] = float(vs_ref.mean())
            model_bytes = facts.with_kv_type(kv).kv_bytes_per_token * CTX
            out[f"{kv}{' +fa' if fa else ''}"] = rec = {
                "kv_type": kv, "flash_attn": fa, "kv_bytes": r["kv_bytes"], "kv_bytes_vs_f16": r["kv_bytes"] / base["kv_bytes"],
                "predicted_kv_bytes": model_bytes, "kld_vs_f16_cache_tail": float(vs_f16.mean()),
                "kld_vs_f16_cache_all": float(vs_f16_all.mean()), "kld_vs_float_tail": float(vs_ref.mean())}
        for rec in out.values():
            rec["kld_vs_float_increase"] = rec["kld_vs_float_tail"] - ref_tail[("f16", True)]
            t.add_row(rec["kv_type"], "on" if rec["flash_attn"] else "off", f"{rec['kv_bytes'] / 2**20:.1f} MiB",
                      f"{rec['kv_bytes_vs_f16']:.3f}", f"{rec['predicted_kv_bytes'] / 2**20:.1f} MiB",
                      f"{rec['kld_vs_f16_cache_tail']:.5f}", f"{rec['kld_vs_f16_cache_all']:.5f}",
                      f"{rec['kld_vs_float_tail']:.5f}", f"{rec['kld_vs_float_increase']:+.5f}")
        console.print(t)
        result["artifacts"][quant] = out
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "kv_cache.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
