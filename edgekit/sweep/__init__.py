"""``edgekit sweep SPEC.toml -o DIR``: search recipes x formats x devices for the Pareto front per device.

A local process pool by default (``--workers N``; each task gets its share of the cores), a Ray cluster with
``--ray auto|ADDRESS`` (every conversion and measurement a Ray task with declared resources). Results are
cached by content, so a re-run converts only what is missing. See :mod:`edgekit.sweep.spec` for the spec.
"""

from __future__ import annotations

from edgekit.sweep.run import run_sweep
from edgekit.sweep.spec import Candidate, SweepSpec, load

__all__ = ["run_sweep", "load", "SweepSpec", "Candidate"]
