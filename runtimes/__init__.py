"""Runtimes: backends that run an exported artifact behind one session API.

Imported as ``edgekit.runtimes`` (the folder sits at the repository's top level). A runtime module
must not import torch: apps embed these sessions. Backends import their engine only when a session
is opened, so listing runtimes stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Protocol, Sequence

if TYPE_CHECKING:  # importing the package must stay free of heavy dependencies
    import numpy as np


class Session(Protocol):
    """What ``edgekit.load`` returns, whatever the backend."""

    runtime: str
    path: str

    def tokenize(self, text: str, special: bool = False) -> list[int]: ...
    def detokenize(self, ids: Sequence[int]) -> str: ...
    def stream_tokens(self, prompt_ids: Sequence[int], max_tokens: int, temperature: float = 0.0) -> Iterator[int]: ...
    def generate(self, prompt: str, max_tokens: int = 128, stream: bool = False, **kw: Any) -> Any: ...
    def logits(self, token_ids: Sequence[int]) -> np.ndarray: ...
    def close(self) -> None: ...
