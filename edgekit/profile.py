"""``edgekit profile``: speed and memory in a clean process, quality against the float reference or another artifact."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edgekit.cache import model_bytes
from edgekit.errors import EdgekitError, InputError
from edgekit.harness.quality import EvalConfig, read_text
from edgekit.harness.speed import SpeedConfig, measure
from edgekit.session import resolve_artifact


def host_info() -> dict[str, Any]:
    import psutil

    return {"machine": platform.machine(), "system": platform.system(), "python": platform.python_version(),
            "cores_logical": psutil.cpu_count(), "cores_physical": psutil.cpu_count(logical=False),
            "ram_bytes": psutil.virtual_memory().total, "processor": platform.processor() or None}


# --reference names either a source model (its float32 version is the reference, run in torch) or
# another artifact (its own runtime is the reference, e.g. the user's f16 GGUF of a model edgekit
# cannot convert). A directory with manifest.json is an artifact, a directory with config.json a
# source; a .gguf file can be either: it is a float source when edgekit reads its architecture,
# otherwise an artifact, and the report records which and why.
REFERENCE_HINT = ("pass --reference a source model (Hugging Face directory, .gguf, 'smollm2-135m') "
                  "or another artifact (a .gguf file or an `edgekit convert` directory), e.g. the f16 GGUF")
SKIP_HINT = "pass --reference with the source model or another artifact of it (e.g. its f16 GGUF)"


@dataclass
class Reference:
    """What quality is measured against."""

    kind: str  # "artifact", or the Source kind ("default", "gguf", "hf") of a float reference
    path: Path  # the model file (artifact) or the source path
    sha256: str
    source: Any = None  # the Source while a float reference is (still) intended
    opens: Path | None = None  # what edgekit.load opens (artifact directory or file), when a runtime can
    runtime: str | None = None
    why: str | None = None  # why a .gguf became an artifact reference instead of a float one
    ids: list[int] | None = None  # evaluation tokens, from the reference's own tokenizer (artifact references)
    token_note: str | None = None
    gguf_arch: str | None = None  # general.architecture, as llama.cpp read it

    def describe(self) -> dict[str, Any]:
        out = {"kind": self.kind, "path": str(self.path), "sha256": self.sha256}
        if self.kind == "artifact":
            out["runtime"] = self.runtime
        if self.why:
            out["why"] = self.why
        return out

    def as_artifact(self, why: str | None) -> "Reference":
        return Reference("artifact", self.path, self.sha256, opens=self.opens, runtime="llamacpp", why=why,
                         ids=self.ids, token_note=self.token_note, gguf_arch=self.gguf_arch)


def _content_sha256(file: Path) -> str:
    """The artifact's identity: a GGUF is one file; other formats spread over their directory
    (ONNX external data, tokenizer.json), hashed together without the manifest."""
    from edgekit.cache import sha256_file, sha256_files
    from edgekit.manifest import MANIFEST

    if file.is_file() and file.suffix.lower() == ".gguf":
        return sha256_file(file)
    folder = file if file.is_dir() else file.parent
    return sha256_files([q for q in folder.rglob("*") if q.is_file() and q.name != MANIFEST])


def _artifact_reference(path: Path) -> Reference:
    from edgekit.session import runtime_for, runtime_of

    file, runtime, _ = resolve_artifact(path)
    name = runtime or runtime_for(file)
    if name is None:
        raise InputError(f"--reference {path}: no runtime opens {file.name}", REFERENCE_HINT)
    rt = runtime_of(file, name)
    if rt.kind(file) == "encoder":
        raise InputError(f"--reference {path} is an encoder artifact", "a decoder's reference must be a decoder of the same model")
    why = rt.unavailable_reason()
    if why:
        raise InputError(f"--reference {path} cannot run here ({why})", "pass a reference this machine can run")
    return Reference("artifact", file, _content_sha256(file), opens=path, runtime=name)


def _explicit_reference(reference: str) -> Reference:
    """Classify --reference before anything is measured, so a bad one fails in one line at once."""
    from edgekit.manifest import MANIFEST
    from edgekit.sources import DEFAULT_MODEL, resolve

    if reference in ("", "default", DEFAULT_MODEL):
        src = resolve(reference)
        return Reference(src.kind, src.path, src.sha256, source=src, opens=src.gguf_file, runtime="llamacpp")
    p = Path(reference).expanduser()
    if not p.exists():
        raise InputError(f"--reference {p} does not exist", REFERENCE_HINT)
    if p.is_dir() and (p / MANIFEST).exists():
        return _artifact_reference(p)
    if p.is_dir() and (p / "config.json").exists():
        src = resolve(str(p))
        return Reference(src.kind, src.path, src.sha256, source=src)
    if p.is_file() and p.suffix.lower() == ".gguf":  # float source if edgekit reads it, else an artifact
        src = resolve(str(p))
        return Reference(src.kind, src.path, src.sha256, source=src, opens=p, runtime="llamacpp")
    return _artifact_reference(p)


def _manifest_reference(manifest: dict | None) -> tuple[Reference | None, str | None]:
    from edgekit.sources import resolve

    if not manifest:
        return None, f"skipped: no manifest and no --reference; {SKIP_HINT}"
    src = manifest["source"]
    try:
        source = resolve(None if src["kind"] == "default" else src["path"])
    except InputError as exc:
        return None, f"skipped: the source model is not available ({exc.message}); pass --reference"
    if source.sha256 != src["sha256"]:
        return None, f"skipped: the source at {source.path} changed since export (hash differs); pass --reference"
    ref = Reference(source.kind, source.path, source.sha256, source=source)
    if source.gguf_file is not None:
        ref.opens, ref.runtime = source.path, "llamacpp"
    return ref, None


def _float_reference(ref: Reference, progress):
    """(float model, None) or (None, why no float reference can be built)."""
    import importlib.util

    from edgekit.errors import UnsupportedArchitectureError
    from edgekit.sources import load_reference

    missing = [m for m in ("torch", "safetensors") if importlib.util.find_spec(m) is None]
    if missing:
        return None, f"the float reference needs {' and '.join(missing)} (pip install 'edgekit-ml[convert]')"
    try:
        if ref.gguf_arch:  # known from llama.cpp's header read: skip a slow Python parse of the whole header
            from edgekit.architectures import for_gguf_arch

            for_gguf_arch(ref.gguf_arch, ref.path.name)
        return load_reference(ref.source, progress), None
    except UnsupportedArchitectureError as exc:
        return None, f"no float reference: {exc.message}"
    except InputError as exc:
        if ref.opens is None:  # a broken Hugging Face directory stays an error
            raise
        # a GGUF edgekit cannot dequantize (e.g. i-quants) still runs in llama.cpp
        return None, f"no float reference: {exc.message}"


def _reference_tokens(file: Path, ref: Reference, text: str) -> None:
    """Tokenize the evaluation text with the reference's tokenizer (both models then score the same
    ids) and check the artifact's tokenizer: a different vocabulary is bad input, a different split
    of the same text is noted."""
    import edgekit
    from edgekit.harness.quality import tokenizer_agreement

    if ref.ids is not None:
        return
    with edgekit.load(ref.opens, vocab_only=True) as rs:  # a corrupt reference fails here, in one line
        ref_ids, ref_vocab = rs.tokenize(text), getattr(rs, "n_vocab", None)
        ref.gguf_arch = (getattr(getattr(rs, "_llm", None), "metadata", None) or {}).get("general.architecture")
    with edgekit.load(file, vocab_only=True) as s:
        ids, vocab = s.tokenize(text), getattr(s, "n_vocab", None)
    if ref_vocab and vocab and ref_vocab != vocab:
        raise InputError(f"the reference {ref.path.name} has a vocabulary of {ref_vocab} tokens and the artifact {vocab}",
                         "pass a reference of the same model (same tokenizer)")
    ref.ids, ref.token_note = ref_ids, tokenizer_agreement(ref_ids, ids)


def quality_inputs(file: Path, ref: Reference, text: str, cfg: EvalConfig, progress, load=None):
    """What scoring ``file`` against ``ref`` needs, computed on this machine: (token windows, the reference's
    cached top-k statistics, fields for the quality record, a tokenizer note), or a string saying why quality
    cannot be measured. Scoring (:func:`edgekit.harness.quality.score_session`) then runs wherever the artifact
    runs: here, or on a device through ``edgekit agent``, which gets these same windows and statistics.

    The reference is opened only on a statistics cache miss and closed before this returns, so it never
    shares memory with the artifact's session."""
    import edgekit
    from edgekit.harness.quality import reference_stats, windows

    load = load or edgekit.load
    extra: dict[str, Any] = {}
    if ref.kind != "artifact":  # float reference first; a GGUF that has none is run as an artifact
        if ref.opens is not None:
            _reference_tokens(file, ref, text)  # also reads the GGUF's architecture, cheaply
        model, why = _float_reference(ref, progress)
        if model is not None:
            with edgekit.load(file, vocab_only=True) as s:  # the artifact's own tokenizer, as its session reads text
                ids = s.tokenize(text)
            ref_id, note = ref.sha256, None
            extra["reference"] = ref.describe()

            def open_reference():
                from edgekit.reference import TorchReference

                return TorchReference(model)
        elif ref.opens is None:  # a Hugging Face directory: no runtime of ours runs it
            return f"skipped: {why}; {SKIP_HINT}"
        else:
            ref = ref.as_artifact(f"{why}, so it is run as an artifact")
    if ref.kind == "artifact":
        _reference_tokens(file, ref, text)
        ids, note = ref.ids, ref.token_note
        # its own cache key: the same .gguf as a float (torch) reference and as an artifact are different references
        ref_id = f"artifact:{ref.runtime}:{ref.sha256}"
        extra = {"reference": ref.describe(), "tokenizers_agree": ref.token_note is None}
        opens = ref.opens

        def open_reference():
            return load(opens)
    wins = windows(ids, cfg)
    if not wins:
        raise InputError(f"the evaluation text has {len(ids)} tokens, fewer than one 32-token window",
                         "pass a longer --eval-text")
    holder: dict[str, Any] = {}

    def ref_logits(w: list[int]):
        if "ref" not in holder:
            holder["ref"] = open_reference()
        return holder["ref"].logits(w)

    tick = (lambda d, t: progress("reference logits", d, t)) if progress else None
    try:
        stats = reference_stats(ref_id, wins, ref_logits, cfg.topk, tick)
    finally:
        if "ref" in holder and hasattr(holder["ref"], "close"):
            holder["ref"].close()
    return wins, stats, extra, note


def _quality(file: Path, ref: Reference, text: str, label: str, cfg: EvalConfig, progress, check_memory: bool = True,
             max_memory: int | str | None = None) -> tuple[dict | None, str | None]:
    """(quality, note) against ``ref``; quality is None with the reason when it cannot be measured. The sessions
    are guarded as :func:`edgekit.load` guards them."""
    import functools

    import edgekit
    from edgekit.harness.quality import score_session

    load = functools.partial(edgekit.load, check_memory=check_memory, max_memory=max_memory)
    inputs = quality_inputs(file, ref, text, cfg, progress, load)
    if isinstance(inputs, str):
        return None, inputs
    wins, stats, extra, note = inputs
    with load(file) as session:
        q = score_session(session, stats, wins, cfg, label, progress)
    return q | extra, note


def profile(artifact: str | Path, eval_text: str | None = None, reference: str | None = None,
            speed_cfg: SpeedConfig | None = None, quality: bool = True, eval_tokens: int = 4096,
            progress: Callable[[str, int, int], None] = lambda d, a, b: None, targets: list[str] = (),
            context: int | None = None, prompt_tokens: int | None = None, cloud_url: str | None = None,
            profile_dirs: list[str] | None = None, check_memory: bool = True,
            max_memory: int | str | None = None, verify: bool = True) -> dict[str, Any]:
    """Measure ``artifact`` (see the module docstring). ``check_memory`` / ``max_memory``: the memory-fit guard of
    :func:`edgekit.load`, run here before anything is measured (the measuring child then opens without it, so
    load times exclude the guard's reads); the quality pass's own loads are guarded the same way."""
    from edgekit.memory_fit import guard
    from edgekit.session import runtime_of

    speed_cfg = speed_cfg or SpeedConfig()
    file, runtime, manifest = resolve_artifact(artifact, verify)  # a tampered artifact is not measured
    rt = runtime_of(file, runtime)
    kind = rt.kind(file)
    why = rt.unavailable_reason()
    if why:  # the runtime does not exist on this OS (Core ML off macOS): size, bits/weight, predictions
        return unmeasured_profile(file, rt, kind, manifest, why, list(targets), profile_dirs, context, prompt_tokens)
    if check_memory:  # one line now rather than a child killed for memory minutes later
        guard(file, rt, speed_cfg.session_options.get("n_ctx"), max_memory, speed_cfg.session_options.get("kv_type"))
    profiles = {}
    if targets:  # fail on an unknown target before minutes of measuring
        from edgekit.targets.profiles import get_profile

        profiles = {t: get_profile(t, profile_dirs) for t in targets if t != "host"}
    if kind == "encoder":  # encoders: embedding cosine, texts/s, latency per batch
        from edgekit.harness.embedding import profile_encoder
        from edgekit.targets.encoder_predict import encoder_predictions

        result = profile_encoder(file, manifest, eval_text, reference, speed_cfg.reps, quality, progress=progress)
        result["host"] = host_info()
        save_profile_result(file, result)
        result.update(encoder_predictions(file, result, list(targets), profiles))
        return result
    fmt = (manifest or {}).get("artifact", {}).get("format") or rt.format
    text, label = read_text(eval_text, "eval")
    ref, ref_why = None, None
    if quality:  # a bad --reference fails before minutes of measuring, not after
        ref, ref_why = (_explicit_reference(reference), None) if reference is not None else _manifest_reference(manifest)
        if reference is not None and ref.opens is not None:
            _reference_tokens(file, ref, text)
    result = artifact_summary(file, fmt, manifest)

    progress("speed and memory (separate process)", 0, 1)
    speed = measure(str(file), text, speed_cfg)
    progress("speed and memory (separate process)", 1, 1)
    result.update(speed)

    result["quality"] = None
    if quality:
        if ref is None:
            result["quality_note"] = ref_why
        else:
            result["quality"], note = _quality(file, ref, text, label, EvalConfig(max_tokens=eval_tokens), progress,
                                               check_memory, max_memory)
            if note:
                result["quality_note"] = note
    result["host"] = host_info()
    save_profile_result(file, result)
    result.update(predictions(file, speed, text, targets, context, prompt_tokens, profiles, cloud_url))
    return result


def artifact_summary(file: Path, fmt: str, manifest: dict | None) -> dict[str, Any]:
    """The profile's first keys: what the artifact is (file, format, size, bits per weight, recipe)."""
    result: dict[str, Any] = {"artifact": str(file), "format": fmt, "size_bytes": model_bytes(file)}
    if fmt == "gguf":
        from edgekit.converters.gguf_layout import gguf_weight_stats

        stats = gguf_weight_stats(file)
        result.update(bits_per_weight=stats["bits_per_weight"], parameters=stats["parameters"],
                      tensor_types=stats["tensor_types"])
    elif manifest:
        result["bits_per_weight"] = manifest.get("bits_per_weight")
    if manifest:
        result["recipe"] = manifest.get("recipe", {}).get("quant")
        result["recipe_label"] = manifest.get("recipe", {}).get("label", result["recipe"])
    return result


def _profile_cache(file: Path) -> Path:
    from edgekit.cache import cache_dir, sha256_file

    return cache_dir("profiles") / f"{sha256_file(file)[:24]}.json"


def save_profile_result(file: Path, result: dict[str, Any]) -> None:
    """Keep the latest measured figures per artifact (by content hash) for `edgekit report`."""
    import json

    import time

    from edgekit.atomic import write_atomic

    write_atomic(_profile_cache(file), json.dumps(result | {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))


def load_profile_result(file: Path) -> dict[str, Any] | None:
    from edgekit.atomic import read_json_or_none

    result = read_json_or_none(_profile_cache(file))
    return result if isinstance(result, dict) else None


def predictions(file: Path, speed: dict[str, Any], text: str, targets, context, prompt_tokens, profiles,
                cloud_url) -> dict[str, Any]:
    """% of roofline on the host always; predicted figures per target and cloud baselines when asked."""
    from edgekit.targets import predict as pr
    from edgekit.targets.calibrate import calibration_for
    from edgekit.targets.facts import artifact_facts
    from edgekit.targets.host import host_figures

    try:
        facts = artifact_facts(file).with_kv_type(speed["settings"].get("session_options", {}).get("kv_type"))
    except EdgekitError as exc:  # every artifact gets a roofline figure: say why this one has none
        return {"predictions_note": f"skipped: {exc.one_line()}"}
    host = host_figures()
    out: dict[str, Any] = {"roofline_percent": pr.roofline_percent(facts, speed, host)}
    if not targets and not cloud_url:
        return out
    cal, how = calibration_for(facts, speed, host)
    st = speed["settings"]
    measured_ctx = st["prompt_tokens"] + st["decode_tokens"] / 2
    out["calibration"] = how
    out["predicted_host"] = pr.predict(facts, cal, pr.host_machine(host), int(measured_ctx), st["prompt_tokens"], speed["n_ctx"])
    ctx = context or int(measured_ctx)
    p = prompt_tokens or st["prompt_tokens"]
    out["targets"] = {}
    cloud: dict[str, Any] = {}
    for name in targets:
        if name == "host":
            out["targets"]["host"] = pr.predict(facts, cal, pr.host_machine(host), ctx, p) | {"kind": "cpu"}
            continue
        prof = profiles[name]
        if prof.is_cloud():
            from edgekit.targets.cloud import simulate

            cloud[name] = simulate(facts, prof, p)
            continue
        from edgekit.targets.device_calibration import calibration_for_profile

        # a profile measured through `edgekit calibrate --device` carries that device's own factors
        own = calibration_for_profile(prof, facts)
        out["targets"][name] = pr.predict(facts, own or cal, pr.profile_machine(prof), ctx, p) | {"kind": prof.kind}
    if cloud_url:
        from edgekit.targets.cloud import measure_endpoint

        cloud["endpoint"] = measure_endpoint(cloud_url, text[:2000], max_tokens=st["decode_tokens"])
    if cloud:
        out["cloud"] = cloud
    return out


def unmeasured_profile(file: Path, rt, kind: str, manifest: dict | None, why: str, targets: list[str], profile_dirs,
                       context: int | None, prompt_tokens: int | None) -> dict[str, Any]:
    """``edgekit profile`` where the artifact's runtime cannot run here: size, bits per weight and
    uncalibrated predictions from the artifact's facts (no kernel of that runtime was measured here:
    each profile's bandwidth and compute with the predictor's default efficiency, as the notes say).

    Targets default to the device profiles that list the runtime. Facts that cannot be read leave
    size and bits per weight from the manifest and one ``predictions_note`` line saying why.
    """
    from edgekit.targets import encoder_predict as ep
    from edgekit.targets import predict as pr
    from edgekit.targets.profiles import get_profile, load_profiles

    m = manifest or {}
    result: dict[str, Any] = {
        "artifact": str(file), "format": rt.format, "runtime": rt.name, "kind": kind, "model_kind": kind,
        "size_bytes": m.get("size_bytes"), "bits_per_weight": m.get("bits_per_weight"),
        "parameters": m.get("model", {}).get("parameters"), "tensor_types": m.get("artifact", {}).get("tensor_types"),
        "recipe": m.get("recipe", {}).get("quant"), "speed": None, "speed_note": why,
        "quality": None, "quality_note": f"not measured: {why}", "targets": {},
    }
    try:
        facts = rt.facts(file)
    except EdgekitError as exc:
        if result["size_bytes"] is None:
            result["size_bytes"] = model_bytes(file)
        result["predictions_note"] = f"skipped: {exc.one_line()}"
        return result
    result.update(size_bytes=facts.size_bytes, parameters=facts.parameters,
                  bits_per_weight=8 * facts.size_bytes / max(1, facts.parameters))
    names = list(targets) or [n for n, p in sorted(load_profiles(profile_dirs).items()) if rt.name in p.runtimes]
    for name in names:
        if name == "host":
            continue
        prof = get_profile(name, profile_dirs)
        if prof.is_cloud():
            continue
        machine = pr.profile_machine(prof)
        if kind == "encoder":
            pred = ep.predict(facts, ep.uncalibrated(facts), machine, ep.typical_tokens(facts))
        else:
            unc = 1 / pr.UNCALIBRATED_EFFICIENCY
            cal = pr.Calibration(rt.name, rt.format, {}, unc, {}, unc, 0.0, 0.0, {})
            pred = pr.predict(facts, cal, machine, context or 1024, prompt_tokens or 128,
                              int(facts.extra.get("context") or 0) or None) | {"kind": prof.kind}
            pred["notes"].append("peak memory counts weights and the KV cache only (no runtime overhead measured)")
        result["targets"][name] = pred
    result["calibration"] = f"uncalibrated: {rt.name} cannot run on this host"
    return result
