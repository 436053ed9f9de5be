"""``edgekit convert``: source -> float reference -> compression pass -> exporter -> validated artifact."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Callable

from edgekit.atomic import atomic_output_dir, check_output_dir
from edgekit.cache import sha256_file
from edgekit.errors import EdgekitError, ValidationError
from edgekit.harness.quality import EvalConfig, default_text_path, read_text, windows
from edgekit.manifest import write_manifest
from edgekit.model import Model
from edgekit.passes import PassContext
from edgekit.registry import EXPORTERS, PASSES, RUNTIMES
from edgekit.sources import Source, load_reference, resolve

# Export-time validation: the artifact's logits against the float reference on the evaluation text.
# A correct export lands far inside these; a broken one (wrong layout, wrong scales) lands far outside.
# Mean KL divergence is the criterion: top-1 agreement depends on how peaked the model's
# distributions are (a random tiny model's near-flat ones flip their argmax under any rounding).
TOLERANCES: dict[str, dict[str, float]] = {
    "f32": {"kld_mean": 1e-3},
    "f16": {"kld_mean": 5e-3},
    "q8_0": {"kld_mean": 2e-2},
    "fp32": {"kld_mean": 1e-3},
    "fp16": {"kld_mean": 5e-3},
    "int8": {"kld_mean": 2e-2},
    "q4_0": {"kld_mean": 0.6},
    "int4": {"kld_mean": 0.6},
}
DEFAULT_TOLERANCE = {"kld_mean": 1.0}
# after structural passes: |KLD(artifact) - KLD(torch, same numbers)| <= ABS + REL * KLD(torch)
CONSISTENCY_ABS, CONSISTENCY_REL = 0.03, 0.15


def torch_quality(model: Model, tokenize, reference: Model, reference_id: str, text: str, label: str,
                  eval_tokens: int, progress) -> dict[str, Any]:
    """Quality of ``model`` as the passes left it (dequantized weights), computed in torch."""
    from edgekit.evaluate import measure_quality
    from edgekit.architectures.torch_decoder import TorchSession

    q = measure_quality(TorchSession(model, tokenize), reference, reference_id, text, label,
                        EvalConfig(max_tokens=eval_tokens), progress)
    return {k: q[k] for k in ("ppl", "ref_ppl", "kld_mean", "kld_p99", "top1_agreement") if k in q}


def recipe_warnings(records: list[dict[str, Any]], quality: dict[str, Any]) -> list[str]:
    """Loud warnings a user must see (a ternary model without recovery is usually broken)."""
    from edgekit.passes.ternary import BROKEN_KLD

    out = []
    for r in records:
        if r.get("pass") == "ternary" and quality["kld_mean"] > BROKEN_KLD:
            how = "even with recovery" if r.get("recovery") else "without recovery"
            out.append(f"ternary {how}: mean KLD {quality['kld_mean']:.2f} > {BROKEN_KLD} (perplexity {quality['ppl']:.1f} "
                       f"vs {quality.get('ref_ppl', float('nan')):.1f}): this model is broken; "
                       + ("add --recover STEPS" if not r.get("recovery") else "recover longer"))
    return out


def source_tokenizer(source: Source) -> Callable[[str], list[int]]:
    """The source's own tokenizer, for calibration text and for checking the artifact's tokenizer."""
    if source.gguf_file is not None:
        from edgekit.runtimes.llamacpp import LlamaCppSession

        return LlamaCppSession(source.gguf_file, vocab_only=True).tokenize
    from tokenizers import Tokenizer

    if (source.path / "tokenizer.json").exists():
        tok = Tokenizer.from_file(str(source.path / "tokenizer.json"))
    else:  # only a SentencePiece tokenizer.model: transformers builds the fast tokenizer from it
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(source.path), use_fast=True).backend_tokenizer
    return lambda text: tok.encode(text, add_special_tokens=False).ids


def calibration_sequences(tokenize: Callable[[str], list[int]], text: str, n_tokens: int, ctx: int = 512) -> list[list[int]]:
    ids = tokenize(text)[:n_tokens]
    return [ids[i : i + ctx] for i in range(0, len(ids), ctx) if len(ids[i : i + ctx]) >= 32]


def validate(quant: str, quality: dict[str, Any], artifact: str, expected: dict[str, Any] | None = None) -> dict[str, Any]:
    """The artifact must compute what the passes decided.

    For a single storage pass the artifact is compared with the float reference under a per-quant
    tolerance. After pruning / low-rank / ternary the model is meant to differ from the reference, so
    the artifact's KLD must instead match the KLD of the same compressed model computed in torch
    (``expected``): a packing error shows up as a gap between the two.
    """
    if expected is not None:
        gap = abs(quality["kld_mean"] - expected["kld_mean"])
        tol = CONSISTENCY_ABS + CONSISTENCY_REL * expected["kld_mean"]
        if gap > tol:
            raise ValidationError(artifact, "logits: |mean KLD of the artifact - mean KLD of the compressed model in torch|",
                                  gap, tol, f"artifact {quality['kld_mean']:.4f} vs torch {expected['kld_mean']:.4f}")
        return {"passed": True, "criterion": "consistency with the compressed model computed in torch",
                "kld_gap": gap, "tolerance": {"kld_gap": tol}}
    tol = TOLERANCES.get(quant, DEFAULT_TOLERANCE)
    if quality["kld_mean"] > tol["kld_mean"]:
        raise ValidationError(artifact, "logits: mean KL divergence from the reference", quality["kld_mean"], tol["kld_mean"],
                              f"p99 {quality['kld_p99']:.3g}, top-1 agreement {quality['top1_agreement']:.1%}")
    return {"passed": True, "tolerance": tol}


def convert(model: str | None = None, format: str = "gguf", quant: str | None = "int4", out: str | Path = "out",
            force: bool = False, eval_text: str | None = None, calib_text: str | None = None,
            calib_tokens: int = 4096, eval_tokens: int = 4096,
            progress: Callable[[str, int, int], None] = lambda d, a, b: None,
            log: Callable[[str], None] = lambda s: None, target: str | None = None,
            limits: dict[str, Any] | None = None, profile_dirs: list[str] | None = None,
            recipe: "Recipe | None" = None) -> dict[str, Any]:
    """Convert ``model`` and write ``out/`` (artifact + manifest.json) atomically. Returns the manifest.

    ``recipe`` (see :mod:`edgekit.recipes`) gives the ordered passes; without it the recipe is the
    single storage pass ``quant``.

    With ``target`` (a device profile), the recipe is chosen by :func:`edgekit.targets.plan.plan` under
    the device's memory budget and the user's ``limits`` (max_latency_ms, min_tok_s, max_kld, min_top1).
    """
    from edgekit.encoder import is_encoder

    if is_encoder(model):  # BERT sentence encoders: their own recipes, exporter and cosine validation
        if recipe is not None and (len(recipe.passes) > 1 or recipe.structural):
            raise EdgekitError("pruning / low-rank / recovery recipes are implemented for decoders, not encoders",
                               "convert the encoder with --quant only")
        if format == "coreml":
            from edgekit.converters.coreml_encoder import convert_encoder
        else:
            from edgekit.converters.onnx_encoder import convert_encoder

        return convert_encoder(model, format, quant, out, force, eval_text, calib_text, progress, log, target=target)
    out = Path(out)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    # cheap checks first: a bad flag or an occupied output fails before minutes of work
    check_output_dir(out, force)
    profile = None
    if target:
        from edgekit.targets.profiles import get_profile

        profile = get_profile(target, profile_dirs)
    elif quant is None:
        quant = "int4"
    exporter = EXPORTERS.get(format)()
    if recipe is not None:
        if target:
            raise EdgekitError("--target plans a storage recipe itself; it does not combine with pruning/low-rank recipes",
                               "drop --target, or the recipe flags")
        quant = recipe.storage
        if "lowrank" in recipe.structural and not getattr(exporter, "supports_lowrank", True):
            raise EdgekitError(f"the {format} format cannot hold low-rank (factorized) layers",
                               "use --format onnx (two MatMuls per layer) or drop --rank")
    if quant is not None:
        PASSES.get(quant)
    source = resolve(model)

    t0 = time.perf_counter()
    log(f"reading {source.path.name} (float reference, cached after the first run)")
    reference = load_reference(source, progress)
    timings["reference_s"] = time.perf_counter() - t0

    the_plan = None
    if profile is not None:
        from edgekit.targets.plan import plan

        the_plan = plan(reference, source.sha256, profile, **(limits or {}))
        if quant is None:
            quant, format = the_plan["winner"]["quant"], the_plan["winner"]["format"]
            exporter = EXPORTERS.get(format)()
        else:
            mine = next((c for c in the_plan["candidates"] if c["quant"] == quant and c["format"] == format), None)
            if mine is None or not mine["fits"]:
                why = "; ".join(mine["why_not"]) if mine else f"{format} is not a format {profile.name} runs"
                raise EdgekitError(f"--quant {quant} does not fit {profile.name}: {why}",
                                   "drop --quant to let the plan choose")
            the_plan["winner"], the_plan["why"] = {"quant": quant, "format": format}, "chosen by --quant"
        log(f"plan for {profile.name}: {quant} ({the_plan['why']})")
    if recipe is None:
        from edgekit.recipes import Recipe

        recipe = Recipe(quant, [{"pass": quant}])

    work = Model(reference.spec, dict(reference.tensors), copy.deepcopy(reference.tokenizer), reference.name)
    tokenize = source_tokenizer(source)
    calib_body, calib_label = read_text(calib_text, "calibration")
    calib_info: dict[str, Any] = {}

    def calib() -> list[list[int]]:
        if "seqs" not in calib_info:
            seqs = calibration_sequences(tokenize, calib_body, calib_tokens)
            calib_info.update({"text": calib_label, "tokens": sum(map(len, seqs)), "seqs": seqs})
        return calib_info["seqs"]

    eval_body, eval_label = read_text(eval_text, "eval")
    ctx = PassContext(calibration_tokens=calib, progress=progress, reference=reference, log=log,
                      options={"per_layer_widths": getattr(exporter, "per_layer_widths", False)})
    # quality after each pass (in torch, on the model as the passes left it) shows what each pass cost;
    # a single storage pass is measured by the artifact itself
    track = len(recipe.passes) > 1 or bool(recipe.structural) or quant == "ternary"
    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for spec in recipe.passes:
        pass_cls = PASSES.get(spec["pass"])
        params = {k: v for k, v in spec.items() if k != "pass"}
        log(f"pass {spec['pass']}: {pass_cls.description}")
        t1 = time.perf_counter()
        record = pass_cls(**params).apply(work, ctx)
        record["seconds"] = round(time.perf_counter() - t1, 1)
        if track:
            record["quality_after"] = torch_quality(work, tokenize, reference, source.sha256, eval_body, eval_label,
                                                    eval_tokens, progress)
            q = record["quality_after"]
            log(f"  after {spec['pass']}: ppl {q['ppl']:.3f}, mean KLD {q['kld_mean']:.4f}, top-1 {q['top1_agreement']:.1%}")
        records.append(record)
    timings["pass_s"] = time.perf_counter() - t0
    reason = exporter.supports(work)
    if reason:
        raise EdgekitError(f"the {format} format cannot hold this recipe: {reason}", "choose another --format")

    with atomic_output_dir(out, force) as stage:
        t0 = time.perf_counter()
        log(f"writing {exporter.filename}")
        export_info = exporter.export(work, stage)
        timings["export_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        log("validating against the float reference")
        artifact = stage / exporter.filename
        from edgekit.evaluate import measure_quality

        # a runtime that cannot run on this OS (Core ML off macOS) still checks the tokenizer; the
        # exporter has checked what it could (Core ML: weights read back bit for bit)
        runtime_cls = RUNTIMES.get(exporter.runtime)
        unavailable = getattr(runtime_cls, "unavailable_reason", lambda: None)()
        with runtime_cls.open(artifact, **({"vocab_only": True} if unavailable else {})) as session:
            check_tokenizer(session, tokenize, eval_body, exporter.filename)
            quality = None if unavailable else measure_quality(
                session, reference, source.sha256, eval_body, eval_label, EvalConfig(max_tokens=eval_tokens), progress)
        validation = {"passed": None, "why": unavailable} if unavailable else validate(
            quant, quality, exporter.filename, records[-1]["quality_after"] if track else None)
        timings["validate_s"] = time.perf_counter() - t0
        from edgekit.converters.gguf_layout import gguf_weight_stats

        stats = gguf_weight_stats(artifact) if format == "gguf" else {}
        timings["total_s"] = time.perf_counter() - t_all
        manifest = {
            "artifact": {"format": format, "file": exporter.filename, "runtime": exporter.runtime, **export_info},
            "source": source.describe(),
            "model": {"name": reference.name, "architecture": reference.spec.arch,
                      "parameters": reference.num_parameters(), "spec": reference.spec.to_dict(),
                      # after pruning / low-rank: what the artifact really holds
                      "parameters_after_passes": work.num_parameters(), "spec_after_passes": work.spec.to_dict()},
            "recipe": {"name": recipe.name, "label": recipe.label(), "quant": quant, "passes": records,
                       "calibration": {k: v for k, v in calib_info.items() if k != "seqs"} or None},
            # everything a runtime needs (weights, external data, tokenizer), not only the main file
            "size_bytes": tree_bytes(stage),
            "bits_per_weight": stats.get("bits_per_weight") or weight_file_bits(stage, exporter.filename, work),
            "quality": quality,
            "validation": validation,
            "timings_s": timings,
        }
        if the_plan is not None:
            manifest["plan"] = the_plan
        # where the artifact cannot run here, the same numbers measured in torch still reveal a broken model
        seen = quality if quality is not None else (records[-1].get("quality_after") if records else None)
        warnings = recipe_warnings(records, seen) if seen is not None else []
        for w in warnings:
            log(f"[bold red]WARNING[/bold red]: {w}")
        if warnings:
            manifest["warnings"] = warnings
        write_manifest(stage, manifest)
    from edgekit.targets.plan import record_quality

    if len(recipe.passes) == 1 and quality is not None:  # the target planner's ledger holds storage recipes only
        record_quality(source.sha256, quant, format, quality, manifest["size_bytes"])
    return manifest


def weight_file_bits(stage: Path, filename: str, model: Model) -> float:
    """Bits per parameter of the file(s) holding the weights (the model file and its external data)."""
    files = [p for p in stage.iterdir() if p.name.startswith(filename)]
    return 8 * sum(tree_bytes(p) for p in files) / max(1, model.num_parameters())


def tree_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a directory (an .mlpackage is a directory)."""
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def check_tokenizer(session: Any, tokenize: Callable[[str], list[int]], text: str, artifact: str) -> None:
    """The artifact must tokenize exactly like its source, or every quality figure would be meaningless."""
    got, want = session.tokenize(text), tokenize(text)
    if got != want:
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise ValidationError(artifact, "tokenization of the evaluation text: first differing token at", first, 0,
                              f"{len(got)} tokens vs {len(want)} from the source tokenizer")
