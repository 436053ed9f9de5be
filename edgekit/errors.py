"""User-facing errors.

Every error meant for the user is an :class:`EdgekitError`; the CLI prints it as one line
(``error: <what went wrong>. <what to do>``) and exits non-zero, never with a traceback.
"""

from __future__ import annotations


class EdgekitError(Exception):
    """An error the user can act on. ``hint`` says what to do next."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        text = self.message.rstrip(".")
        if self.hint:
            hint = self.hint.rstrip(".")
            text += f". {hint[:1].upper()}{hint[1:]}"
        return " ".join((text + ".").split())


class InputError(EdgekitError):
    """A missing, unreadable or corrupt input file."""


class UnsupportedArchitectureError(EdgekitError):
    """The model's architecture is not one edgekit can convert."""


class OutputExistsError(EdgekitError):
    """The output directory exists and is not empty."""


class MissingDependencyError(EdgekitError):
    """An optional dependency needed for this step is not installed."""


class UnknownPluginError(EdgekitError):
    """No pass, exporter or runtime is registered under the asked name."""


class MemoryFitError(EdgekitError):
    """The model would not fit the memory available (or ``max_memory``); raised before anything is allocated."""

    exit_code = 2


class ValidationError(EdgekitError):
    """The exported artifact does not compute what the reference computes.

    Raised by export-time validation; the artifact is not left at the output path.
    """

    def __init__(self, artifact: str, output: str, worst: float, tolerance: float, detail: str = ""):
        msg = (
            f"validation failed for {artifact}: {output} is {worst:.4g}, beyond the tolerance {tolerance:.4g}"
            + (f" ({detail})" if detail else "")
        )
        super().__init__(msg, "nothing was written; try a higher-precision --quant or report the model")
        self.artifact, self.output, self.worst, self.tolerance = artifact, output, worst, tolerance
