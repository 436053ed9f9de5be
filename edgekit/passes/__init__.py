"""Compression passes: each takes a :class:`~edgekit.model.Model`, decides numbers, and records what it did.

A pass never writes files. It sets ``model.encodings[name]`` (and may transform ``model.tensors``);
exporters pack whatever the passes decided. Passes are looked up by name in
:data:`edgekit.registry.PASSES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from edgekit.model import Model


@dataclass
class PassContext:
    """What a pass may need besides the model: calibration tokens and a progress callback."""

    calibration_tokens: Callable[[], list[list[int]]] | None = None
    progress: Callable[[str, int, int], None] = lambda desc, done, total: None
    # what the export format can express, e.g. {"per_layer_widths": True}
    options: dict[str, Any] = field(default_factory=dict)
    # the uncompressed model: the teacher for recovery by distillation
    reference: Model | None = None
    log: Callable[[str], None] = lambda s: None


class Pass:
    """Base class. Subclasses set ``name`` and implement :meth:`apply`.

    Besides the numbers, a pass declares what the pipeline must know about it: the model kinds it
    applies to, whether it changes shapes, the tolerance an artifact holding its numbers must meet at
    export time, and the warnings its result calls for.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False
    # the parameters a recipe may set, with their types (anything else in a recipe is an error)
    param_types: ClassVar[dict[str, type]] = {}
    # the values each parameter may take: (low, high, brackets) with "[]", "[)", "(]" or "()", checked with the
    # recipe before any model is read (a typo'd fraction fails in one line, not after minutes of work)
    param_ranges: ClassVar[dict[str, tuple[float, float, str]]] = {}

    @classmethod
    def params_problem(cls, params: dict[str, Any]) -> str | None:
        """What is wrong with ``params`` taken together (each one already has its type and range), or None."""
        return None
    # structural passes change shapes; the others only choose how each tensor is stored
    structural: ClassVar[bool] = False
    # where a structural pass stands among the others in a recipe (lower first); storage passes come last
    order: ClassVar[int] = 0
    # the model kinds whose tensors this pass knows how to compress ("decoder", "encoder")
    kinds: ClassVar[frozenset[str]] = frozenset({"decoder"})
    # Export-time validation when this pass is the whole recipe: the artifact against the float
    # reference, per quality metric (decoders: mean KL divergence; encoders: cosine distance 1 - cos,
    # mean and worst sentence). A correct export lands far inside; a broken one (wrong layout, wrong
    # scales) far outside. Mean KLD rather than top-1: a random tiny model's near-flat distributions
    # flip their argmax under any rounding.
    tolerance: ClassVar[dict[str, float]] = {"kld_mean": 1.0}
    # a non-uniform grid (edgekit.model.BlockCodebook) only some formats hold, e.g. "iq4_nl"
    codebook: ClassVar[str | None] = None
    # the pass changes weights on purpose (training): its artifact is checked against the same
    # numbers computed in torch, not against the float reference under a tolerance
    trains: ClassVar[bool] = False

    def __init__(self, **params: Any):
        self.params = params

    def grid_codebook(self) -> str | None:
        """The codebook this pass (with its parameters) stores, checked against the format before any work."""
        return self.codebook

    def block_size(self) -> int | None:
        """The block size of the 2- / 4-bit blocks this pass stores when a recipe chooses one (None: the
        default blocks of 32), checked against the format before any work."""
        return None

    def apply(self, model: Model, ctx: PassContext) -> dict[str, Any]:
        """Compress ``model`` in place and return a JSON-able record of what was done."""
        raise NotImplementedError

    def warnings(self, record: dict[str, Any], quality: dict[str, Any]) -> list[str]:
        """Loud warnings a user must see about what this pass did, given the model's quality after it."""
        return []


def is_output_head(model: Model, name: str) -> bool:
    return name == model.output_head_name()
