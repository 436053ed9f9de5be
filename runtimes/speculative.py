"""Speculative decoding: a cheap drafter proposes k tokens, the target checks them in one batched step.

Greedy output is the target's own greedy output (each emitted token is the target's argmax after the
tokens before it); sampled output keeps the target's sampling distribution (top-k 40, then top-p, at the
temperature) by standard rejection sampling (Leviathan et al. 2023, Chen et al. 2023): a draft token ``x``
drawn from the drafter's distribution ``q`` is kept with probability ``min(1, p(x) / q(x))``, and the first
refused one is replaced by a draw from ``max(p - q, 0)`` normalised. A drafter that proposes
deterministically (prompt lookup) has ``q`` = a point mass.

Drafters:

- :class:`ModelDrafter`: any edgekit decoder session whose tokenizer is the target's (a pruned, layer-dropped
  or lower-bit artifact of the same model), run one token at a time with its own KV cache;
- :class:`PromptLookupDrafter`: n-gram lookup in the prompt and the text generated so far (input-grounded
  tasks such as summarising or rewriting a passage repeat spans of their input).

A target session provides three primitives (both edgekit runtimes do): ``_spec_reset()``,
``_spec_feed(ids) -> logits [len(ids), vocab]`` (run ``ids`` after the cached positions) and
``_spec_truncate(n)`` (drop cached positions from ``n`` on: llama.cpp removes them from its KV cache, ONNX
Runtime's in-place cache just moves its length back).

No torch: apps embed this.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol, Sequence

import numpy as np

from edgekit.errors import InputError

TOP_K = 40  # as both runtimes' plain sampling


class SpecTarget(Protocol):
    n_vocab: int

    def _spec_reset(self) -> None: ...
    def _spec_feed(self, ids: Sequence[int], all_logits: bool = True) -> np.ndarray: ...
    def _spec_truncate(self, n_past: int) -> None: ...


def truncated_distribution(logits: np.ndarray, temperature: float, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, probabilities) both runtimes sample from: the top-k 40 logits at ``temperature``, then the
    nucleus ``top_p`` (the smallest head of the ranking whose mass reaches it)."""
    k = min(TOP_K, logits.shape[-1])
    top = np.argpartition(logits, -k)[-k:]
    top = top[np.argsort(-logits[top], kind="stable")]
    z = logits[top].astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)
        top, p = top[:keep], p[:keep] / p[:keep].sum()
    return top, p


def probabilities(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """:func:`truncated_distribution` over the whole vocabulary (zeros outside the kept tokens)."""
    top, p = truncated_distribution(logits, temperature, top_p)
    out = np.zeros(logits.shape[-1], dtype=np.float64)
    out[top] = p
    return out


@dataclass
class SpecStats:
    """What one generation's speculation did: acceptance rate = accepted / drafted."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    k_history: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted, "emitted": self.emitted,
                "acceptance_rate": self.accepted / self.drafted if self.drafted else None,
                "tokens_per_target_step": self.emitted / self.rounds if self.rounds else None,
                "mean_k": float(np.mean(self.k_history)) if self.k_history else None}


class AdaptiveK:
    """Draft length: grows after a round whose drafts were all accepted, shrinks after an early refusal
    (the policy of llama.cpp's speculative example and vLLM's: cheap to run, and it follows the text)."""

    def __init__(self, k: int = 4, k_min: int = 1, k_max: int = 12):
        self.k, self.k_min, self.k_max = k, k_min, k_max

    def update(self, drafted: int, accepted: int) -> None:
        if drafted and accepted == drafted:
            self.k = min(self.k_max, self.k + 2)
        elif accepted < drafted // 2:
            self.k = max(self.k_min, self.k - 1)


class Drafter(Protocol):
    name: str

    def start(self, prompt_ids: Sequence[int]) -> None: ...
    def propose(self, context: Sequence[int], k: int, temperature: float, top_p: float,
                rng: np.random.Generator) -> tuple[list[int], list[np.ndarray] | None]: ...
    def close(self) -> None: ...


class PromptLookupDrafter:
    """Proposes the continuation of the longest recent n-gram (``max_ngram`` down to ``min_ngram`` tokens)
    that occurred earlier in the context: the text after its latest earlier occurrence."""

    name = "prompt-lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def start(self, prompt_ids: Sequence[int]) -> None:
        pass

    def propose(self, context, k, temperature, top_p, rng):
        ctx = np.asarray(context, dtype=np.int64)
        n_ctx = len(ctx)
        for n in range(min(self.max_ngram, n_ctx - 1), self.min_ngram - 1, -1):
            tail = ctx[n_ctx - n:]
            # windows ending before the tail itself, latest first
            win = np.lib.stride_tricks.sliding_window_view(ctx[: n_ctx - 1], n)
            hits = np.flatnonzero((win == tail).all(axis=1))
            for start in hits[::-1]:
                follow = ctx[start + n : start + n + k]
                if len(follow):
                    return [int(t) for t in follow], None
        return [], None

    def close(self) -> None:
        pass


class ModelDrafter:
    """A smaller decoder session of the same tokenizer; its KV cache follows the committed tokens (the common
    prefix is kept, the rest fed again), so refused drafts cost only their own positions."""

    def __init__(self, session: Any, owned: bool = True):
        self.session, self.owned = session, owned
        self.name = getattr(session, "path", "draft")
        self._cached: list[int] = []  # tokens whose positions are in the draft's cache
        self._last: np.ndarray | None = None  # the draft's logits after the cached tokens

    def start(self, prompt_ids: Sequence[int]) -> None:
        self.session._spec_reset()
        self._cached, self._last = [], None

    def _sync(self, context: Sequence[int]) -> np.ndarray:
        """Make the cache hold ``context``; the logits after it."""
        common = 0
        for a, b in zip(self._cached, context):
            if a != b:
                break
            common += 1
        if common == len(context) and common == len(self._cached) and self._last is not None:
            return self._last
        if common == len(context):  # the last position must be run again to get its logits
            common -= 1
        self.session._spec_truncate(common)
        self._cached = list(context[:common])
        rows = self.session._spec_feed(list(context[common:]))
        self._cached = list(context)
        self._last = rows[-1]
        return self._last

    def propose(self, context, k, temperature, top_p, rng):
        ctx = list(context)
        room = self.session.n_ctx - len(ctx) - 1
        k = min(k, room)
        if k <= 0:
            return [], None
        last = self._sync(ctx)
        out: list[int] = []
        dists: list[np.ndarray] = []
        for i in range(k):
            if temperature > 0:
                q = probabilities(last, temperature, top_p)
                tok = int(rng.choice(len(q), p=q))
                dists.append(q)
            else:
                tok = int(np.argmax(last))
            out.append(tok)
            if i + 1 < k:
                last = self.session._spec_feed([tok])[-1]
                self._cached.append(tok)
                self._last = last
        return out, dists if temperature > 0 else None

    def close(self) -> None:
        if self.owned:
            self.session.close()


def speculative_stream(target: SpecTarget, drafter: Drafter, prompt_ids: Sequence[int], max_tokens: int,
                       temperature: float, top_p: float, rng: np.random.Generator, eos_ids: set[int],
                       ignore_eos: bool, n_ctx: int, stats: SpecStats, k: AdaptiveK | None = None) -> Iterator[int]:
    """Token ids after ``prompt_ids``, ``max_tokens`` at most; see the module docstring."""
    k = k or AdaptiveK()
    ids = list(prompt_ids)
    if not ids:
        raise InputError("the prompt is empty", "pass at least one token")
    target._spec_reset()
    drafter.start(ids)
    # the target's logits after the whole prompt, computed as plain decoding computes them (last row only)
    last = target._spec_feed(ids, all_logits=False)[-1]
    context = list(ids)  # committed tokens; the target's cache holds all but ``pending``

    def pick(logits: np.ndarray) -> int:
        if temperature <= 0:
            return int(np.argmax(logits))
        p = probabilities(logits, temperature, top_p)
        return int(rng.choice(len(p), p=p))

    pending = pick(last)
    n_out = 0
    while True:
        if pending in eos_ids and not ignore_eos:
            return
        yield pending
        n_out += 1
        stats.emitted += 1
        context.append(pending)
        if n_out >= max_tokens:
            return
        want = min(k.k, max_tokens - n_out - 1, n_ctx - len(context) - 1)
        drafts, q = drafter.propose(context, want, temperature, top_p, rng) if want > 0 else ([], None)
        base = len(context) - 1  # cached positions before ``pending``
        rows = target._spec_feed([pending] + drafts)  # one batched step: row i follows pending + drafts[:i]
        stats.rounds += 1
        stats.drafted += len(drafts)
        stats.k_history.append(len(drafts))
        accepted: list[int] = []
        nxt = None
        for i, d in enumerate(drafts):
            if temperature <= 0:
                if int(np.argmax(rows[i])) != d:
                    break
                accepted.append(d)
                continue
            p = probabilities(rows[i], temperature, top_p)
            qd = q[i][d] if q is not None else 1.0
            if rng.random() < min(1.0, p[d] / qd):
                accepted.append(d)
                continue
            residual = np.maximum(p - (q[i] if q is not None else np.eye(1, len(p), d)[0]), 0.0)
            total = residual.sum()
            nxt = int(rng.choice(len(p), p=residual / total)) if total > 0 else pick(rows[i])
            break
        stats.accepted += len(accepted)
        k.update(len(drafts), len(accepted))
        # keep pending + accepted drafts in the target's cache; the next pending token follows them
        target._spec_truncate(base + 1 + len(accepted))
        if nxt is None:
            nxt = pick(rows[len(accepted)])
        for d in accepted:
            if d in eos_ids and not ignore_eos:
                return
            yield d
            n_out += 1
            stats.emitted += 1
            context.append(d)
            if n_out >= max_tokens:
                return
        pending = nxt


def open_drafter(draft: Any, target: Any, load_options: dict[str, Any]) -> Drafter:
    """``draft`` as :func:`edgekit.load` takes it: "prompt-lookup", an artifact path, or an open session."""
    if isinstance(draft, str) and draft in ("prompt-lookup", "ngram"):
        return PromptLookupDrafter()
    if hasattr(draft, "_spec_feed"):
        session, owned = draft, False
    else:
        import edgekit

        session, owned = edgekit.load(draft, **load_options), True
    if not hasattr(session, "_spec_feed"):
        raise InputError(f"{draft} is not a decoder edgekit can draft with", "pass a GGUF or ONNX decoder artifact")
    same_tokenizer_or_raise(target, session, draft)
    return ModelDrafter(session, owned)


def same_tokenizer_or_raise(target: Any, session: Any, what: Any) -> None:
    """A draft must speak the target's token ids: same vocabulary size and the same bytes for every id."""
    if getattr(session, "n_vocab", None) != getattr(target, "n_vocab", None):
        session.close()
        raise InputError(f"the draft {what} has {session.n_vocab} tokens, the model {target.n_vocab}",
                         "draft with an artifact of the same model (same tokenizer)")
    differ = next((i for i in range(target.n_vocab) if target._token_bytes(i) != session._token_bytes(i)), None)
    if differ is not None:
        session.close()
        raise InputError(f"the draft {what} has another tokenizer (token {differ} differs)",
                         "draft with an artifact of the same model (same tokenizer)")
