"""What the agent tells the host about its device: OS, CPU, memory, accelerators, the runtimes and
execution providers importable here, and temperatures / throttling where the OS exposes them."""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any


def _cpu_model() -> str | None:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):
            if line.split(":")[0].strip() in ("model name", "Model", "Hardware"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        out = _run(["sysctl", "-n", "machdep.cpu.brand_string"])
        if out:
            return out
    return platform.processor() or None


def _run(cmd: list[str], timeout: float = 3.0) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _read(p: Path) -> str | None:
    try:
        return p.read_text().strip()
    except OSError:
        return None


def _cgroup_memory_limit() -> int | None:
    v = _read(Path("/sys/fs/cgroup/memory.max"))
    return int(v) if v and v.isdigit() else None


def runtimes() -> dict[str, Any]:
    """Which edgekit runtimes can run here, with their accelerators."""
    out: dict[str, Any] = {}
    if importlib.util.find_spec("llama_cpp") is not None:
        try:
            import llama_cpp

            out["llamacpp"] = {"version": getattr(llama_cpp, "__version__", None),
                               "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload())}
        except Exception as exc:  # noqa: BLE001 - a broken install is reported, not fatal
            out["llamacpp"] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
    if importlib.util.find_spec("onnxruntime") is not None:
        try:
            import onnxruntime as ort

            out["onnxruntime"] = {"version": ort.__version__, "providers": ort.get_available_providers()}
        except Exception as exc:  # noqa: BLE001
            out["onnxruntime"] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
    if sys.platform == "darwin" and importlib.util.find_spec("coremltools") is not None:
        out["coreml"] = {"compute_units": ["ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE"]}
    return out


def accelerators() -> list[dict[str, Any]]:
    found = []
    smi = _run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
    for line in (smi or "").splitlines():
        name, mem, driver = ([x.strip() for x in line.split(",")] + [None, None])[:3]
        found.append({"kind": "cuda", "name": name, "memory": mem, "driver": driver})
    if Path("/dev/dri").is_dir() and not found:
        found.append({"kind": "drm", "devices": sorted(p.name for p in Path("/dev/dri").iterdir())})
    if sys.platform == "darwin" and platform.machine() == "arm64":
        found.append({"kind": "apple", "name": "Apple GPU + Neural Engine"})
    return found


def thermal() -> dict[str, Any]:
    """Temperatures (°C) and throttling flags where exposed: thermal zones, psutil's sensors, a Pi's vcgencmd."""
    zones = {}
    for z in sorted(Path("/sys/class/thermal").glob("thermal_zone*")):
        t = _read(z / "temp")
        if t and t.lstrip("-").isdigit():
            zones[_read(z / "type") or z.name] = int(t) / 1000
    out: dict[str, Any] = {"zones_c": zones}
    try:
        import psutil

        sensors = getattr(psutil, "sensors_temperatures", lambda: {})() or {}
        out["sensors_c"] = {k: max((e.current for e in v), default=None) for k, v in sensors.items()}
    except Exception:  # noqa: BLE001 - optional facts
        pass
    thr = _run(["vcgencmd", "get_throttled"])  # Raspberry Pi firmware: throttled=0x0 when nothing happened
    if thr and "=" in thr:
        bits = int(thr.split("=", 1)[1], 16)
        out["throttled"] = {"raw": thr, "under_voltage": bool(bits & 0x1), "freq_capped": bool(bits & 0x2),
                            "throttled_now": bool(bits & 0x4), "soft_temp_limit": bool(bits & 0x8),
                            "throttled_since_boot": bool(bits & 0x40000)}
    counts = [_read(p) for p in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/thermal_throttle/core_throttle_count")]
    if counts:
        out["core_throttle_count"] = sum(int(c) for c in counts if c and c.isdigit())
    return out


def snapshot() -> dict[str, Any]:
    """The figures that change while the device works: memory, frequencies, load, temperatures."""
    import psutil

    vm = psutil.virtual_memory()
    freqs = []
    try:
        freqs = [round(f.current) for f in psutil.cpu_freq(percpu=True) or []]
    except Exception:  # noqa: BLE001 - not every OS reports frequencies
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"ram_available_bytes": vm.available, "cpu_mhz": freqs, "load_avg": load, **thermal()}


def facts() -> dict[str, Any]:
    import psutil

    cpu_dirs = sorted(Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq"))
    governors = sorted({g for g in (_read(d / "scaling_governor") for d in cpu_dirs) if g})
    max_mhz = [int(v) // 1000 for v in (_read(d / "cpuinfo_max_freq") for d in cpu_dirs) if v and v.isdigit()]
    return {
        "os": {"system": platform.system(), "release": platform.release(), "version": platform.version(),
               "machine": platform.machine(), "python": platform.python_version()},
        "cpu": {"model": _cpu_model(), "cores_logical": psutil.cpu_count(), "cores_physical": psutil.cpu_count(logical=False),
                "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else psutil.cpu_count(),
                "max_mhz": max_mhz or None, "governors": governors or None},
        "ram_total_bytes": psutil.virtual_memory().total,
        "cgroup_memory_limit_bytes": _cgroup_memory_limit(),
        "accelerators": accelerators(),
        "runtimes": runtimes(),
        "energy_meter": _meter_name(),
        "now": snapshot(),
    }


def _meter_name() -> str | None:
    from edgekit.agent.energy import meter

    m = meter()
    return m.name if m else None
