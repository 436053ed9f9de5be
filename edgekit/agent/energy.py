"""Energy meters the operating system exposes, read around a measurement.

- x86 Linux: RAPL package counters under /sys/class/powercap (``energy_uj``, wrapping at
  ``max_energy_range_uj``; readable by root on kernels since 5.10);
- Android and Linux laptops on battery: ``current_now`` x ``voltage_now`` of the battery under
  /sys/class/power_supply, sampled (instantaneous power, integrated over the run);
- macOS: ``powermetrics`` needs root and a sampling process; not read here (the result says so).

Each meter yields joules over an interval or None, and the result names the meter, so a figure is
never presented without saying what measured it.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any


def _read_int(p: Path) -> int | None:
    try:
        return int(p.read_text().strip())
    except (OSError, ValueError):
        return None


class Rapl:
    """Sum of the top-level RAPL domains (packages; their sub-domains are parts of them)."""

    name = "rapl"

    def __init__(self, root: Path = Path("/sys/class/powercap")):
        self.zones = [z for z in sorted(root.glob("intel-rapl:*")) if z.name.count(":") == 1
                      and _read_int(z / "energy_uj") is not None]

    def available(self) -> bool:
        return bool(self.zones)

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._e0 = [_read_int(z / "energy_uj") for z in self.zones]

    def stop(self) -> dict[str, Any] | None:
        e1 = [_read_int(z / "energy_uj") for z in self.zones]
        seconds = time.perf_counter() - self._t0
        total = 0
        for z, a, b in zip(self.zones, self._e0, e1):
            if a is None or b is None:
                return None
            if b < a:  # the counter wrapped
                b += _read_int(z / "max_energy_range_uj") or 0
            total += b - a
        return {"meter": "rapl", "joules": total / 1e6, "seconds": seconds,
                "domains": [(z / "name").read_text().strip() if (z / "name").exists() else z.name for z in self.zones]}


class Battery:
    """Battery power sampled every ``period_s`` while discharging (the device must be unplugged)."""

    name = "battery"

    def __init__(self, root: Path = Path("/sys/class/power_supply"), period_s: float = 0.1):
        self.period_s = period_s
        self.supply = next((d for d in sorted(root.glob("*")) if (d / "current_now").exists() and (d / "voltage_now").exists()
                            and (d / "type").exists() and (d / "type").read_text().strip() == "Battery"), None)

    def available(self) -> bool:
        return self.supply is not None

    def _watts(self) -> float | None:
        i, v = _read_int(self.supply / "current_now"), _read_int(self.supply / "voltage_now")
        return None if i is None or v is None else abs(i) * 1e-6 * v * 1e-6  # microamps x microvolts

    def start(self) -> None:
        self._samples: list[tuple[float, float]] = []
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                w = self._watts()
                if w is not None:
                    self._samples.append((time.perf_counter(), w))
                self._stop.wait(self.period_s)

        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, Any] | None:
        self._stop.set()
        self._thread.join()
        seconds = time.perf_counter() - self._t0
        s = self._samples
        status = (self.supply / "status").read_text().strip() if (self.supply / "status").exists() else "unknown"
        if len(s) < 2 or status.lower() != "discharging":
            return None
        joules = sum((t1 - t0) * (w0 + w1) / 2 for (t0, w0), (t1, w1) in zip(s, s[1:]))
        return {"meter": f"battery ({self.supply.name})", "joules": joules, "seconds": seconds, "samples": len(s)}


def meter(sysfs: Path = Path("/sys/class")):
    """The first meter this OS exposes, else None."""
    for m in (Rapl(sysfs / "powercap"), Battery(sysfs / "power_supply")):
        if m.available():
            return m
    return None


def unavailable_reason() -> str:
    if sys.platform == "darwin":
        return "macOS exposes power through powermetrics, which needs root: not read by the agent"
    return "this OS exposes no power meter the agent can read (no RAPL under /sys/class/powercap, no discharging battery)"


def per_token(energy: dict[str, Any] | None, speed: dict[str, Any]) -> dict[str, Any]:
    """Joules per decoded token and per request from the mean power over the speed run."""
    if not energy:
        return {"available": False, "why": unavailable_reason()}
    watts = energy["joules"] / max(energy["seconds"], 1e-9)
    decode_s = 1 / speed["decode_tok_s"]
    request_s = speed["ttft_ms"] / 1000 + (speed["settings"]["decode_tokens"] - 1) * decode_s
    return energy | {"available": True, "mean_watts": watts, "joules_per_token": watts * decode_s,
                     "joules_per_request": watts * request_s,
                     "method": "mean power over the whole speed run x time per decoded token / per request "
                               f"({speed['settings']['prompt_tokens']}-token prompt, {speed['settings']['decode_tokens']} tokens)"}
