"""``edgekit convert`` for library callers: ``convert(ConvertRequest(model, "onnx", "int4", "out"))``.

The steps live in :mod:`edgekit.pipeline`; this module is the public name the CLI and apps import.
"""

from edgekit.pipeline import ConvertRequest, convert

__all__ = ["ConvertRequest", "convert"]
