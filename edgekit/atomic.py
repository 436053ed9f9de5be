"""Atomic output directories: an artifact appears at its path complete, or not at all.

Everything is written into a hidden sibling directory (same filesystem, so ``rename`` is atomic)
and moved into place only after export-time validation succeeded. On an error or Ctrl-C the
partial directory is removed; after a hard kill it stays hidden as ``.NAME.partial-PID`` and never
where a good artifact is expected.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from edgekit.errors import InputError, OutputExistsError

_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG)


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
    _clean_after_crash(out)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        for p in staging.iterdir():  # the artifact's bytes are on disk before its name appears
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        why = exc.strerror if exc.errno in _NO_ROOM else None
        if why is None and exc.errno is None and shutil.disk_usage(out.parent).free < 64 << 20:
            why = "No space left on device"  # numpy's tofile reports a short write without an errno
        if why:
            raise InputError(f"cannot write {out} ({why})",
                             "free some disk space or choose another -o path; nothing was left half-written") from None
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(staging, out)
    _fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


def _clean_after_crash(out: Path) -> None:
    """What a killed conversion left beside ``out``: its staging directory is removed; a previous artifact it had
    moved aside in the instant before the final rename is put back when nothing took its place."""
    for p in sorted(out.parent.glob(f".{out.name}.*-*")):
        kind, _, pid = p.name[len(out.name) + 2 :].rpartition("-")
        if kind not in ("partial", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "old" and not out.exists():
            os.rename(p, out)
        else:
            shutil.rmtree(p, ignore_errors=True)


def write_atomic(path: Path, data: bytes | str) -> Path:
    """Write a file so that a reader (or the next run after a crash) sees the old content or the new, never
    part of it: a temporary sibling (unique per process), flushed to disk, renamed over ``path``, and the
    directory entry flushed too. A failure (disk full) removes the temporary and raises an InputError."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    raw = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(f"cannot write {path} ({exc.strerror or exc})", "free some disk space or check permissions") from None
    return path


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def read_json_or_none(path: Path):
    """A cache entry, or None when it is missing or damaged (the caller computes it again)."""
    import json

    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError):
        return None
