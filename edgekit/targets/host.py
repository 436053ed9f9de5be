"""The special target ``host``: this machine, measured (read and copy bandwidth, matmul throughput, RAM, cores).

Figures are cached with a timestamp (``edgekit calibrate --remeasure`` refreshes them): they are the
denominators of every "% of roofline" edgekit reports, so they must stay the same between commands.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from edgekit.cache import cache_dir

COPY_BYTES = 256 * 1024 * 1024


def measure_copy_bandwidth(reps: int = 7) -> float:
    """Bytes copied per second by one thread (memcpy of 256 MiB, the tinymembench 'copy' convention)."""
    import numpy as np

    src = np.ones(COPY_BYTES // 8, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return COPY_BYTES / min(times)


def measure_read_bandwidth(threads: int, reps: int = 5) -> float:
    """Bytes read per second by ``threads`` threads summing disjoint slices of 512 MiB (numpy releases
    the GIL in reductions). This is the decode roofline: llama.cpp streams weights on every thread."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    data = np.ones(2 * COPY_BYTES // 4, dtype=np.float32)
    parts = np.array_split(data, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.sum, parts))
        for _ in range(reps):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t0)
    return data.nbytes / best


def measure_matmul_flops(n: int = 1024, reps: int = 5) -> dict[str, float]:
    """Dense f32 matrix-multiply FLOP/s through numpy's BLAS, all cores (the dtype llama.cpp's prefill
    accumulates in; numpy has no fast f16 or int8 GEMM to measure)."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return {"f32": 2 * n**3 / statistics.median(times)}


def measure_storage_read(folder: Path, size: int = 256 << 20) -> float | None:
    """Bytes per second read back from a file written to ``folder`` and dropped from the page cache
    (Linux ``posix_fadvise``; elsewhere None, since a cached read would measure memory, not storage)."""
    import os

    import numpy as np

    if not hasattr(os, "posix_fadvise"):
        return None
    path = Path(folder) / f".read-test-{os.getpid()}"
    try:
        with open(path, "wb") as fh:
            np.random.default_rng(0).bytes(1 << 20)  # warm numpy's generator outside the timing
            block = np.random.default_rng(1).bytes(4 << 20)
            for _ in range(size // len(block)):
                fh.write(block)
            fh.flush()
            os.fsync(fh.fileno())
        with open(path, "rb") as fh:
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            t0 = time.perf_counter()
            n = 0
            for chunk in iter(lambda: fh.read(8 << 20), b""):
                n += len(chunk)
            return n / (time.perf_counter() - t0)
    except OSError:
        return None
    finally:
        path.unlink(missing_ok=True)


def measure_host() -> dict[str, Any]:
    import platform

    import psutil

    from edgekit.runtimes.llamacpp import default_threads

    return {
        "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": platform.machine(),
        "processor": _cpu_name() or platform.processor(),
        "cores_logical": psutil.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "threads_used": default_threads(),
        "ram_bytes": psutil.virtual_memory().total,
        "copy_bandwidth_bytes_s": measure_copy_bandwidth(),
        "read_bandwidth_bytes_s": measure_read_bandwidth(default_threads()),
        "compute_flops": measure_matmul_flops(),
        "storage_note": "artifacts are read from the page cache on repeated loads",
    }


def _cpu_name() -> str | None:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def host_figures(remeasure: bool = False) -> dict[str, Any]:
    path = cache_dir() / "host.json"
    from edgekit.atomic import read_json_or_none, write_atomic

    figs = read_json_or_none(path) if not remeasure else None
    if isinstance(figs, dict) and "read_bandwidth_bytes_s" in figs:  # older or damaged caches: measure again
        return figs
    figs = measure_host()
    write_atomic(path, json.dumps(figs, indent=2))
    return figs
