"""Exporters: pack a compressed :class:`edgekit.model.Model` into a file format.

Imported as ``edgekit.converters`` (the folder sits at the repository's top level). Exporters only
pack numbers a pass decided; they never quantize on their own.
"""
