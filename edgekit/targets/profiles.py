"""Device profiles: one TOML file per target device, every figure with its unit and its source.

A profile is data, not code: the predictor reads bandwidth, compute, memory and storage figures from
it, and a reader can check where each number came from. Loading is strict (unknown keys, missing
units, units that do not fit the figure are errors), because a typo such as ``unit = "TB/s"`` would
otherwise turn into a prediction that is off by a factor of a thousand without anyone noticing.

Search order: the built-in folder, then each folder of ``$EDGEKIT_PROFILES`` (``os.pathsep``-separated),
then folders passed by the caller; a later profile with the same name replaces an earlier one, so a
user can correct a built-in figure with a measured one without editing the package.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from edgekit.errors import InputError

ENV_VAR = "EDGEKIT_PROFILES"

KINDS = ("cpu", "mobile", "edge-gpu", "cloud")
RUNTIMES = ("llamacpp", "onnxruntime", "coreml")
FORMATS = ("gguf", "onnx", "coreml")

# Figure name -> units it may be given in. Anything else is rejected: each figure is converted to SI
# with a fixed factor below, so an unexpected unit cannot be interpreted safely.
ALLOWED_UNITS: dict[str, tuple[str, ...]] = {
    "memory_bandwidth": ("GB/s",),
    "copy_bandwidth": ("GB/s",),
    "compute_f32": ("GFLOPS", "TOPS"),
    "compute_f16": ("GFLOPS", "TOPS"),
    "compute_int8": ("GFLOPS", "TOPS"),
    "ram": ("GB",),
    "memory_budget": ("fraction",),
    "storage_read": ("MB/s",),
    "network_rtt": ("ms",),
    "server_ttft": ("ms",),
    "price_input": ("USD/1M tokens",),
    "price_output": ("USD/1M tokens",),
    "power": ("W",),  # package / board power while decoding: predicted joules per token
}
# Decimal prefixes throughout (1 GB = 1e9 bytes). For RAM sold as "8 GB" (really 8 GiB) this under-
# states capacity by ~7%, which errs on the safe side when predicting whether a model fits.
UNIT_SCALE = {"GB/s": 1e9, "MB/s": 1e6, "GB": 1e9, "GFLOPS": 1e9, "TOPS": 1e12, "fraction": 1.0,
              "ms": 1e-3, "USD/1M tokens": 1e-6, "W": 1.0}

REQUIRED = ("memory_bandwidth", "ram", "memory_budget", "storage_read")
# compute_f32 is the usual prefill figure; a GPU or NPU profile may give only its f16 peak instead.
REQUIRED_ONE_OF = ("compute_f32", "compute_f16")
REQUIRED_CLOUD = ("network_rtt", "price_input", "price_output", "server_ttft")

TOP_KEYS = ("name", "kind", "description", "runtimes", "formats", "figures")
# a profile written by `edgekit calibrate --device`: [measured] device, url, date and calibration (the file
# of fitted efficiency factors beside the profile)
OPTIONAL_KEYS = ("measured",)
MEASURED_KEYS = ("device", "url", "date", "calibration")
FIGURE_KEYS = ("value", "unit", "source")
COMPUTE_FALLBACK = ("f32", "f16", "int8")


@dataclass(frozen=True)
class Figure:
    value: float
    unit: str
    source: str

    def si(self) -> float:
        """The value in SI base units (bytes, bytes/s, FLOP/s, s, USD per token, or a fraction)."""
        return self.value * UNIT_SCALE[self.unit]


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    kind: str
    description: str
    runtimes: tuple[str, ...]
    formats: tuple[str, ...]
    figures: dict[str, Figure]
    path: str
    measured: dict | None = None

    def get(self, key: str) -> Figure | None:
        return self.figures.get(key)

    def _si(self, key: str) -> float:
        fig = self.figures.get(key)
        if fig is None:  # required figures are checked at load time; this guards hand-built profiles
            raise InputError(f"device profile {self.name!r} has no {key} figure", f"add [figures.{key}] to {self.path}")
        return fig.si()

    def bandwidth_bytes_s(self) -> float:
        """Effective bandwidth for decode estimates: the measured copy bandwidth when the profile has
        one (what a decoder actually gets), else the datasheet peak."""
        return self._si("copy_bandwidth" if "copy_bandwidth" in self.figures else "memory_bandwidth")

    def peak_bandwidth_bytes_s(self) -> float:
        return self._si("memory_bandwidth")

    def compute_flops(self, dtype: str = "f32") -> float:
        """Peak ops/s for ``dtype``; when the profile lacks it, the first of f32, f16, int8 it has
        (a GPU profile may only state its f16 tensor-core peak)."""
        for d in (dtype, *COMPUTE_FALLBACK):
            if f"compute_{d}" in self.figures:
                return self._si(f"compute_{d}")
        return self._si(f"compute_{dtype}")  # raises the clear error

    def ram_bytes(self) -> float:
        return self._si("ram")

    def memory_budget_bytes(self) -> float:
        return self.ram_bytes() * self._si("memory_budget")

    def storage_read_bytes_s(self) -> float:
        return self._si("storage_read")

    def is_cloud(self) -> bool:
        return self.kind == "cloud"


def builtin_dir() -> Path:
    """The profiles shipped with edgekit: ``edgekit/profiles_data`` in a wheel, the repository's
    top-level ``profiles/`` in a source checkout or editable install."""
    import edgekit

    pkg = Path(edgekit.__file__).resolve().parent
    packaged = pkg / "profiles_data"
    return packaged if packaged.is_dir() else pkg.parent / "profiles"


def profile_dirs(extra: list[str | Path] | None = None) -> list[Path]:
    """Folders searched for ``*.toml`` profiles, lowest priority first."""
    dirs = [builtin_dir()]
    from edgekit.agent.devices import config_dir

    measured = config_dir() / "profiles"  # written by `edgekit calibrate --device`
    if measured.is_dir():
        dirs.append(measured)
    dirs += [Path(p).expanduser() for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p.strip()]
    dirs += [Path(p).expanduser() for p in (extra or [])]
    return dirs


def _fail(path: Path, key: str, problem: str, hint: str | None = None) -> InputError:
    return InputError(f"device profile {path}: {key}: {problem}",
                      hint or "see profiles/raspberry-pi-5.toml for the expected layout")


def _number(path: Path, key: str, v) -> float:
    # bool is an int subclass in Python; `value = true` is a mistake, not 1.0
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _fail(path, key, f"must be a number, got {v!r}")
    return float(v)


def _names(path: Path, data: dict, key: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    v = data[key]
    if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
        raise _fail(path, key, f"must be a non-empty list of strings, got {v!r}")
    for x in v:
        if x not in allowed:
            raise _fail(path, key, f"unknown value {x!r}; known: {', '.join(allowed)}")
    return tuple(v)


def _figure(path: Path, name: str, table) -> Figure:
    key = f"figures.{name}"
    if name not in ALLOWED_UNITS:
        raise _fail(path, key, "unknown figure", f"known figures: {', '.join(ALLOWED_UNITS)}")
    if not isinstance(table, dict):
        raise _fail(path, key, "must be a table with value, unit and source")
    for k in table:
        if k not in FIGURE_KEYS:
            raise _fail(path, f"{key}.{k}", "unknown key", f"a figure has only {', '.join(FIGURE_KEYS)}")
    for k in FIGURE_KEYS:
        if k not in table:
            raise _fail(path, f"{key}.{k}", "missing",
                        "every figure needs value, unit and source (source may be 'assumption: ...')")
    value = _number(path, f"{key}.value", table["value"])
    unit, source = table["unit"], table["source"]
    if unit not in ALLOWED_UNITS[name]:
        raise _fail(path, f"{key}.unit", f"{unit!r} is not allowed for {name}",
                    f"use {' or '.join(ALLOWED_UNITS[name])}")
    if not isinstance(source, str) or not source.strip():
        raise _fail(path, f"{key}.source", "must say where the number comes from",
                    "cite a datasheet or measurement, or write 'assumption: <reasoning>'")
    # Prices may be zero (a free tier); every other figure is a physical quantity that must be > 0.
    if value < 0 or (value == 0 and not name.startswith("price_")):
        raise _fail(path, f"{key}.value", f"must be positive, got {value:g}")
    if name == "memory_budget" and value > 1:
        raise _fail(path, f"{key}.value", f"is a fraction of RAM and must be at most 1, got {value:g}")
    return Figure(value, unit, source.strip())


def load_profile(path: str | Path) -> DeviceProfile:
    """Read and validate one profile; any problem raises :class:`InputError` naming the file and key."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise InputError(f"cannot read device profile {path}: {exc.strerror or exc}",
                         "check the path") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"device profile {path} is not valid TOML: {exc}", "fix the syntax at that line") from None

    for k in data:
        if k not in TOP_KEYS + OPTIONAL_KEYS:
            raise _fail(path, k, "unknown key", f"a profile has only {', '.join(TOP_KEYS + OPTIONAL_KEYS)}")
    for k in TOP_KEYS:
        if k not in data:
            raise _fail(path, k, "missing")
    for k in ("name", "kind", "description"):
        if not isinstance(data[k], str) or not data[k].strip():
            raise _fail(path, k, f"must be a non-empty string, got {data[k]!r}")
    # The file stem is the name users type (--target NAME); a mismatch would make a profile
    # impossible to find by the name written inside it.
    if data["name"] != path.stem:
        raise _fail(path, "name", f"{data['name']!r} differs from the file name {path.stem!r}",
                    f"rename the file to {data['name']}.toml or set name = {path.stem!r}")
    if data["kind"] not in KINDS:
        raise _fail(path, "kind", f"unknown kind {data['kind']!r}", f"use one of {', '.join(KINDS)}")
    runtimes = _names(path, data, "runtimes", RUNTIMES)
    formats = _names(path, data, "formats", FORMATS)

    if not isinstance(data["figures"], dict):
        raise _fail(path, "figures", "must be a table of [figures.<name>] tables")
    figures = {name: _figure(path, name, table) for name, table in data["figures"].items()}
    required = REQUIRED + (REQUIRED_CLOUD if data["kind"] == "cloud" else ())
    for name in required:
        if name not in figures:
            raise _fail(path, f"figures.{name}", "missing required figure",
                        f"add [figures.{name}] with value, unit ({' or '.join(ALLOWED_UNITS[name])}) and source")
    if not any(name in figures for name in REQUIRED_ONE_OF):
        raise _fail(path, "figures.compute_f32", "missing required figure (or compute_f16 for a GPU/NPU)",
                    "add [figures.compute_f32] with value, unit (GFLOPS or TOPS) and source")

    measured = data.get("measured")
    if measured is not None:
        if not isinstance(measured, dict) or set(measured) != set(MEASURED_KEYS) \
                or not all(isinstance(v, str) and v.strip() for v in measured.values()):
            raise _fail(path, "measured", f"must be a table of the strings {', '.join(MEASURED_KEYS)}")
        if Path(measured["calibration"]).name != measured["calibration"]:
            raise _fail(path, "measured.calibration", "must be a file name beside the profile")
    return DeviceProfile(name=data["name"], kind=data["kind"], description=data["description"].strip(),
                         runtimes=runtimes, formats=formats, figures=figures, path=str(path), measured=measured)


def load_profiles(extra_dirs: list[str | Path] | None = None) -> dict[str, DeviceProfile]:
    """All profiles by name; later folders override earlier ones (built-in < $EDGEKIT_PROFILES < extra)."""
    builtin, *user = profile_dirs(extra_dirs)
    profiles: dict[str, DeviceProfile] = {}
    for i, d in enumerate([builtin, *user]):
        if not d.is_dir():
            if i == 0:  # a stripped-down install without data: user folders may still supply profiles
                continue
            raise InputError(f"device profile folder {d} does not exist",
                             f"fix ${ENV_VAR} or the folder passed on the command line")
        for f in sorted(d.glob("*.toml")):
            profiles[f.stem] = load_profile(f)
    return profiles


def get_profile(name: str, extra_dirs: list[str | Path] | None = None) -> DeviceProfile:
    """The profile called ``name``; a path to a ``.toml`` file is loaded directly."""
    if name.endswith(".toml") and Path(name).expanduser().is_file():
        return load_profile(Path(name).expanduser())
    profiles = load_profiles(extra_dirs)
    if name not in profiles:
        known = ", ".join(sorted(profiles)) or "none"
        raise InputError(f"unknown device profile {name!r}; known: {known}",
                         f"pick one of those, pass a .toml file, or add {name}.toml to a folder in ${ENV_VAR}")
    return profiles[name]
