"""Quality of a loaded session against a float reference model, on the same tokens."""

from __future__ import annotations

from typing import Any, Callable

from edgekit.harness.quality import EvalConfig, reference_stats, score_session, windows
from edgekit.model import Model


def measure_quality(session: Any, reference: Model, reference_id: str, text: str, label: str,
                    cfg: EvalConfig = EvalConfig(), progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Tokenize ``text`` with the artifact's own tokenizer, score it with the artifact and the reference."""
    ids = session.tokenize(text)
    wins = windows(ids, cfg)
    holder: dict[str, Any] = {}

    def ref_logits(w: list[int]):
        if "ref" not in holder:  # the torch reference is built only when the cache misses
            from edgekit.reference import TorchReference

            holder["ref"] = TorchReference(reference)
        return holder["ref"].logits(w)

    tick = (lambda d, t: progress("reference logits", d, t)) if progress else None
    ref = reference_stats(reference_id, wins, ref_logits, cfg.topk, tick)
    return score_session(session, ref, wins, cfg, label, progress)
