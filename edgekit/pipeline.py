"""``edgekit convert`` as named steps, for decoders and encoders alike:

    resolve source -> float reference -> passes -> export -> validate -> manifest

Every step asks a declared contract instead of probing: the source's architecture gives the model
kind (:mod:`edgekit.kinds` then gives the calibration data, quality metric and check), each pass
declares the kinds it compresses, whether it is structural, its tolerance and its warnings
(:class:`edgekit.passes.Pass`), the exporter declares what it can hold
(:class:`edgekit.contracts.Exporter`), and its runtime whether it runs here
(:class:`edgekit.contracts.Runtime`). The manifest is one typed object (:class:`edgekit.manifest.Manifest`).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgekit.atomic import atomic_output_dir, check_output_dir
from edgekit.cache import model_bytes, tree_bytes
from edgekit.errors import EdgekitError
from edgekit.kinds import KINDS, Texts
from edgekit.manifest import Manifest
from edgekit.passes import PassContext
from edgekit.registry import EXPORTERS, PASSES, RUNTIMES
from edgekit.sources import load_reference, resolve


@dataclass
class ConvertRequest:
    """Everything ``edgekit convert`` takes; the CLI fills one from its flags."""

    model: str | None = None  # a source: None (the embedded default), a .gguf, an HF directory, "minilm"
    format: str = "gguf"
    quant: str | None = None  # the storage pass when no recipe is given (default int4, or the plan's choice)
    out: str | Path = "out"
    force: bool = False
    recipe: Any = None  # an edgekit.recipes.Recipe: ordered passes
    target: str | None = None  # a device profile: the plan chooses the recipe under its memory budget
    limits: dict[str, Any] = field(default_factory=dict)  # max_latency_ms, min_tok_s, max_kld, min_top1
    profile_dirs: list[str] | None = None
    eval_text: str | None = None
    calib_text: str | None = None
    calib_tokens: int = 4096
    # tokens the float model writes itself for calibration (edgekit.calibration; default $EDGEKIT_CALIB_GENERATED or 12288)
    calib_generated: int | None = None
    eval_tokens: int = 4096
    # overrides of the storage pass's tolerance, e.g. {"kld_mean": 0.1}
    tolerance: dict[str, float] | None = None
    exporter_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"accuracy_level": 4} for ONNX
    progress: Callable[[str, int, int], None] = lambda d, a, b: None
    log: Callable[[str], None] = lambda s: None


def convert(request: ConvertRequest) -> dict[str, Any]:
    """Convert ``request.model`` and write ``request.out/`` (artifact + manifest.json) atomically.

    Returns the manifest as written. Nothing is left at ``out`` when any step fails.
    """
    r = request
    out = Path(r.out)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    # cheap checks first: a bad flag, an occupied output or a recipe the format cannot hold fails
    # before minutes of work
    check_output_dir(out, r.force)
    source = resolve(r.model)
    recipe, fmt, profile = _initial_recipe(r)
    exporter = EXPORTERS.get(fmt)(**r.exporter_options)
    _check_recipe(recipe, exporter, source.model_kind, fmt)

    t0 = time.perf_counter()
    r.log(f"reading {source.path.name} ({source.model_kind}; float reference)")
    reference = load_reference(source, r.progress)
    timings["reference_s"] = time.perf_counter() - t0
    from edgekit.calibration import default_tokens

    generated = default_tokens() if r.calib_generated is None else r.calib_generated
    texts = Texts(r.eval_text, r.calib_text, r.calib_tokens, r.eval_tokens, generated)
    kind = KINDS[source.model_kind](source, texts)

    the_plan = None
    if profile is not None:
        recipe, exporter, the_plan = _plan(r, reference, source, profile, recipe, exporter)
        fmt = exporter.name
    storage = PASSES.get(recipe.storage)

    work = _working_copy(reference)
    t0 = time.perf_counter()
    records = run_passes(recipe, work, reference, kind, exporter, r)
    timings["pass_s"] = time.perf_counter() - t0
    reason = exporter.supports(work)
    if reason:
        raise EdgekitError(f"the {fmt} format cannot hold this recipe: {reason}", "choose another --format")

    with atomic_output_dir(out, r.force) as stage:
        t0 = time.perf_counter()
        r.log(f"writing {exporter.filename}")
        export_info = exporter.export(work, stage)
        timings["export_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        r.log("validating against the float reference")
        tolerance = dict(storage.tolerance) | (r.tolerance or {})
        expected = records[-1].get("quality_after") if _tracked(recipe) else None
        quality, validation = validate_artifact(stage / exporter.filename, exporter, kind, reference, tolerance,
                                                expected, r.progress)
        timings["validate_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - t_all
        bits = export_info.pop("bits_per_weight", None) or weight_bits(stage, exporter, work)
        manifest = Manifest(
            artifact={"format": fmt, "file": exporter.filename, "runtime": exporter.runtime, **export_info}
            | ({"weights_bpw": round(work.weights_bpw(), 4)} if hasattr(work, "weights_bpw") else {}),
            source=source.describe(),
            model=reference.describe() | {"kind": source.model_kind, "parameters_after_passes": work.num_parameters()}
            | ({"spec_after_passes": work.spec.to_dict()} if hasattr(work, "spec") else {}),
            recipe={"name": recipe.name, "label": recipe.label(), "quant": recipe.storage, "passes": records,
                    "calibration": dict(texts.calibration_info) or None},
            # everything a runtime needs (weights, external data, tokenizer), not only the main file
            size_bytes=tree_bytes(stage),
            bits_per_weight=bits,
            quality=quality, validation=validation, timings_s=timings, plan=the_plan,
            warnings=recipe_warnings(recipe, records, quality, r.log),
        )
        written = manifest.write(stage)
    if source.model_kind == "decoder" and len(recipe.passes) == 1 and quality is not None:
        from edgekit.targets.plan import record_quality  # the target planner's ledger of storage recipes

        record_quality(source.sha256, recipe.storage, fmt, quality, manifest.size_bytes)
    return written


# ---------------------------------------------------------------- steps


def _initial_recipe(r: ConvertRequest):
    """(recipe, format, device profile or None) from the request, before anything is read."""
    from edgekit.recipes import Recipe

    profile = None
    if r.target:
        from edgekit.targets.profiles import get_profile

        if r.recipe is not None:
            raise EdgekitError("--target plans a storage recipe itself; it does not combine with pruning/low-rank recipes",
                               "drop --target, or the recipe flags")
        profile = get_profile(r.target, r.profile_dirs)
    if r.recipe is not None:
        return r.recipe, r.format, profile
    quant = r.quant or ("int4" if profile is None else None)
    if quant is not None:
        PASSES.get(quant)
    return Recipe(quant or "(planned)", [{"pass": quant}] if quant else []), r.format, profile


def _check_recipe(recipe, exporter, model_kind: str, fmt: str) -> None:
    """Every pass must compress this kind of model, and the format must hold what the recipe makes."""
    structural = set()
    for spec in recipe.passes:
        cls = PASSES.get(spec["pass"])
        if model_kind not in cls.kinds:
            raise EdgekitError(f"the {spec['pass']} pass compresses {' and '.join(sorted(cls.kinds))}s, not {model_kind}s",
                               f"choose a storage recipe for {model_kind}s (--quant)")
        if cls.structural:
            structural.add(spec["pass"])
    storage = recipe.passes[-1] if recipe.passes else None
    storage_pass = PASSES.get(storage["pass"])(**{k: v for k, v in storage.items() if k != "pass"}) if storage else None
    codebook = storage_pass.grid_codebook() if storage_pass else None
    block = storage_pass.block_size() if storage_pass else None
    if block and block not in exporter.capabilities.blocks:
        able = [n for n in EXPORTERS.names() if block in EXPORTERS.get(n).capabilities.blocks]
        raise EdgekitError(f"the {fmt} format holds {storage['pass']} weights in blocks of "
                           f"{', '.join(map(str, sorted(exporter.capabilities.blocks)))}, not {block}",
                           ("use " + ", ".join(f"--format {n}" for n in able)) if able else "drop the block parameter")
    if codebook and codebook not in exporter.capabilities.codebooks:
        able = [n for n in EXPORTERS.names() if codebook in EXPORTERS.get(n).capabilities.codebooks]
        raise EdgekitError(f"the {fmt} format holds only uniform integer grids, not {storage['pass']}'s {codebook} "
                           "codebook", ("use " + ", ".join(f"--format {n}" for n in able)) if able
                           else "choose a uniform grid (int4)")
    why = exporter.capabilities.refusal(model_kind, structural, fmt)
    if why:
        able = [n for n in EXPORTERS.names() if n != fmt and model_kind in EXPORTERS.get(n).capabilities.kinds
                and EXPORTERS.get(n).capabilities.refusal(model_kind, structural, n) is None]
        raise EdgekitError(why, "formats that hold it: " + ", ".join(f"--format {n}" for n in able) if able
                           else "drop the recipe flags it cannot hold")


def _plan(r: ConvertRequest, reference, source, profile, recipe, exporter):
    """The device plan: the recipe (and format) that fits the target under the user's limits."""
    from edgekit.recipes import Recipe
    from edgekit.targets.plan import plan

    if source.model_kind != "decoder":
        raise EdgekitError("--target plans are for decoders", "drop --target and choose --quant")
    the_plan = plan(reference, source.sha256, profile, **(r.limits or {}))
    if not recipe.passes:
        quant, fmt = the_plan["winner"]["quant"], the_plan["winner"]["format"]
        exporter = EXPORTERS.get(fmt)(**r.exporter_options)
        recipe = Recipe(quant, [{"pass": quant}])
    else:
        quant, fmt = recipe.storage, exporter.name
        mine = next((c for c in the_plan["candidates"] if c["quant"] == quant and c["format"] == fmt), None)
        if mine is None or not mine["fits"]:
            why = "; ".join(mine["why_not"]) if mine else f"{fmt} is not a format {profile.name} runs"
            raise EdgekitError(f"--quant {quant} does not fit {profile.name}: {why}", "drop --quant to let the plan choose")
        the_plan["winner"], the_plan["why"] = {"quant": quant, "format": fmt}, "chosen by --quant"
    r.log(f"plan for {profile.name}: {quant} as {fmt} ({the_plan['why']})")
    return recipe, exporter, the_plan


def _working_copy(reference):
    """A copy whose tensor dict and encodings passes may change; the float arrays are shared (read-only)."""
    work = copy.copy(reference)
    work.tensors, work.encodings = dict(reference.tensors), dict(reference.encodings)
    for attr in ("tokenizer", "config"):
        if hasattr(work, attr):
            setattr(work, attr, copy.deepcopy(getattr(reference, attr)))
    return work


def _tracked(recipe) -> bool:
    """Quality after each pass (in torch) when the artifact is meant to differ from the reference: a
    single storage pass is measured by the artifact itself."""
    return len(recipe.passes) > 1 or any(PASSES.get(p["pass"]).structural for p in recipe.passes) \
        or recipe.storage == "ternary" or PASSES.get(recipe.storage).trains


def run_passes(recipe, work, reference, kind, exporter, r: ConvertRequest) -> list[dict[str, Any]]:
    calib: dict[str, Any] = {}

    def calibration() -> list[list[int]]:
        if "seqs" not in calib:
            calib["seqs"] = kind.calibration(reference, r.progress)
        return calib["seqs"]

    ctx = PassContext(calibration_tokens=calibration, progress=r.progress, reference=reference, log=r.log,
                      options={"per_layer_widths": exporter.capabilities.per_layer_widths,
                               "mixed_bits": tuple(sorted(exporter.capabilities.mixed_bits)),
                               "blocks": tuple(sorted(exporter.capabilities.blocks)), "format": exporter.name})
    track = _tracked(recipe)
    records = []
    for spec in recipe.passes:
        pass_cls = PASSES.get(spec["pass"])
        r.log(f"pass {spec['pass']}: {pass_cls.description}")
        t1 = time.perf_counter()
        record = pass_cls(**{k: v for k, v in spec.items() if k != "pass"}).apply(work, ctx)
        record["seconds"] = round(time.perf_counter() - t1, 1)
        if track:
            record["quality_after"] = q = kind.torch_quality(work, reference, r.progress)
            r.log("  after " + spec["pass"] + ": " + ", ".join(f"{k} {v:.4g}" for k, v in q.items()
                                                               if isinstance(v, float)))
        records.append(record)
    return records


def validate_artifact(artifact: Path, exporter, kind, reference, tolerance: dict[str, float],
                      expected: dict[str, Any] | None, progress) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(quality, validation) of the written artifact, run by its own runtime.

    A runtime that cannot run on this host (Core ML off macOS) still checks what it can (a decoder's
    tokenizer); the exporter has checked the rest (Core ML: weights read back bit for bit).
    """
    runtime = RUNTIMES.get(exporter.runtime)
    unavailable = runtime.unavailable_reason()
    if unavailable and kind.name != "decoder":
        return None, {"passed": None, "why": unavailable}
    with runtime.open(artifact, **({"vocab_only": True} if unavailable else {})) as session:
        kind.check_session(session, exporter.filename)
        if unavailable:
            return None, {"passed": None, "why": unavailable}
        quality = kind.quality(session, reference, progress)
    return quality, kind.validate(quality, tolerance, exporter.filename, expected)


def recipe_warnings(recipe, records: list[dict[str, Any]], quality: dict[str, Any] | None,
                    log: Callable[[str], None]) -> list[str]:
    """Each pass's own warnings, on the artifact's quality (or, where it cannot run here, the same
    numbers measured in torch)."""
    out = []
    for spec, record in zip(recipe.passes, records):
        seen = quality if quality is not None else record.get("quality_after")
        if seen is not None:
            out += PASSES.get(spec["pass"])(**{k: v for k, v in spec.items() if k != "pass"}).warnings(record, seen)
    for w in out:
        log(f"[bold red]WARNING[/bold red]: {w}")
    return out


def weight_bits(stage: Path, exporter, model) -> float:
    """Bits per parameter of what holds the weights (the model file and its external data)."""
    return 8 * model_bytes(stage / exporter.filename) / max(1, model.num_parameters())
