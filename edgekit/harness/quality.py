"""Quality against the float reference on the same tokens: perplexity, KL divergence, top-1 agreement.

Reference statistics are computed once per (reference model, token windows) and cached compactly:
for each scored position the reference's top-K token ids and log-probabilities plus the negative
log-likelihood of the true next token (a few MB instead of gigabytes of logits). KL divergence is
computed over those K tokens plus one bucket for the rest of the vocabulary. Merging tokens into a
bucket can only lower a KL divergence (log-sum inequality), so the figure is a tight lower bound; the
mean reference probability left in the bucket is reported as ``ref_tail_mass``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from edgekit.cache import cache_dir
from edgekit.errors import InputError

TOPK = 256


@dataclass(frozen=True)
class EvalConfig:
    ctx: int = 512  # tokens per scored window (windows do not overlap)
    max_tokens: int = 4096  # cap on tokens taken from the text
    topk: int = TOPK


def default_text_path(kind: str = "eval") -> Path:
    return Path(str(files("edgekit") / "data" / f"{'eval' if kind == 'eval' else 'calibration'}.txt"))


def read_text(path: str | Path | None, kind: str = "eval") -> tuple[str, str]:
    """(text, label) for a user file or the shipped default."""
    p = Path(path) if path else default_text_path(kind)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read text file {p} ({exc.__class__.__name__})", "pass a UTF-8 text file") from None
    if len(text.strip()) < 200:
        raise InputError(f"text file {p} is too short to measure quality", "pass at least a few paragraphs")
    return text, (p.name if path else f"edgekit:{p.name}")


def windows(ids: list[int], cfg: EvalConfig) -> list[list[int]]:
    ids = ids[: cfg.max_tokens]
    out = [ids[i : i + cfg.ctx] for i in range(0, len(ids), cfg.ctx)]
    return [w for w in out if len(w) >= 32]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass
class RefStats:
    topk_ids: np.ndarray  # [N, K] int32
    topk_logp: np.ndarray  # [N, K] float32
    nll: np.ndarray  # [N] float32, reference NLL of the true next token

    @classmethod
    def from_logits(cls, logits_per_window: Iterable[np.ndarray], wins: list[list[int]], k: int) -> "RefStats":
        ids, logps, nlls = [], [], []
        for logits, w in zip(logits_per_window, wins):
            lp = _log_softmax(logits[:-1])
            target = np.asarray(w[1:])
            nlls.append(-lp[np.arange(len(target)), target])
            top = np.argpartition(-lp, k, axis=-1)[:, :k]
            top_lp = np.take_along_axis(lp, top, axis=-1)
            order = np.argsort(-top_lp, axis=-1)
            ids.append(np.take_along_axis(top, order, axis=-1).astype(np.int32))
            logps.append(np.take_along_axis(top_lp, order, axis=-1).astype(np.float32))
        return cls(np.concatenate(ids), np.concatenate(logps), np.concatenate(nlls).astype(np.float32))


def stats_key(reference_id: str, wins: list[list[int]], k: int) -> str:
    h = hashlib.sha256(json.dumps([reference_id, k, wins]).encode())
    return h.hexdigest()[:24]


def reference_stats(reference_id: str, wins: list[list[int]], logits_fn: Callable[[list[int]], np.ndarray],
                    k: int = TOPK, progress: Callable[[int, int], None] | None = None) -> RefStats:
    """Cached reference statistics; ``logits_fn`` (the torch reference) runs only on a cache miss."""
    path = cache_dir("refstats") / f"{stats_key(reference_id, wins, k)}.npz"
    if path.exists():
        try:
            z = np.load(path)  # npz: arrays only, no pickles
            return RefStats(z["topk_ids"], z["topk_logp"], z["nll"])
        except Exception:  # noqa: BLE001 - a damaged cache entry is computed again
            path.unlink(missing_ok=True)

    def gen():
        for i, w in enumerate(wins):
            yield logits_fn(w)
            if progress:
                progress(i + 1, len(wins))

    stats = RefStats.from_logits(gen(), wins, k)
    import io

    from edgekit.atomic import write_atomic

    buf = io.BytesIO()
    np.savez_compressed(buf, topk_ids=stats.topk_ids, topk_logp=stats.topk_logp, nll=stats.nll)
    write_atomic(path, buf.getvalue())
    return stats


def compare(ref: RefStats, logits_per_window: Iterable[np.ndarray], wins: list[list[int]]) -> dict:
    """Quality of a model's logits against reference statistics on the same windows."""
    kls, nlls, agree = [], [], []
    row = 0
    for logits, w in zip(logits_per_window, wins):
        n = len(w) - 1
        lq = _log_softmax(logits[:n])
        target = np.asarray(w[1:])
        nlls.append(-lq[np.arange(n), target])
        ids = ref.topk_ids[row : row + n]
        lp = ref.topk_logp[row : row + n].astype(np.float64)
        lq_top = np.take_along_axis(lq, ids, axis=-1)
        p_top = np.exp(lp)
        p_tail = np.clip(1.0 - p_top.sum(-1), 0.0, 1.0)
        q_tail = np.clip(1.0 - np.exp(lq_top).sum(-1), 1e-12, 1.0)
        kl = (p_top * (lp - lq_top)).sum(-1)
        tail = np.where(p_tail > 1e-12, p_tail * (np.log(np.maximum(p_tail, 1e-300)) - np.log(q_tail)), 0.0)
        kls.append(np.maximum(kl + tail, 0.0))
        agree.append(lq.argmax(-1) == ids[:, 0])
        row += n
    if row != len(ref.nll):
        raise ValueError(f"scored {row} positions but the reference has {len(ref.nll)}")
    kl = np.concatenate(kls)
    nll = np.concatenate(nlls)
    return {
        "tokens": int(row),
        "ppl": float(np.exp(nll.mean())),
        "ref_ppl": float(np.exp(ref.nll.astype(np.float64).mean())),
        "kld_mean": float(kl.mean()),
        "kld_p99": float(np.percentile(kl, 99)),
        "top1_agreement": float(np.concatenate(agree).mean()),
        "ref_tail_mass": float(np.clip(1.0 - np.exp(ref.topk_logp.astype(np.float64)).sum(-1), 0, 1).mean()),
    }


def tokenizer_agreement(ref_ids: list[int], ids: list[int]) -> str | None:
    """None when two tokenizations of the same text agree, else one line saying where they part."""
    if list(ref_ids) == list(ids):
        return None
    first = next((i for i, (a, b) in enumerate(zip(ref_ids, ids)) if a != b), min(len(ref_ids), len(ids)))
    return (f"the artifact's tokenizer splits the evaluation text differently from the reference's "
            f"({len(ids)} vs {len(ref_ids)} tokens, first difference at token {first}); "
            f"both were scored on the reference's tokens")


def score_session(session: Any, ref: Any, wins: list[list[int]], cfg: "EvalConfig", label: str,
                  progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Statistics of ``session``'s logits on ``wins`` against the reference statistics ``ref``."""
    def model_logits():
        for i, w in enumerate(wins):
            yield session.logits(w)
            if progress:
                progress("artifact logits", i + 1, len(wins))

    result = compare(ref, model_logits(), wins)
    result.update({"text": label, "window": cfg.ctx, "topk": cfg.topk})
    return result
