"""Run fuzz cases in forked children with timeouts and count the outcomes per input kind.

The parent imports edgekit and its runtimes once and forks one child per case, so a case costs what
its own work costs, not an interpreter start; a native crash or a hang stays in the child. The
parent never runs torch or a runtime itself (a fork after that could inherit a busy thread pool).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tests.fuzz import cases as C

OUTCOMES = ("good", "traceback", "unclean", "signal", "hang", "half-written", "escaped", "harness")
BAD = OUTCOMES[1:]


@dataclass
class Result:
    kind: str
    index: int
    what: str
    outcome: str
    seconds: float
    detail: str = ""


def _preload() -> None:
    """Import what the children use, so each fork starts warm."""
    import edgekit  # noqa: F401
    import edgekit.cli  # noqa: F401
    import edgekit.pipeline  # noqa: F401
    import llama_cpp  # noqa: F401
    import onnxruntime  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from tests.fuzz import actions  # noqa: F401


def _child(case: C.Case, log: Path, cache: Path) -> None:
    """Runs in the forked child; never returns."""
    code = 1
    try:
        os.setpgid(0, 0)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.environ["EDGEKIT_CACHE"] = str(cache)
        from edgekit.errors import EdgekitError

        try:
            if case.argv is not None:
                from edgekit.cli import main

                sys.argv = ["edgekit", *case.argv]
                main()
                code = 0
            else:
                from tests.fuzz import actions

                fn, args = case.action
                getattr(actions, fn)(*args)
                code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if isinstance(exc.code, str):
                sys.stderr.write(exc.code + "\n")
        except EdgekitError as exc:  # what the library raises for bad input: the CLI prints it as this line
            sys.stderr.write(f"error: {exc.one_line()}\n")
            code = 2
        except BaseException:
            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _half_written(case: C.Case, code: int) -> str:
    out = case.out
    if out is None:
        return ""
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    if leftovers:
        return f"left {leftovers}"
    if code != 0:
        return f"failed but wrote {out}" if out.exists() else ""
    man = out / "manifest.json"
    if not man.is_file():
        return "succeeded without a manifest"
    for f in json.loads(man.read_text()).get("files", []):
        p = out / f["path"]
        if not p.is_file() or p.stat().st_size != f["bytes"]:
            return f"{f['path']} does not match the manifest"
    return ""


def classify(case: C.Case, status: int | None, text: str) -> tuple[str, str]:
    if status is None:
        return "hang", f"no answer in {case.timeout:.0f} s"
    if os.WIFSIGNALED(status):
        return "signal", signal.Signals(os.WTERMSIG(status)).name
    code = os.WEXITSTATUS(status)
    if case.marker is not None and case.marker.exists():
        return "escaped", f"{case.marker.name} was created"
    if "Traceback (most recent call last)" in text:
        return "traceback", text.strip().splitlines()[-1][:300]
    half = _half_written(case, code)
    if half:
        return "half-written", half
    if code != 0:
        errors = [ln for ln in text.splitlines() if ln.startswith("error: ")]
        if len(errors) != 1:
            return "unclean", f"exit {code}, {len(errors)} error lines: {text.strip()[-300:]!r}"
        return "good", errors[0][:300]
    return "good", "ok"


def run(total: int, seed: int, seeds: Path, work: Path, workers: int = 2, only: list[str] | None = None,
        replay: list[tuple[str, int]] | None = None, failures: Path | None = None,
        log=lambda s: print(s, flush=True), checkpoint=None) -> list[Result]:
    from tests.fuzz.seeds import build

    if not (seeds / ".seeds-done").exists():  # built in a child: torch and the runtimes run there, not here
        subprocess.run([sys.executable, "-m", "tests.fuzz.seeds", str(seeds)], check=True,
                       cwd=str(Path(__file__).resolve().parents[2]))
    build(seeds)
    _preload()
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    todo = list(replay) if replay else C.plan(total, only)
    if not replay:  # kinds interleaved, so a run cut short still covers every kind
        per_kind = Counter(k for k, _ in todo)
        todo.sort(key=lambda ki: (ki[1] / per_kind[ki[0]], ki[0]))
    running: dict[int, tuple[C.Case, Path, float, float]] = {}
    results: list[Result] = []

    def finish(pid: int, status: int | None) -> None:
        case, logf, t0, _ = running.pop(pid)
        text = logf.read_text(errors="replace") if logf.exists() else ""
        outcome, detail = classify(case, status, text)
        results.append(Result(case.kind, case.index, case.what, outcome, round(time.monotonic() - t0, 2), detail))
        if outcome != "good":
            log(f"  BAD {outcome}: {case.kind}:{case.index} ({case.what}): {detail}")
            if failures is not None:
                keep = failures / f"{case.kind}-{case.index}"
                shutil.rmtree(keep, ignore_errors=True)
                keep.mkdir(parents=True)
                for f in case.files:
                    if f.exists():
                        shutil.copy(f, keep / f.name)
                (keep / "output.txt").write_text(text)
                (keep / "case.json").write_text(json.dumps({"kind": case.kind, "index": case.index, "seed": seed,
                                                            "what": case.what, "argv": case.argv, "action": case.action,
                                                            "outcome": outcome, "detail": detail}, indent=2))
        shutil.rmtree(logf.parent, ignore_errors=True)
        if checkpoint is not None and len(results) % 25 == 0:
            checkpoint(results)

    while todo or running:
        while todo and len(running) < workers:
            kind, index = todo.pop(0)
            try:
                case = C.make(kind, index, seed, seeds, work)
            except Exception as exc:  # a bug of the fuzzer itself: counted (as bad), not fatal to the run
                results.append(Result(kind, index, "making the case", "harness", 0.0, f"{type(exc).__name__}: {exc}"[:300]))
                log(f"  BAD harness: {kind}:{index}: {type(exc).__name__}: {exc}"[:400])
                continue
            logf = work / f"{kind}-{index}" / "output.log"
            pid = os.fork()
            if pid == 0:
                _child(case, logf, cache)
            running[pid] = (case, logf, time.monotonic(), time.monotonic() + case.timeout)
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid:
            finish(pid, status)
            continue
        now = time.monotonic()
        for pid, (_, _, _, deadline) in list(running.items()):
            if now > deadline:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                os.waitpid(pid, 0)
                finish(pid, None)
        time.sleep(0.01)
    return results


def table(results: list[Result]) -> dict[str, dict[str, int]]:
    rows: dict[str, Counter] = {}
    for r in results:
        rows.setdefault(r.kind, Counter())[r.outcome] += 1
    out = {k: {"cases": sum(c.values()), **{o: c.get(o, 0) for o in OUTCOMES}} for k, c in rows.items()}
    out["total"] = {"cases": len(results), **{o: sum(v[o] for v in out.values()) for o in OUTCOMES}}
    return out
