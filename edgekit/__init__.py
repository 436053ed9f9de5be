"""edgekit: compress a model, export it for the edge, and measure how it runs there.

``edgekit.load(path)`` opens an exported artifact (a directory with ``manifest.json``, or the model
file itself) with the runtime that fits its format. Importing edgekit or calling ``load`` never
imports torch.
"""

from __future__ import annotations

from typing import Any

from edgekit.errors import EdgekitError

__version__ = "0.1.0"
__all__ = ["load", "convert", "ConvertRequest", "EdgekitError", "__version__"]


def load(path: Any, **options: Any):
    """Open an artifact and return a session (``generate``, ``logits``, ``close``; a context manager).

    ``check_memory`` (default True) and ``max_memory`` (bytes or "2GiB"; default: what is available) ask
    the memory-fit guard first: a model that would not fit raises :class:`edgekit.errors.MemoryFitError`
    before anything is allocated. See :func:`edgekit.session.load`."""
    from edgekit.session import load as _load

    return _load(path, **options)


def convert(request: Any) -> dict[str, Any]:
    """``edgekit convert`` as a call: ``edgekit.convert(edgekit.ConvertRequest("minilm", "onnx", "int8", "out"))``.

    Returns the manifest written beside the artifact (needs the ``[convert]`` extra)."""
    from edgekit.pipeline import convert as _convert

    return _convert(request)


def __getattr__(name: str) -> Any:
    if name == "ConvertRequest":  # resolved lazily: the pipeline module is not needed to load artifacts
        from edgekit.pipeline import ConvertRequest

        return ConvertRequest
    raise AttributeError(name)
