"""Speed and memory of an artifact, measured in a fresh process that loads nothing but the runtime.

Run as ``python -m edgekit.harness.speed CONFIG_JSON``; prints one JSON object. A separate process
keeps the parent's torch and reference model out of the peak resident memory figure.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from edgekit.errors import EdgekitError, InputError


@dataclass
class SpeedConfig:
    prompt_tokens: int = 128  # prompt length for time to first token
    prefill_tokens: int = 512  # prompt length for prefill throughput
    decode_tokens: int = 64  # generated tokens per decode run
    reps: int = 5  # measured repetitions (after one warm-up)
    load_reps: int = 3
    n_threads: int | None = None
    long_context: int = 0  # when > 0, also measure decode after a prompt this long (KV-cache cost)
    session_options: dict = field(default_factory=dict)  # more options for edgekit.load (n_ctx, n_gpu_layers)


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _peak_rss_bytes() -> int:
    """The process's resident high-water mark.

    On Linux this is VmHWM of the current address space: ru_maxrss would also count the parent's
    memory at fork time (Linux carries it over exec), so a small worker started by a big parent
    would report the parent's peak. psutil offers no high-water mark, only samples."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(peak if sys.platform == "darwin" else peak * 1024)


def timed_loads(artifact: str, reps: int, n_threads: int | None, options: dict | None = None):
    """(last session, load times, RSS before the first load, RSS after the last): every harness opens
    the artifact ``reps`` times and keeps the last session open."""
    import psutil

    import edgekit

    opts = dict(options or {}) | ({"n_threads": n_threads} if n_threads else {})
    rss_start = psutil.Process().memory_info().rss
    loads = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        # no memory-fit guard: its header and graph reads would count in the load time, and the parent
        # (``edgekit profile``) has already run it
        s = edgekit.load(artifact, check_memory=False, **opts)
        loads.append(time.perf_counter() - t0)
        if len(loads) < reps:
            s.close()
    return s, loads, rss_start, psutil.Process().memory_info().rss


def measure_in_process(artifact: str, text: str, cfg: SpeedConfig) -> dict[str, Any]:
    s, loads, rss_start, rss_loaded = timed_loads(artifact, cfg.load_reps, cfg.n_threads, cfg.session_options)
    ids = s.tokenize(text)
    need = max(cfg.prompt_tokens, cfg.prefill_tokens, cfg.long_context)
    if len(ids) < need:
        ids = (ids * (need // max(1, len(ids)) + 1))[:need]
    prompt, prefill_ids = ids[: cfg.prompt_tokens], ids[: cfg.prefill_tokens]

    def decode_rate(prompt_ids: list[int]) -> tuple[float, float]:
        t0 = time.perf_counter()
        stamps = [time.perf_counter() for _ in s.stream_tokens(prompt_ids, cfg.decode_tokens, ignore_eos=True)]
        return (stamps[0] - t0) * 1000, (len(stamps) - 1) / (stamps[-1] - stamps[0])

    ttft, prefill, decode = [], [], []
    for rep in range(cfg.reps + 1):  # the first repetition is a warm-up
        t0 = time.perf_counter()
        s.prefill(prefill_ids)
        t_prefill = time.perf_counter() - t0

        first_ms, rate = decode_rate(prompt)
        if rep == 0:
            continue
        prefill.append(len(prefill_ids) / t_prefill)
        ttft.append(first_ms)
        decode.append(rate)
    long = {}
    if cfg.long_context:
        long_ids = ids[: cfg.long_context]
        decode_rate(long_ids)  # warm-up
        runs = [decode_rate(long_ids) for _ in range(max(2, cfg.reps // 2))]
        long = {"long_context": {"prompt_tokens": len(long_ids), "ttft_ms": statistics.median(r[0] for r in runs),
                                 "decode_tok_s": statistics.median(r[1] for r in runs)}}
    n_ctx = s.n_ctx
    spec = getattr(s, "last_speculation", None)  # the last decode run's draft acceptance, when drafting
    s.close()
    return {**long, **({"speculation": spec} if spec else {}),
        "n_ctx": n_ctx,
        "runtime": s.runtime,
        "n_threads": s.n_threads,
        "load_s": statistics.median(loads),
        "load_first_s": loads[0],
        "ttft_ms": statistics.median(ttft),
        "prefill_tok_s": statistics.median(prefill),
        "decode_tok_s": statistics.median(decode),
        "peak_rss_bytes": _peak_rss_bytes(),
        "rss_after_load_bytes": rss_loaded,
        "rss_interpreter_bytes": rss_start,
        "spread": {"load_s": summary(loads), "ttft_ms": summary(ttft), "prefill_tok_s": summary(prefill),
                   "decode_tok_s": summary(decode)},
        "repetitions": {"load_s": loads, "ttft_ms": ttft, "prefill_tok_s": prefill, "decode_tok_s": decode},
        "settings": asdict(cfg) | {"prompt_tokens": len(prompt), "prefill_tokens": len(prefill_ids)},
    }


def run_in_child(module: str, artifact: str, payload: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Run ``python -m module`` with ``payload`` as JSON on stdin; its last JSON line is the result.

    Speed and peak memory are measured in a fresh process so nothing the parent loaded (torch, the
    reference model) counts against the artifact.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", module], input=json.dumps(payload), capture_output=True,
                          text=True, timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise InputError(f"speed measurement of {artifact} failed: {err}", "open it with edgekit.load to see the error")
    result = json.loads(lines[-1])
    if "error" in result:
        raise InputError(result["error"])
    return result


def child_main(run: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """The child side of :func:`run_in_child`: read the payload, print the result (or the error) as JSON."""
    args = json.loads(sys.stdin.read())
    try:
        out = run(args)
    except EdgekitError as exc:
        out = {"error": exc.one_line()}
    print(json.dumps(out))


def measure(artifact: str, text: str, cfg: SpeedConfig, timeout: float = 1800) -> dict[str, Any]:
    """Run :func:`measure_in_process` in a child Python and return its figures."""
    return run_in_child("edgekit.harness.speed", artifact, {"artifact": str(artifact), "text": text, "cfg": asdict(cfg)},
                        timeout)


def main() -> None:
    child_main(lambda a: measure_in_process(a["artifact"], a["text"], SpeedConfig(**a["cfg"])))


if __name__ == "__main__":
    main()
