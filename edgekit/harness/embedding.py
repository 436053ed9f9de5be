"""Encoder quality and speed: embedding cosine against the float reference, texts/s, latency per batch.

Quality: the artifact embeds a sentence set (default: the shipped ``edgekit/data/sentences.txt``, one
sentence per line) and each embedding is compared with the float reference's
(:class:`edgekit.encoder.EncoderReference`, torch) by cosine similarity; reported are the mean, the
minimum and the worst sentence's index. Reference embeddings are computed once per (source hash,
sentences, pooling settings) and cached under ``~/.cache/edgekit/embeddings`` (a few hundred KB).

Speed runs in a fresh process (``python -m edgekit.harness.embedding``), importing only the runtime,
so the reference's torch stays out of the peak memory figure: load time, texts/s over the whole set
(batches of ``batch_size``, after a warm-up pass; median of ``reps`` passes), median latency of one
batch, latency of a single text, and the process's peak resident memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edgekit.cache import cache_dir
from edgekit.errors import InputError


def default_sentences_path() -> Path:
    return Path(str(files("edgekit") / "data" / "sentences.txt"))


def read_sentences(path: str | os.PathLike | None = None) -> tuple[list[str], str]:
    """(sentences, label): one per non-empty line, ``#`` lines skipped; the shipped set by default."""
    p = Path(path) if path else default_sentences_path()
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read sentence file {p} ({exc.__class__.__name__})", "pass a UTF-8 text file, one sentence per line") from None
    sentences = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if len(sentences) < 8:
        raise InputError(f"sentence file {p} has {len(sentences)} sentences", "pass at least 8, one per line")
    return sentences, (p.name if path else f"edgekit:{p.name}")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity in float64 (embeddings need not be normalized)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(den, 1e-30)


def reference_embeddings(model, source_id: str, sentences: Sequence[str],
                         progress: Callable[[str, int, int], None] | None = None) -> np.ndarray:
    """The float reference's embeddings of ``sentences`` (torch runs only on a cache miss)."""
    key = json.dumps([source_id, list(sentences), model.max_length, model.pooling, model.normalize, 1])
    path = cache_dir("embeddings") / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.npy"
    if path.exists():
        try:
            return np.load(path)  # allow_pickle stays False
        except Exception:  # noqa: BLE001 - a damaged cache entry is computed again
            path.unlink(missing_ok=True)
    from edgekit.encoder import EncoderReference, torch_threads

    if progress:
        progress("float reference embeddings", 0, 1)
    with torch_threads(1):  # see torch_threads: faster here, and the figures do not depend on it
        emb = EncoderReference(model).embed(list(sentences))
    if progress:
        progress("float reference embeddings", 1, 1)
    import io

    from edgekit.atomic import write_atomic

    buf = io.BytesIO()
    np.save(buf, emb)
    write_atomic(path, buf.getvalue())
    return emb


def compare(got: np.ndarray, want: np.ndarray, label: str = "") -> dict[str, Any]:
    if got.shape != want.shape:
        raise ValueError(f"embeddings of shape {got.shape} against a reference of shape {want.shape}")
    cos = cosines(got, want)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "cosine_p05": float(np.percentile(cos, 5)),
            "worst_index": int(cos.argmin()), "sentences": int(len(cos)), "text": label}


def measure_quality(session, reference, source_id: str, sentences: Sequence[str], label: str = "",
                    progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Cosine of ``session.embed`` against the float ``reference`` (an EncoderModel) on ``sentences``."""
    want = reference_embeddings(reference, source_id, sentences, progress)
    return compare(session.embed(list(sentences)), want, label)


# ---------------------------------------------------------------- speed (fresh process)


@dataclass
class EmbedSpeedConfig:
    batch_size: int = 32
    reps: int = 5  # measured passes over the sentence set (after one warm-up pass)
    load_reps: int = 3
    n_threads: int | None = None


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def measure_in_process(artifact: str, sentences: list[str], cfg: EmbedSpeedConfig) -> dict[str, Any]:
    from edgekit.harness.speed import _peak_rss_bytes, timed_loads

    s, loads, rss_start, rss_loaded = timed_loads(artifact, cfg.load_reps, cfg.n_threads)
    if not hasattr(s, "embed"):
        raise InputError(f"{artifact} is not an encoder", "use `edgekit profile` on it without the encoder harness")
    bs = cfg.batch_size
    batches = [sentences[i : i + bs] for i in range(0, len(sentences), bs)]
    rates, batch_ms, single_ms = [], [], []
    for rep in range(cfg.reps + 1):
        t_pass = time.perf_counter()
        lat = []
        for b in batches:
            t0 = time.perf_counter()
            s.embed(b, batch_size=bs)
            lat.append(1000 * (time.perf_counter() - t0))
        elapsed = time.perf_counter() - t_pass
        t0 = time.perf_counter()
        s.embed(sentences[rep % len(sentences) : rep % len(sentences) + 1])
        one = 1000 * (time.perf_counter() - t0)
        if rep == 0:
            continue  # warm-up
        rates.append(len(sentences) / elapsed)
        full = [x for x, b in zip(lat, batches) if len(b) == bs] or lat
        batch_ms.append(statistics.median(full))
        single_ms.append(one)
    n_threads = s.n_threads
    tokens = token_counts(s, sentences, batches, [sentences[r % len(sentences)] for r in range(1, cfg.reps + 1)])
    s.close()
    return {
        "kind": "encoder",
        "runtime": s.runtime,
        "n_threads": n_threads,
        "load_s": statistics.median(loads),
        "load_first_s": loads[0],
        "texts_s": statistics.median(rates),
        "batch_latency_ms": statistics.median(batch_ms),
        "single_latency_ms": statistics.median(single_ms),
        "peak_rss_bytes": _peak_rss_bytes(),
        "rss_after_load_bytes": rss_loaded,
        "rss_interpreter_bytes": rss_start,
        "spread": {"load_s": summary(loads), "texts_s": summary(rates), "batch_latency_ms": summary(batch_ms),
                   "single_latency_ms": summary(single_ms)},
        "settings": asdict(cfg) | {"texts": len(sentences)},
        "tokens": tokens,
    }


def token_counts(session, sentences: list[str], batches: list[list[str]], singles: list[str]) -> dict[str, Any]:
    """Tokens per text and the padded length of each measured batch (one ``embed`` call pads to its
    longest text): what the encoder predictor is calibrated and checked at."""
    if not hasattr(session, "tokenize"):
        return {}
    n = {t: len(session.tokenize(t)) for t in sentences}
    padded = [{"n": len(b), "padded": max(n[t] for t in b)} for b in batches]
    full = [b["padded"] for b in padded if b["n"] == len(batches[0])]
    return {"median": statistics.median(n.values()), "texts": len(sentences), "batches": padded,
            "batch_padded_median": statistics.median(full), "single_median": statistics.median(n[t] for t in singles)}


def measure(artifact: str, sentences: list[str], cfg: EmbedSpeedConfig, timeout: float = 1800) -> dict[str, Any]:
    """Run :func:`measure_in_process` in a child Python and return its figures."""
    from edgekit.harness.speed import run_in_child

    return run_in_child("edgekit.harness.embedding", artifact,
                        {"artifact": str(artifact), "sentences": sentences, "cfg": asdict(cfg)}, timeout)


# ---------------------------------------------------------------- edgekit profile, for encoders


def _reference(manifest: dict | None, reference: str | None):
    """(EncoderModel, source sha256) of the float reference, or (None, why not)."""
    from edgekit.encoder import load_encoder, resolve_encoder

    if reference is not None:
        src = resolve_encoder(reference)
        return (load_encoder(src), src.sha256), None
    if not manifest:
        return None, "no manifest and no --reference: quality needs the float encoder"
    recorded = manifest["source"]
    try:
        src = resolve_encoder("minilm" if recorded["kind"] == "package" else recorded["path"])
    except InputError as exc:
        return None, f"the source model is not available ({exc.message}); pass --reference"
    if src.sha256 != recorded["sha256"]:
        return None, f"the source at {src.path} changed since export (hash differs); pass --reference"
    return (load_encoder(src), src.sha256), None


def profile_encoder(file: Path, manifest: dict | None, eval_text: str | None = None, reference: str | None = None,
                    reps: int = 5, quality: bool = True, batch_size: int = 32,
                    progress: Callable[[str, int, int], None] = lambda d, a, b: None) -> dict[str, Any]:
    """What ``edgekit profile`` reports for an encoder artifact (same layout as for decoders where it applies)."""
    sentences, label = read_sentences(eval_text)
    result: dict[str, Any] = {"artifact": str(file), "format": "onnx", "kind": "encoder",
                              "size_bytes": file.stat().st_size}
    if manifest:
        result["bits_per_weight"] = manifest.get("bits_per_weight")
        result["recipe"] = manifest.get("recipe", {}).get("quant")
        result["artifact_bytes"] = manifest.get("size_bytes")
    progress("speed and memory (separate process)", 0, 1)
    result.update(measure(str(file), sentences, EmbedSpeedConfig(batch_size=batch_size, reps=reps)))
    progress("speed and memory (separate process)", 1, 1)
    result["quality"] = None
    if quality:
        ref, why = _reference(manifest, reference)
        if ref is None:
            result["quality_note"] = why
        else:
            import edgekit

            with edgekit.load(file) as session:
                result["quality"] = measure_quality(session, ref[0], ref[1], sentences, label, progress)
    return result


# ---------------------------------------------------------------- terminal tables


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f} MB"


def quality_text(q: dict | None) -> str:
    if not q:
        return "-"
    return f"mean {q['cosine_mean']:.5f}, min {q['cosine_min']:.5f} over {q['sentences']} sentences of {q['text']}"


def manifest_table(m: dict[str, Any], out: Path):
    from rich.table import Table

    t = Table(title=f"edgekit convert -> {out}", show_header=False)
    t.add_row("artifact", f"{Path(out) / m['artifact']['file']} ({m['artifact']['format']} encoder, {m['recipe']['quant']})")
    t.add_row("source", f"{m['model']['name']} ({m['model']['parameters'] / 1e6:.1f}M parameters, {m['model']['pooling']} pooling)")
    t.add_row("size", f"{_mb(m['size_bytes'])} at {m['bits_per_weight']:.2f} bits/weight")
    t.add_row("tensor types", ", ".join(f"{k}x{v}" for k, v in m["artifact"].get("tensor_types", {}).items()))
    t.add_row("embedding cosine vs float", quality_text(m.get("quality")))
    v = m["validation"]
    t.add_row("validation", "passed" if v["passed"] else (f"not run: {v.get('why', '')}" if v["passed"] is None else "FAILED"))
    t.add_row("time", f"{m['timings_s']['total_s']:.1f} s")
    return t


def profile_table(r: dict[str, Any]):
    from rich.table import Table

    if r.get("speed_note"):  # the runtime cannot run here: nothing measured, the shared layout says so
        from edgekit.report import profile_table as unmeasured

        return unmeasured(r)

    def spread(key: str, fmt: str) -> str:
        s = r.get("spread", {}).get(key)
        v = format(r[key], fmt)
        return v if not s else f"{v} ({format(s['min'], fmt)}-{format(s['max'], fmt)})"

    st = r["settings"]
    t = Table(title=f"edgekit profile {r['artifact']}", show_header=False)
    t.add_row("format / runtime", f"{r['format']} encoder / {r['runtime']} ({r['n_threads']} threads)")
    bpw = r.get("bits_per_weight")
    t.add_row("size", _mb(r["size_bytes"]) + (f" at {bpw:.2f} bits/weight" if bpw else ""))
    t.add_row("load", spread("load_s", ".3f") + " s")
    t.add_row("throughput", spread("texts_s", ".1f") + f" texts/s ({st['texts']} texts, batches of {st['batch_size']})")
    t.add_row("latency per batch", spread("batch_latency_ms", ".1f") + f" ms ({st['batch_size']} texts)")
    t.add_row("latency, one text", spread("single_latency_ms", ".1f") + " ms")
    t.add_row("peak resident memory", _mb(r["peak_rss_bytes"]))
    t.add_row("embedding cosine vs float", quality_text(r.get("quality")))
    if r.get("quality_note"):
        t.add_row("quality", r["quality_note"])
    return t


def main() -> None:
    from edgekit.harness.speed import child_main

    child_main(lambda a: measure_in_process(a["artifact"], a["sentences"], EmbedSpeedConfig(**a["cfg"])))


if __name__ == "__main__":
    main()
