"""What the pipeline may ask of an exporter and of a runtime: declared, not probed.

Every exporter and runtime plug-in (built-in or third-party, registered through the entry-point groups
``edgekit.exporters`` / ``edgekit.runtimes``) subclasses :class:`Exporter` or :class:`Runtime`. The
pipeline reads what they declare (which compressed models a format can hold, whether a runtime runs
on this host, what an artifact costs per token) instead of guessing with ``getattr``.

Passes have their own contract in :mod:`edgekit.passes` (:class:`edgekit.passes.Pass`).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # importing this module must stay free of heavy dependencies (apps embed runtimes)
    from edgekit.targets.facts import ArtifactFacts

KINDS = ("decoder", "encoder")


@dataclass(frozen=True)
class Capabilities:
    """What a format can hold; checked before any pass runs, so a bad recipe fails in seconds."""

    kinds: frozenset[str] = frozenset({"decoder"})  # model kinds ("decoder", "encoder")
    bits: frozenset[int] = frozenset({4, 8})  # integer widths of block-quantized weights
    lowrank: bool = False  # two factors in place of one matrix
    per_layer_widths: bool = False  # layers of different widths after structured pruning
    codebooks: frozenset[str] = frozenset()  # non-uniform block grids it holds (e.g. "iq4_nl")
    # integer widths it stores in blocks at their own size (bits + 16 / block per weight): what mixed
    # precision (--target-bpw) may choose among, besides fp16
    mixed_bits: frozenset[int] = frozenset({4, 8})
    # block sizes its 2- and 4-bit block containers hold (one fp16 scale per block): what an int4 recipe's
    # ``block`` and mixed precision may use
    blocks: frozenset[int] = frozenset({32})

    def refusal(self, kind: str, structural: set[str], fmt: str) -> str | None:
        """Why a recipe with these structural passes cannot land in this format, or None."""
        if kind not in self.kinds:
            return f"the {fmt} exporter holds {' and '.join(sorted(self.kinds))} models, not {kind}s"
        if "lowrank" in structural and not self.lowrank:
            return f"the {fmt} format cannot hold low-rank (factorized) layers"
        return None


class Exporter(ABC):
    """Packs the numbers the passes decided into one format; never decides numbers itself."""

    name: ClassVar[str] = ""  # the --format name
    filename: ClassVar[str] = ""  # the model file (or package directory) inside the artifact directory
    runtime: ClassVar[str] = ""  # the runtime plug-in that opens what this writes
    capabilities: ClassVar[Capabilities] = Capabilities()

    def supports(self, model: Any) -> str | None:
        """None when this exporter can pack ``model`` as the passes left it, otherwise the reason."""
        from edgekit.model import BlockCodebook, BlockQuant

        kind = getattr(model, "kind", "decoder")
        if kind not in self.capabilities.kinds:
            return f"the {self.name} exporter does not hold {kind}s"
        bits = self.capabilities.bits
        for name in model.tensors:
            enc = model.encoding(name)
            if isinstance(enc, BlockQuant) and enc.bits not in bits:
                return f"{name}: {enc.bits}-bit weights (the {self.name} format holds {', '.join(map(str, sorted(bits)))}-bit ones)"
            if isinstance(enc, BlockCodebook) and enc.codebook not in self.capabilities.codebooks:
                return f"{name}: the {self.name} format holds only uniform integer grids, not the {enc.codebook} codebook"
        return None

    @abstractmethod
    def export(self, model: Any, out_dir: Path) -> dict[str, Any]:
        """Write the artifact's files into ``out_dir``; return what the manifest's ``artifact`` records."""


class Runtime(ABC):  # noqa: B024 (every method has a default; the class is the contract's name)
    """Opens artifacts of one format behind the session API (:class:`edgekit.runtimes.Session`).

    A runtime module must not import torch or any exporter: apps embed runtimes.
    """

    name: ClassVar[str] = ""
    format: ClassVar[str] = ""  # the format it runs ("gguf", "onnx", "coreml")
    suffixes: ClassVar[tuple[str, ...]] = ()
    # resolution order when several runtimes open the same suffix (a specific one before a generic one)
    priority: ClassVar[int] = 0

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None when this runtime can run on this host; otherwise why not (Core ML off macOS)."""
        return None

    @classmethod
    def claims(cls, path: Path) -> bool:
        """True when this runtime opens ``path`` (a model file, or a model directory such as .mlpackage)."""
        return path.suffix.lower() in cls.suffixes

    # the session class per artifact kind: a class, or "module:Class" imported when first opened
    sessions: ClassVar[dict[str, Any]] = {}

    @classmethod
    def kind(cls, path: Path) -> str:
        """"decoder" or "encoder": what the artifact at ``path`` is (read from its own files)."""
        return "decoder"

    @classmethod
    def open(cls, path: str | os.PathLike, **options: Any) -> Any:
        """A session on the artifact (``vocab_only=True``: the tokenizer only, where supported): the
        session class of the artifact's kind (decoders generate, encoders embed)."""
        kind = cls.kind(Path(path))
        session = cls.sessions.get(kind)
        if session is None:
            from edgekit.errors import InputError

            raise InputError(f"the {cls.name} runtime does not open {kind} artifacts ({Path(path).name})",
                             "open it with the runtime its manifest names")
        if isinstance(session, str):
            import importlib

            module, _, attr = session.partition(":")
            session = getattr(importlib.import_module(module), attr)
        return session(path, **options)

    @classmethod
    def facts(cls, path: Path) -> "ArtifactFacts":
        """What the predictor needs (bytes read per token by weight type, FLOPs, KV layout), read from the artifact."""
        from edgekit.targets.facts import facts_for

        return facts_for(cls.format, Path(path))
