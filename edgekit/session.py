"""``edgekit.load``: pick the runtime for an artifact and open a session. No torch on this path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekit.errors import InputError
from edgekit.manifest import read_manifest
from edgekit.registry import RUNTIMES


def resolve_artifact(path: str | Path, verify: bool = False) -> tuple[Path, str | None, dict | None]:
    """(model file, runtime name or None, manifest or None) for a directory or a file. An artifact directory's
    files are checked against its manifest: their sizes always, their sha256 with ``verify``
    (:mod:`edgekit.verify`)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{p} does not exist", "pass an artifact directory written by `edgekit convert` or a model file")
    if p.is_dir() and runtime_for(p) is None:  # a directory that is itself a model (.mlpackage) is a file here
        manifest = read_manifest(p)
        if manifest:
            from edgekit.verify import check_files

            check_files(p, manifest, deep=verify)
            art = manifest["artifact"]
            return p / art["file"], art.get("runtime"), manifest
        candidates = [c for c in sorted(p.iterdir()) if runtime_for(c) is not None]
        if len(candidates) != 1:
            raise InputError(f"{p} has no manifest.json and {len(candidates)} model files", "pass the model file itself")
        return candidates[0], None, None
    return p, None, None


def runtime_for(path: Path) -> str | None:
    """The registered runtime that claims ``path`` (highest priority first), or None."""
    claimed = []
    for name in RUNTIMES.names():
        cls = RUNTIMES.get(name)
        if cls.claims(path):
            claimed.append((-cls.priority, name))
    return min(claimed)[1] if claimed else None


def runtime_of(file: Path, named: str | None = None):
    """The runtime class for a resolved model file (``named``: what its manifest says)."""
    name = named or runtime_for(file)
    if name is None:
        raise InputError(f"no runtime opens {file.name}", f"known runtimes: {', '.join(RUNTIMES.names())}")
    return RUNTIMES.get(name)


def artifact_kind(path: str | Path) -> str:
    """"decoder" or "encoder", as the artifact's own runtime reads it from the artifact's files."""
    file, named, _ = resolve_artifact(path)
    return runtime_of(file, named).kind(file)


def make_batch_invariant(sessions: list[Any], runtime: str) -> None:
    """Switch open decoder sessions to batch-invariant decoding; closes them and raises in one line when their
    runtime has none."""
    if not all(hasattr(s, "_spec_feed") for s in sessions):
        for s in sessions:
            s.close()
        raise InputError(f"{runtime} sessions have no batch-invariant decoding", "drop batch_invariant, or use a GGUF or ONNX decoder")
    for s in sessions:
        s.batch_invariant = True


def load(path: str | Path, runtime: str | None = None, *, check_memory: bool = True,
         max_memory: int | str | None = None, verify: bool = False, **options: Any):
    """Open the artifact at ``path`` (directory or model file) with ``runtime`` (default: the one its manifest
    or suffix names); ``options`` go to the session (``n_ctx``, ``n_threads``, ``vocab_only``, ...).

    Before anything is allocated, the memory-fit guard (:func:`edgekit.memory_fit.guard`) predicts the
    session's peak resident memory (weights + KV cache for ``n_ctx`` + runtime buffers) and raises
    :class:`edgekit.errors.MemoryFitError` when it exceeds ``max_memory`` (bytes, or a size such as "2GiB";
    default: the memory available now). ``check_memory=False`` skips it; so do ``vocab_only=True`` (no weights
    or cache), a runtime that cannot run here and an artifact whose facts cannot be read (the runtime's own
    open then reports what is wrong). A ``max_memory`` that is not a size is an :class:`InputError`.

    An artifact directory's files must have the sizes its manifest lists; ``verify=True`` compares their
    sha256 too (a flipped byte is refused in one line; digests are remembered per path, size and mtime).

    ``batch_invariant=True``: every decode step runs an even number of rows, so greedy output is the same bit for
    bit with and without a draft (see :class:`edgekit.runtimes.TextSession`).

    ``draft``: decode speculatively (:mod:`edgekit.runtimes.speculative`) with "prompt-lookup" or a smaller
    artifact of the same tokenizer; greedy output is unchanged, only faster when the draft is often right.
    """
    file, named, _ = resolve_artifact(path, verify)
    rt = RUNTIMES.get(runtime) if runtime else runtime_of(file, named)
    draft = options.pop("draft", None)
    if check_memory and not options.get("vocab_only"):
        from edgekit.memory_fit import guard

        guard(file, rt, options.get("n_ctx"), max_memory, options.get("kv_type"))
    invariant = bool(options.pop("batch_invariant", False))
    session = rt.open(file, **options)
    if invariant:
        make_batch_invariant([session], rt.name)
    if draft is not None:
        try:  # the draft opens with the target's context and threads (its own runtime's defaults otherwise)
            shared = {k: options[k] for k in ("n_ctx", "n_threads") if k in options}
            session.use_draft(draft, check_memory=check_memory, verify=verify, **shared)
        except BaseException:
            session.close()
            raise
    return session
