"""What an application does with an artifact, run inside a fuzz case's child process."""

from __future__ import annotations


def load_generate(path: str) -> None:
    import edgekit

    with edgekit.load(path, n_ctx=256) as s:
        s.generate("The capital of France is", max_tokens=4, chat=False)


def load_chat(path: str) -> None:
    import edgekit

    with edgekit.load(path, n_ctx=256) as s:
        s.generate("Hello!", max_tokens=2, chat=True)
