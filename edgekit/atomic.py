"""Atomic output directories: an artifact appears at its path complete, or not at all.

Everything is written into a hidden sibling directory (same filesystem, so ``rename`` is atomic)
and moved into place only after export-time validation succeeded. On an error or Ctrl-C the
partial directory is removed; after a hard kill it stays hidden as ``.NAME.partial-PID`` and never
where a good artifact is expected.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from edgekit.errors import OutputExistsError


def check_output_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {out} exists and is not a directory", "choose another -o path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputExistsError(
            f"output directory {out} exists and is not empty", "pass --force to replace it, or choose another -o path"
        )


@contextmanager
def atomic_output_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a staging directory; on success it replaces ``out`` in one rename."""
    out = Path(out)
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
