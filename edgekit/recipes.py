"""Recipes: the ordered compression passes of one conversion, from a TOML file or from CLI flags.

A recipe file::

    description = "25% of MLP channels pruned and recovered, then data-aware int4"
    [[passes]]
    pass = "prune"
    mlp = 0.25
    recover = 200
    [[passes]]
    pass = "int4"

Structural passes (pruning, low-rank) come first, in that order, and exactly one storage pass (how
each tensor is kept: f16, q8_0, q4_0, int4, ternary, ...) comes last; a recipe without one is stored
as ``int4``. Unknown keys and parameters are errors, so a typo never silently does nothing.
Built-in recipes live in ``edgekit/data/recipes`` and are listed by ``edgekit recipes``.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from edgekit.errors import InputError
from edgekit.registry import PASSES

DEFAULT_STORAGE = "int4"


@dataclass
class Recipe:
    name: str
    passes: list[dict[str, Any]] = field(default_factory=list)  # [{"pass": name, **params}]
    description: str = ""

    @property
    def storage(self) -> str:
        """The last pass: how tensors are stored (the key of export-time tolerances)."""
        return self.passes[-1]["pass"]

    @property
    def structural(self) -> list[str]:
        return [p["pass"] for p in self.passes if PASSES.get(p["pass"]).structural]

    def label(self) -> str:
        def one(p: dict[str, Any]) -> str:
            args = ",".join(f"{k}={v}" for k, v in p.items() if k != "pass")
            return f"{p['pass']}({args})" if args else p["pass"]

        return "+".join(one(p) for p in self.passes)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "passes": self.passes}


def _recipes_dir() -> Path:
    return Path(str(files("edgekit") / "data" / "recipes"))


def builtin_names() -> list[str]:
    return sorted(p.stem for p in _recipes_dir().glob("*.toml"))


def check(recipe: Recipe) -> Recipe:
    """Validate pass names, parameters and order; add the default storage pass if none is given."""
    where = f"recipe '{recipe.name}'"
    if not isinstance(recipe.passes, list) or not all(isinstance(p, dict) for p in recipe.passes):
        raise InputError(f"{where}: every [[passes]] entry must be a table", "write each pass as a [[passes]] table")
    passes = [dict(p) for p in recipe.passes]
    for p in passes:
        if "pass" not in p:
            raise InputError(f"{where}: a [[passes]] entry has no 'pass' key", "name the pass, e.g. pass = \"prune\"")
        if not isinstance(p["pass"], str):
            raise InputError(f"{where}: pass = {p['pass']!r} is not a pass name", "see `edgekit plugins`")
        cls = PASSES.get(p["pass"])
        allowed = getattr(cls, "param_types", {})
        for k, v in p.items():
            if k == "pass":
                continue
            if k not in allowed:
                known = ", ".join(allowed) or "none"
                raise InputError(f"{where}: pass '{p['pass']}' has no parameter '{k}'", f"its parameters: {known}")
            want = allowed[k]
            if want is float and isinstance(v, int) and not isinstance(v, bool):
                p[k] = v = float(v)
            if not isinstance(v, want) or (want is int and isinstance(v, bool)):
                raise InputError(f"{where}: {p['pass']}.{k} must be {want.__name__}, not {v!r}", "fix the recipe")
            bounds = getattr(cls, "param_ranges", {}).get(k)
            if bounds is not None and not _within(v, *bounds):
                lo, hi, br = bounds
                raise InputError(f"{where}: {p['pass']}.{k} must be in {br[0]}{lo:g}, {hi:g}{br[1]}, not {v!r}", "fix the recipe")
    for p in passes:
        problem = PASSES.get(p["pass"]).params_problem({k: v for k, v in p.items() if k != "pass"})
        if problem:
            raise InputError(f"{where}: {problem}", "fix the recipe")
    names = [p["pass"] for p in passes]
    structural = [n for n in names if PASSES.get(n).structural]
    storage = [n for n in names if n not in structural]
    if len(storage) > 1:
        raise InputError(f"{where}: more than one storage pass ({', '.join(storage)})", "keep one, last")
    if storage and names[-1] != storage[0]:
        raise InputError(f"{where}: the storage pass '{storage[0]}' must come last", "move it to the end")
    order = [PASSES.get(n).order for n in structural]
    if order != sorted(order) or len(set(structural)) != len(structural):
        by_order = sorted({n for n in PASSES.names() if PASSES.get(n).structural}, key=lambda n: PASSES.get(n).order)
        raise InputError(f"{where}: structural passes must appear once each, in the order {' -> '.join(by_order)}",
                         "reorder the [[passes]]")
    if not storage:
        passes.append({"pass": DEFAULT_STORAGE})
    return Recipe(recipe.name, passes, recipe.description)


def _within(v: float, lo: float, hi: float, brackets: str) -> bool:
    low = lo <= v if brackets[0] == "[" else lo < v
    high = v <= hi if brackets[1] == "]" else v < hi
    return bool(low and high)  # NaN is within nothing


def load(name_or_path: str) -> Recipe:
    """A built-in recipe by name, or a TOML file."""
    p = Path(name_or_path)
    if not p.suffix and name_or_path in builtin_names():
        p = _recipes_dir() / f"{name_or_path}.toml"
    if not p.is_file():
        raise InputError(f"no recipe '{name_or_path}'", f"pass a TOML file or one of: {', '.join(builtin_names())}")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"recipe {p} is not valid TOML ({exc})", "fix the file") from None
    unknown = set(data) - {"description", "passes"}
    if unknown:
        raise InputError(f"recipe {p}: unknown keys {sorted(unknown)}", "a recipe has only 'description' and [[passes]]")
    if not isinstance(data.get("passes"), list) or not data["passes"]:
        raise InputError(f"recipe {p} has no [[passes]]", "add at least one [[passes]] table")
    return check(Recipe(p.stem, data["passes"], str(data.get("description", ""))))


def from_flags(quant: str | None = None, prune: float | None = None, prune_heads: float | None = None,
               rank: float | None = None, rank_method: str | None = None, recover: int | None = None,
               uniform: bool | None = None, storage_params: dict[str, Any] | None = None) -> Recipe:
    """``--prune 0.3 --rank 0.5 --quant int4 --recover 200`` as a recipe (recover applies to prune and ternary)."""
    passes: list[dict[str, Any]] = []
    if prune or prune_heads:
        p: dict[str, Any] = {"pass": "prune"}
        if prune:
            p["mlp"] = float(prune)
        if prune_heads:
            p["heads"] = float(prune_heads)
        if recover:
            p["recover"] = int(recover)
        if uniform is not None:
            p["uniform"] = bool(uniform)
        passes.append(p)
    if rank:
        p = {"pass": "lowrank", "rank": float(rank)}
        if rank_method:
            p["method"] = rank_method
        passes.append(p)
    q: dict[str, Any] = {"pass": quant or DEFAULT_STORAGE, **(storage_params or {})}
    if recover and q["pass"] == "ternary":
        q["recover"] = int(recover)
    passes.append(q)
    return check(Recipe("flags", passes))
