"""Architectures: one module per model family, each saying once how it is read, laid out and exported.

Looked up by name in :data:`ARCHITECTURES` (entry-point group ``edgekit.architectures``; the built-ins
are declared in pyproject.toml like any third-party plug-in). A decoder's :class:`DecoderSpec` names
its architecture (``spec.arch``); :func:`of` returns the module's :class:`Architecture`.
"""

from __future__ import annotations

from edgekit.architectures.base import Architecture
from edgekit.architectures.spec import DecoderSpec
from edgekit.errors import UnknownPluginError, UnsupportedArchitectureError
from edgekit.registry import Registry

ARCHITECTURES = Registry("architecture", "edgekit.architectures")


def get(name: str) -> Architecture:
    try:
        return ARCHITECTURES.get(name)
    except UnknownPluginError:
        raise UnsupportedArchitectureError(f"architecture '{name}' is not supported",
                                           f"supported: {', '.join(names())}") from None


def of(spec: DecoderSpec) -> Architecture:
    return get(spec.arch)


def names(kind: str | None = None) -> list[str]:
    return [n for n in ARCHITECTURES.names() if kind is None or ARCHITECTURES.get(n).kind == kind]


def for_hf_model_type(model_type: str | None, where: str = "") -> Architecture:
    """The architecture whose Hugging Face ``model_type`` this is (one clear error otherwise)."""
    for n in ARCHITECTURES.names():
        arch = ARCHITECTURES.get(n)
        if model_type in arch.hf_model_types:
            return arch
    hint = "for Gemma 3 use the text model (model_type gemma3_text)" if model_type == "gemma3" else ""
    types = sorted(t for n in ARCHITECTURES.names() for t in ARCHITECTURES.get(n).hf_model_types)
    raise UnsupportedArchitectureError(f"{where + ': ' if where else ''}architecture '{model_type}' is not supported",
                                       hint or f"supported model_type values: {', '.join(types)}")


def for_gguf_arch(gguf_arch: str | None, where: str = "") -> Architecture:
    """The architecture that reads a GGUF of ``general.architecture`` (the first registered writer wins:
    a ``llama`` GGUF reads as Llama, also when a Mistral wrote it)."""
    readers = [ARCHITECTURES.get(n) for n in ARCHITECTURES.names()]
    for arch in sorted(readers, key=lambda a: a.name != a.gguf_arch):
        if arch.kind == "decoder" and arch.gguf_arch == gguf_arch:
            return arch
    known = sorted({a.gguf_arch for a in readers if a.gguf_arch})
    raise UnsupportedArchitectureError(f"{where + ': ' if where else ''}GGUF architecture '{gguf_arch}' is not supported for conversion",
                                       f"convertible: {', '.join(known)}; `edgekit profile` still measures it")
