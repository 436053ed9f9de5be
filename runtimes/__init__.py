"""Runtimes: backends that run an exported artifact behind one session API.

Imported as ``edgekit.runtimes`` (the folder sits at the repository's top level). A runtime module
must not import torch: apps embed these sessions. Backends import their engine only when a session
is opened, so listing runtimes stays cheap.
"""

from __future__ import annotations

import codecs
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence

if TYPE_CHECKING:  # importing the package must stay free of heavy dependencies
    import numpy as np


def render_template(path: str, render: Callable[[], str]) -> str:
    """Run ``render`` (a chat template, always in a sandboxed Jinja environment): the template is data from the
    artifact, so anything it raises (a syntax error, an undefined name, a sandbox refusal, a range or recursion
    too deep) is the artifact's problem: one InputError, not a traceback from inside Jinja."""
    try:
        return render()
    except Exception as exc:
        from edgekit.errors import InputError

        why = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise InputError(f"the chat template of {path} does not render ({type(exc).__name__}{': ' + why if why else ''})",
                         "generate without it (chat=False, `edgekit run --raw`) or fix the template") from None


class Session(Protocol):
    """What ``edgekit.load`` returns, whatever the backend."""

    runtime: str
    path: str

    def tokenize(self, text: str, special: bool = False) -> list[int]: ...
    def detokenize(self, ids: Sequence[int]) -> str: ...
    def stream_tokens(self, prompt_ids: Sequence[int], max_tokens: int, temperature: float = 0.0,
                      ignore_eos: bool = False, top_p: float = 1.0, seed: int | None = None) -> Iterator[int]: ...
    def generate(self, prompt: str, max_tokens: int = 128, stream: bool = False, **kw: Any) -> Any: ...
    def logits(self, token_ids: Sequence[int]) -> np.ndarray: ...
    def close(self) -> None: ...


class SessionLifetime:
    """Context-manager lifetime shared by every session: ``with edgekit.load(p) as s:`` closes it."""

    def close(self) -> None:  # overridden by each backend
        pass

    def sibling(self):
        """A second session over the same weights, for serving requests in parallel (None: this runtime
        cannot share them, open the artifact again)."""
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class TextSession(SessionLifetime):
    """What every backend's session shares: text generation on top of ``stream_tokens``, and lifetime.

    A backend implements ``tokenize``, ``chat_prompt``, ``stream_tokens``, ``_token_bytes`` and ``close``.
    """

    def generate(self, prompt: str, max_tokens: int = 128, stream: bool = False, temperature: float = 0.0,
                 chat: bool = False) -> Any:
        """Continue ``prompt`` (or answer it through the chat template when ``chat``); text or a stream of text."""
        text = self.chat_prompt([{"role": "user", "content": prompt}]) if chat else prompt
        ids = self.tokenize(text, special=chat)
        pieces = self.decode_stream(self.stream_tokens(ids, max_tokens, temperature))
        return pieces if stream else "".join(pieces)

    # ------------------------------------------------------------------ speculative decoding

    _drafter = None
    last_speculation: dict[str, Any] | None = None

    # Batch-invariant decoding (``batch_invariant=True`` at open). Both runtimes' int4 matmul kernels give a
    # row other numbers when it is alone in a step than in a batch (llama.cpp: one row vs two or more; ONNX
    # Runtime's MatMulNBits: odd vs even row counts; measured on the embedded model, logits apart by up to
    # 1-2), so a speculative step that verifies k drafts at once can pick another greedy token than one
    # token at a time would. With it on, every step after the prompt runs an even number of rows and returns
    # all their logits, so plain and speculative decoding see the same numbers for every position. The rows
    # added are the tokens before the step run again (their cached positions recomputed): one when the count
    # is odd; in ONNX Runtime (``_rerun_always``) every step starts with one or two, because measured there a
    # step that starts with a new token still differs from one that starts with a re-run. A one-token step
    # costs about a second row.
    batch_invariant = False
    _rerun_always = False
    _history: list[int]

    def _even_rows(self, ids: Sequence[int]) -> tuple[list[int], int]:
        """``ids`` to run now, and how many leading rows are a re-run of cached positions (0, 1 or 2)."""
        ids = list(ids)
        if not self.batch_invariant or self._n_past == 0:
            return ids, 0
        rerun = (1 if len(ids) % 2 else 2) if self._rerun_always else len(ids) % 2
        rerun = min(rerun, self._n_past)
        if not rerun:
            return ids, 0
        prev = self._history[self._n_past - rerun : self._n_past]
        self._spec_truncate(self._n_past - rerun)
        return prev + ids, rerun

    def use_draft(self, draft: Any, **load_options: Any) -> None:
        """Decode speculatively from now on: ``draft`` is "prompt-lookup" (n-grams of the prompt and the output),
        an artifact of the same tokenizer (opened with ``load_options``), an open session, or None (stop).
        Greedy output stays exactly the session's own; sampling keeps its distribution."""
        from edgekit.errors import InputError

        self.close_draft()
        if draft is None:
            return
        if not hasattr(self, "_spec_feed"):
            raise InputError(f"{self.runtime} sessions cannot verify drafts", "use a GGUF or ONNX artifact for speculative decoding")
        from edgekit.runtimes.speculative import open_drafter

        self._drafter = open_drafter(draft, self, load_options)

    def close_draft(self) -> None:
        if self._drafter is not None:
            self._drafter.close()
            self._drafter = None

    @property
    def draft(self) -> str | None:
        return None if self._drafter is None else self._drafter.name

    def _speculate(self, ids: list[int], max_tokens: int, temperature: float, top_p: float, seed: int | None,
                   eos_ids: set[int], ignore_eos: bool) -> Iterator[int]:
        import numpy as np

        from edgekit.runtimes.speculative import SpecStats, speculative_stream

        stats = SpecStats()
        self.last_speculation = None
        rng = np.random.default_rng(seed)
        try:
            yield from speculative_stream(self, self._drafter, ids, max_tokens, temperature, top_p, rng, eos_ids,
                                          ignore_eos, self.n_ctx, stats)
        finally:
            self.last_speculation = stats.to_dict() | {"draft": self._drafter.name if self._drafter else None}

    def decode_stream(self, tokens: Iterator[int]) -> Iterator[str]:
        """Text pieces of a stream of token ids (what streaming clients print)."""
        # a token can end in the middle of a UTF-8 character: decode incrementally
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for tok in tokens:
            piece = dec.decode(self._token_bytes(tok))
            if piece:
                yield piece
        tail = dec.decode(b"", final=True)
        if tail:
            yield tail


def default_threads() -> int:
    """Threads a session uses unless told: ``EDGEKIT_THREADS`` (a sweep task's share of the cores), else every core
    this process may run on. Runtimes spin-wait on their threads, so more threads than free cores is far slower."""
    import os

    env = os.environ.get("EDGEKIT_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
