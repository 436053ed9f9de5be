"""The ``edgekit`` command. Each verb imports its machinery only when it runs, so ``--help`` is instant
and never imports torch. Errors meant for the user print as one line, never a traceback."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress a model, export it for the edge, and measure how it runs.")

QUANTS = ("fp32, f16, int8 / q8_0, q4_0 (round-to-nearest), int4 (data-aware), nl4 (data-aware IQ4_NL, GGUF), "
          "qat (quantization-aware training, see --qat-grid), ternary, mixed (see --target-bpw)")


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr)


@app.command()
def convert(
    model: Optional[str] = typer.Argument(None, help="A .gguf file, a Hugging Face directory (llama, mistral, qwen2, qwen3, "
                                          "gemma3_text, phi3, bert), 'minilm', or nothing for the embedded SmolLM2-135M."),
    format: str = typer.Option("gguf", "--format", "-f", help="Export format."),
    quant: Optional[str] = typer.Option(None, "--quant", "-q", help=f"Compression: {QUANTS}. Default int4, or chosen by --target's plan."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (artifact + manifest.json)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output directory."),
    eval_text: Optional[Path] = typer.Option(None, help="Text for the export-time quality check (default: shipped text)."),
    calib_text: Optional[Path] = typer.Option(None, help="Calibration text for data-aware passes "
                                              "(default: shipped text, disjoint from the evaluation text)."),
    calib_tokens: int = typer.Option(4096, help="Calibration tokens for data-aware passes."),
    calib_generated: Optional[int] = typer.Option(None, help="Tokens of text the float model writes itself, mixed into "
                                                  "the calibration set (seeded, cached; 0: the calibration text alone; "
                                                  "default $EDGEKIT_CALIB_GENERATED or 12288)."),
    qat_grid: Optional[str] = typer.Option(None, help="With --quant qat: int4 (Q4_0, default), nl4 (IQ4_NL, GGUF), "
                                           "int8, int2 or ternary."),
    qat_tokens: Optional[int] = typer.Option(None, help="With --quant qat: calibration tokens each training stage uses."),
    target_bpw: Optional[float] = typer.Option(None, "--target-bpw", help="Mixed precision under a size budget: bits per "
                                               "weight over the 2-D weights; each tensor's width (2 / 4 / 8-bit blocks "
                                               "or fp16, as the format holds) chosen by measured sensitivity."),
    json_out: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Device profile: choose the recipe predicted "
                                         "to give the best quality that fits it."),
    max_latency_ms: Optional[float] = typer.Option(None, help="With --target: longest acceptable time to first token (128-token prompt)."),
    min_tok_s: Optional[float] = typer.Option(None, help="With --target: slowest acceptable decode speed."),
    max_kld: Optional[float] = typer.Option(None, help="With --target: highest acceptable mean KL divergence from the reference."),
    min_quality: Optional[float] = typer.Option(None, help="With --target: lowest acceptable top-1 agreement with the reference (0-1)."),
    profiles_dir: List[str] = typer.Option([], "--profiles-dir", help="Extra directory of device profiles (repeatable)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="A built-in recipe (see `edgekit recipes`) or a recipe TOML file."),
    prune: Optional[float] = typer.Option(None, "--prune", help="Fraction of MLP channels to remove (structured pruning)."),
    prune_heads: Optional[float] = typer.Option(None, "--prune-heads", help="Fraction of query heads to remove in each grouped-query group."),
    rank: Optional[float] = typer.Option(None, "--rank", help="Low-rank factorization keeping this fraction of the linear layers' parameters."),
    rank_method: Optional[str] = typer.Option(None, "--rank-method", help="whitened (activation-aware, default) or plain SVD."),
    recover: Optional[int] = typer.Option(None, "--recover", help="Distillation steps after pruning / ternary (a few minutes per 100 on 2 cores)."),
    uniform: Optional[bool] = typer.Option(None, "--uniform/--per-layer", help="Prune every layer to the same width "
                                           "(default), or rank channels globally (ONNX / Core ML only)."),
    draft_for: Optional[Path] = typer.Option(None, "--draft-for", help="Build a speculative-decoding draft for this "
                                             "artifact from its own source model: each candidate recipe (--recipe, "
                                             "default: half or 80% of the layers dropped and distilled, int4) "
                                             "is converted and measured as its draft; the fastest is kept."),
) -> None:
    """Convert a model into a compressed artifact, validated against the float reference."""
    from edgekit import recipes

    if draft_for is not None:
        flags = {"MODEL": model, "--quant": quant, "--target": target, "--prune": prune, "--prune-heads": prune_heads,
                 "--rank": rank, "--recover": recover}
        given = [k for k, v in flags.items() if v is not None]
        if given:
            raise typer.BadParameter(f"--draft-for takes its source and format from the artifact; drop {', '.join(given)}")
        _draft_for(draft_for, out, recipe, force, calib_text, json_out)
        return

    the_recipe = None
    storage = {k: v for k, v in (("grid", qat_grid), ("tokens", qat_tokens)) if v is not None}  # storage pass params
    if storage and quant != "qat":
        raise typer.BadParameter("--qat-grid / --qat-tokens go with --quant qat")
    if target_bpw is not None:
        if quant not in (None, "mixed") or storage or recipe or target:
            raise typer.BadParameter("--target-bpw chooses every tensor's width itself; drop --quant / --recipe / --target")
        quant, storage = "mixed", {"bpw": float(target_bpw)}
    if recipe and any(v is not None for v in (prune, prune_heads, rank, recover)):
        raise typer.BadParameter("--recipe does not combine with --prune/--prune-heads/--rank/--recover")
    if recipe:
        the_recipe = recipes.load(recipe)
    elif any(v is not None for v in (prune, prune_heads, rank, recover)) or storage:
        the_recipe = recipes.from_flags(quant, prune, prune_heads, rank, rank_method, recover, uniform, storage_params=storage)
    from edgekit.pipeline import ConvertRequest, convert as run_convert
    from edgekit.progress import progress_bars

    err = _console(stderr=True)
    with progress_bars(not json_out) as progress:
        manifest = run_convert(ConvertRequest(
            model=model, format=format, quant=quant, out=out, force=force, recipe=the_recipe,
            eval_text=str(eval_text) if eval_text else None, calib_text=str(calib_text) if calib_text else None,
            calib_tokens=calib_tokens, calib_generated=calib_generated, target=target, profile_dirs=list(profiles_dir) or None,
            limits={"max_latency_ms": max_latency_ms, "min_tok_s": min_tok_s, "max_kld": max_kld, "min_top1": min_quality},
            progress=progress, log=lambda s: err.print(f"[dim]{s}[/dim]") if not json_out else None))
    if json_out:
        print(json.dumps(manifest, indent=2))
        return
    from edgekit.report import manifest_table, plan_table

    if manifest["model"].get("kind") == "encoder":
        from edgekit.harness.embedding import manifest_table
    if "plan" in manifest:
        _console().print(plan_table(manifest["plan"]))
    _console().print(manifest_table(manifest, out))


def _draft_for(target: Path, out: Path, recipe: Optional[str], force: bool, calib_text: Optional[Path], json_out: bool) -> None:
    from rich.table import Table

    from edgekit.drafts import build_draft
    from edgekit.progress import progress_bars

    err = _console(stderr=True)
    with progress_bars(not json_out) as progress:
        manifest = build_draft(target, out, [recipe] if recipe else None, force=force,
                               calib_text=str(calib_text) if calib_text else None, progress=progress,
                               log=lambda s: err.print(f"[dim]{s}[/dim]") if not json_out else None)
    if json_out:
        print(json.dumps(manifest, indent=2))
        return
    d = manifest["draft"]
    t = Table(title=f"drafts for {target} ({d['tokens']} tokens, greedy, median of {d['rounds']} rounds)")
    for c in ("draft", "layers", "size", "prompt", "acceptance", "tokens / target step", "tok/s without", "with", "speed-up"):
        t.add_column(c)
    rows = [(r["candidate"], str(r["layers"]), f"{r['size_bytes'] / 1e6:.1f} MB", r["prompts"]) for r in d["candidates"]]
    rows.append(("prompt lookup", "", "", d["prompt_lookup"]))
    for name, layers, size, prompts in rows:
        for p, m in prompts.items():
            t.add_row(name, layers, size, p, f"{m['acceptance_rate']:.0%}", f"{m['tokens_per_target_step']:.2f}",
                      f"{m['tok_s_without']:.1f}", f"{m['tok_s_with']:.1f}", f"{m['speedup']:.2f}x")
            name = layers = size = ""
    _console().print(t)
    _console().print(f"kept {d['chosen']} in {out}: {d['chosen_because']}")


DRAFT_HELP = ("Decode speculatively: 'prompt-lookup' (n-grams of the prompt) or a smaller artifact of the same "
              "tokenizer (e.g. a pruned or lower-bit one); greedy output is unchanged.")
BATCH_INVARIANT_HELP = ("Decode in steps of an even number of rows (GGUF / ONNX decoders) so that greedy output is the same "
                        "with and without --draft, bit for bit; costs about a second row per plain decode step.")
KV_TYPE_HELP = "KV-cache storage: f16 (llama.cpp's default), q8_0 or q4_0 (llama.cpp, with flash attention)."


@app.command()
def run(
    artifact: Path = typer.Argument(..., help="Artifact directory or model file."),
    prompt: str = typer.Argument(..., help="Prompt text."),
    max_tokens: int = typer.Option(128, help="Maximum tokens to generate."),
    raw: bool = typer.Option(False, "--raw", help="Continue the text as-is instead of applying the chat template."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    draft: Optional[str] = typer.Option(None, "--draft", help=DRAFT_HELP),
    kv_type: Optional[str] = typer.Option(None, "--kv-type", help=KV_TYPE_HELP),
    batch_invariant: bool = typer.Option(False, "--batch-invariant", help=BATCH_INVARIANT_HELP),
    stats: bool = typer.Option(False, "--stats", help="Print decode speed (and the draft's acceptance) to stderr."),
) -> None:
    """Stream a reply from an artifact."""
    import time

    import edgekit

    opts = {k: v for k, v in (("draft", draft), ("kv_type", kv_type)) if v is not None}
    if batch_invariant:
        opts["batch_invariant"] = True
    with edgekit.load(artifact, **opts) as session:
        t0 = time.perf_counter()
        for piece in session.generate(prompt, max_tokens=max_tokens, stream=True, temperature=temperature, chat=not raw):
            sys.stdout.write(piece)
            sys.stdout.flush()
        spec = session.last_speculation
    sys.stdout.write("\n")
    if stats:
        dt = time.perf_counter() - t0
        line = f"{dt:.2f} s" + (f", draft {spec['draft']}: {spec['accepted']}/{spec['drafted']} drafted tokens accepted, "
                                f"{spec['tokens_per_target_step']:.2f} tokens per target step" if spec and spec["rounds"] else "")
        sys.stderr.write(line + "\n")


@app.command()
def profile(
    artifact: Path = typer.Argument(..., help="Artifact directory (from `edgekit convert`) or a .gguf file."),
    eval_text: Optional[Path] = typer.Option(None, help="Your own evaluation text (default: shipped text)."),
    reference: Optional[str] = typer.Option(None, help="Reference for quality: a source model (float reference; "
                                            "default: the manifest's source) or another artifact (.gguf file or "
                                            "artifact directory, e.g. the f16 GGUF) run by its own runtime."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
    reps: int = typer.Option(5, help="Measured repetitions of each speed figure."),
    decode_tokens: int = typer.Option(64, help="Tokens generated per decode run."),
    no_quality: bool = typer.Option(False, "--no-quality", help="Skip the quality comparison."),
    target: List[str] = typer.Option([], "--target", "-t", help="Device profile to predict for (repeatable; "
                                     "`edgekit targets` lists them; 'host' = this machine)."),
    context: Optional[int] = typer.Option(None, help="Context length (tokens in the KV cache) for predicted decode speed."),
    prompt_tokens: Optional[int] = typer.Option(None, help="Prompt length for the measured and predicted time to first token."),
    cloud_url: Optional[str] = typer.Option(None, help="OpenAI-compatible endpoint to measure as a cloud baseline."),
    profiles_dir: List[str] = typer.Option([], "--profiles-dir", help="Extra directory of device profiles (repeatable)."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Memory the session may use, e.g. 2GiB "
                                             "(default: what the machine has available)."),
    no_memory_check: bool = typer.Option(False, "--no-memory-check", help="Skip the memory-fit guard."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip comparing the files' sha256 with the manifest "
                                   "(sizes are still compared)."),
    device: Optional[str] = typer.Option(None, "--device", "-d", help="Measure on a device running `edgekit agent`: "
                                         "a name from `edgekit devices add`, or the agent's URL."),
    token: Optional[str] = typer.Option(None, "--token", help="With --device URL: the agent's token "
                                        "(default: $EDGEKIT_AGENT_TOKEN, or the one `edgekit devices add` stored)."),
    n_gpu_layers: Optional[int] = typer.Option(None, "--n-gpu-layers", help="With --device: llama.cpp layers to offload "
                                               "to the device's GPU (-1: all)."),
    draft: Optional[str] = typer.Option(None, "--draft", help=DRAFT_HELP),
    kv_type: Optional[str] = typer.Option(None, "--kv-type", help=KV_TYPE_HELP),
    batch_invariant: bool = typer.Option(False, "--batch-invariant", help=BATCH_INVARIANT_HELP),
) -> None:
    """Measure load time, TTFT, prefill and decode speed, peak memory, size and quality on this machine or a device."""
    from edgekit.harness.speed import SpeedConfig
    from edgekit.profile import profile as run_profile
    from edgekit.progress import progress_bars

    if (token or n_gpu_layers is not None) and not device:
        raise typer.BadParameter("--token / --n-gpu-layers go with --device")
    if device and (no_verify or cloud_url or no_memory_check or max_memory or context):
        raise typer.BadParameter("--no-verify, --cloud-url, --max-memory, --no-memory-check and --context are for local profiles")
    with progress_bars(not json_out) as progress:
        cfg = SpeedConfig(reps=reps, decode_tokens=decode_tokens, **({"prompt_tokens": prompt_tokens} if prompt_tokens else {}))
        cfg.session_options.update({k: v for k, v in (("draft", draft), ("kv_type", kv_type)) if v is not None})
        if batch_invariant:
            cfg.session_options["batch_invariant"] = True
        if device and cfg.session_options:
            raise typer.BadParameter("--draft, --kv-type and --batch-invariant are for local profiles")
        if device:
            from edgekit.agent.remote import profile_on_device

            result = profile_on_device(artifact, device, token, str(eval_text) if eval_text else None, reference, cfg,
                                       quality=not no_quality, progress=progress, targets=list(target),
                                       profile_dirs=list(profiles_dir) or None,
                                       backend={"n_gpu_layers": n_gpu_layers} if n_gpu_layers is not None else None)
        else:
            result = run_profile(artifact, str(eval_text) if eval_text else None, reference, cfg, quality=not no_quality,
                                 progress=progress, targets=list(target), context=context, prompt_tokens=prompt_tokens,
                                 cloud_url=cloud_url, profile_dirs=list(profiles_dir) or None,
                                 check_memory=not no_memory_check, max_memory=max_memory, verify=not no_verify)
    if json_out:
        print(json.dumps(result, indent=2))
        return
    from edgekit.report import predictions_table, profile_table

    if result.get("kind") == "encoder":
        from edgekit.harness.embedding import profile_table
    _console().print(profile_table(result))
    ref = (result.get("quality") or {}).get("reference")
    if ref:  # what the quality figures were measured against (kind "artifact" when run by its own runtime)
        how = f"{ref['kind']}" + (f", {ref['runtime']}" if ref.get("runtime") else "")
        _console().print(f"reference: {ref['path']} ({how}, sha256 {ref['sha256'][:16]})"
                         + (f"; {ref['why']}" if ref.get("why") else ""), markup=False, highlight=False)
    if result.get("predictions_note"):
        _console().print(f"predictions: {result['predictions_note']}", markup=False, highlight=False)
    extra = predictions_table(result)
    if extra is not None:
        _console().print(extra)


@app.command()
def calibrate(
    artifacts: List[Path] = typer.Argument(None, help="Artifacts to measure (default: the embedded model at f16, q8_0, q4_0)."),
    remeasure_host: bool = typer.Option(False, "--remeasure-host", help="Measure this machine's bandwidth and matmul throughput again."),
    json_out: bool = typer.Option(False, "--json"),
    device: Optional[str] = typer.Option(None, "--device", "-d", help="Calibrate a device running `edgekit agent` (name or "
                                         "URL): writes a measured device profile named after it."),
    token: Optional[str] = typer.Option(None, "--token", help="With --device URL: the agent's token."),
) -> None:
    """Measure artifacts here (or on a device) and fit the predictor's efficiency factors per runtime and format."""
    from edgekit.progress import progress_bars
    from edgekit.targets.calibrate import calibrate as run_calibrate

    err = _console(stderr=True)
    if device:
        from edgekit.targets.device_calibration import calibrate_device

        with progress_bars(not json_out) as progress:
            done = calibrate_device(device, [str(a) for a in artifacts] if artifacts else None, token,
                                    log=lambda s: err.print(f"[dim]{s}[/dim]"), progress=progress)
        if json_out:
            from dataclasses import asdict

            print(json.dumps({"profile": done["profile"], "calibrations": [asdict(c) for c in done["calibrations"]],
                              "machine": done["machine"]}, indent=2))
            return
        from edgekit.report import calibration_table

        for c in done["calibrations"]:
            _console().print(calibration_table(c))
        _console().print(f"wrote the measured device profile {done['profile']} (use it with --target "
                         f"{Path(done['profile']).stem})", markup=False, highlight=False)
        return
    with progress_bars(not json_out) as progress:
        cals = run_calibrate([str(a) for a in artifacts] if artifacts else None, remeasure_host,
                             log=lambda s: err.print(f"[dim]{s}[/dim]"), progress=progress)
    if json_out:
        from dataclasses import asdict

        print(json.dumps([asdict(c) for c in cals], indent=2))
        return
    from edgekit.report import calibration_table

    for c in cals:
        _console().print(calibration_table(c))


@app.command()
def targets(
    profiles_dir: List[str] = typer.Option([], "--profiles-dir", help="Extra directory of device profiles (repeatable)."),
    host: bool = typer.Option(False, "--host", help="Also measure this machine (cached; the special target 'host')."),
) -> None:
    """List device profiles with their key figures."""
    from edgekit.report import targets_table
    from edgekit.targets.profiles import load_profiles

    host_figs = None
    if host:
        from edgekit.targets.host import host_figures

        host_figs = host_figures()
    _console().print(targets_table(load_profiles(list(profiles_dir) or None), host_figs))


@app.command()
def report(
    dirs: List[Path] = typer.Argument(..., help="Artifact directories (from `edgekit convert`)."),
    out: Path = typer.Option(Path("report.html"), "--out", "-o", help="HTML file to write."),
    target: List[str] = typer.Option([], "--target", "-t", help="Targets to predict for (default: every profile)."),
    context: int = typer.Option(1024, help="Context length for predicted decode speed."),
    prompt_tokens: int = typer.Option(128, help="Prompt length for predicted time to first token."),
    profiles_dir: List[str] = typer.Option([], "--profiles-dir", help="Extra directory of device profiles (repeatable)."),
    remeasure: bool = typer.Option(False, "--remeasure", help="Measure every artifact again instead of reusing its last profile."),
) -> None:
    """Write a self-contained HTML report: size vs quality vs predicted latency, Pareto frontier, measured vs predicted."""
    from edgekit.progress import progress_bars
    from edgekit.report_html import render_report
    from edgekit.targets.report_data import collect

    with progress_bars() as progress:
        data = collect([str(d) for d in dirs], list(target) or None, True, list(profiles_dir) or None, context,
                       prompt_tokens, progress, remeasure)
    path = render_report(data, out)
    _console().print(f"wrote {path}")


@app.command()
def serve(
    artifacts: List[str] = typer.Argument(..., help="Artifact directories or model files (decoders and encoders)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; anything but loopback needs --api-key."),
    port: int = typer.Option(8000, help="Port (0 picks a free one and prints it)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Require `Authorization: Bearer KEY` "
                                          "(default: $EDGEKIT_API_KEY; /health stays open)."),
    parallel: int = typer.Option(1, help="Sessions per decoder over the same weights (each with its own KV cache)."),
    queue: int = typer.Option(64, help="Requests waiting per model before the server answers 429."),
    n_ctx: Optional[int] = typer.Option(None, "--n-ctx", help="Context of each session (default: the runtime's, 2048)."),
    threads: Optional[int] = typer.Option(None, help="Threads per session (default: the cores divided among --parallel)."),
    max_tokens: int = typer.Option(1024, "--max-tokens", help="Longest completion one request may ask for."),
    max_body: int = typer.Option(1 << 20, "--max-body-bytes", help="Largest request body accepted."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Memory the models may use, e.g. 2GiB "
                                             "(default: what the machine has available)."),
    no_memory_check: bool = typer.Option(False, "--no-memory-check", help="Skip the memory-fit guard."),
    name: List[str] = typer.Option([], "--name", help="Model id for the artifact in the same position (repeatable)."),
    insecure: bool = typer.Option(False, "--insecure-no-auth", help="Allow a non-loopback --host without an API key."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip comparing the files' sha256 with their manifests "
                                   "(sizes are still compared)."),
    body_timeout: float = typer.Option(30.0, "--body-timeout", help="Seconds a request body may take to arrive (408 after)."),
    draft: Optional[str] = typer.Option(None, "--draft", help=DRAFT_HELP),
    kv_type: Optional[str] = typer.Option(None, "--kv-type", help=KV_TYPE_HELP),
    batch_invariant: bool = typer.Option(False, "--batch-invariant", help=BATCH_INVARIANT_HELP),
) -> None:
    """Serve artifacts behind an OpenAI-compatible API (chat, completions, embeddings, metrics)."""
    from edgekit.serve import ServeConfig, announce
    from edgekit.serve import serve as run_server

    run_server(ServeConfig(list(artifacts), host, port, api_key, parallel, queue, n_ctx, threads, max_tokens, max_body,
                           max_memory, not no_memory_check, insecure, list(name), verify=not no_verify, body_timeout_s=body_timeout,
                           draft=draft, kv_type=kv_type, batch_invariant=batch_invariant), ready=announce)


@app.command()
def agent(
    host: str = typer.Option("127.0.0.1", help="Address to bind; anything but loopback needs --allow-remote."),
    port: int = typer.Option(8765, help="Port (0 picks a free one and prints it)."),
    storage: Path = typer.Option(Path("~/.cache/edgekit-agent"), "--storage", help="Where pushed artifacts and results are kept."),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="The token file (default: STORAGE/token; "
                                              "created with mode 0600 on first start)."),
    max_storage: float = typer.Option(20.0, "--max-storage", help="Storage quota in GB; least recently used artifacts "
                                      "are evicted to make room."),
    max_blob: Optional[float] = typer.Option(None, "--max-blob", help="Largest single file accepted, in GB (default: the quota)."),
    max_job_memory: Optional[float] = typer.Option(None, "--max-job-memory", help="Memory a job may use, in GB "
                                                   "(default: 90% of RAM); a job over it is stopped."),
    max_queue: int = typer.Option(8, "--max-queue", help="Jobs waiting before the agent answers 429."),
    allow_remote: bool = typer.Option(False, "--allow-remote", help="Allow a non-loopback --host."),
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help="PEM certificate: serve HTTPS."),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="PEM private key for --tls-cert."),
    body_timeout: float = typer.Option(60.0, "--body-timeout", help="Seconds a request body may take to arrive (408 after)."),
    max_chunk: float = typer.Option(16.0, "--max-chunk", help="Largest upload request body, in MB."),
) -> None:
    """Run on a device: measure artifacts the host pushes (`edgekit profile OUT --device URL`)."""
    from edgekit.agent import AgentConfig, run_agent

    for name, v in (("--max-storage", max_storage), ("--max-blob", max_blob), ("--max-job-memory", max_job_memory),
                    ("--body-timeout", body_timeout), ("--max-chunk", max_chunk)):
        if v is not None and not v > 0:
            raise typer.BadParameter(f"{name} must be positive")
    run_agent(AgentConfig(host, port, storage, token_file, int(max_storage * 1e9), int(max_blob * 1e9) if max_blob else None,
                          max_queue=max_queue, max_job_memory_bytes=int(max_job_memory * 1e9) if max_job_memory else None,
                          allow_remote=allow_remote, tls_cert=tls_cert, tls_key=tls_key, body_timeout_s=body_timeout,
                          max_chunk_bytes=int(max_chunk * 1e6)))


devices_app = typer.Typer(help="Devices running `edgekit agent`, remembered with their tokens.", no_args_is_help=True)
app.add_typer(devices_app, name="devices")


@devices_app.command("add")
def devices_add(
    name: str = typer.Argument(..., help="A short name, e.g. pi5."),
    url: str = typer.Argument(..., help="The agent's URL, e.g. http://192.168.1.20:8765."),
    token: Optional[str] = typer.Option(None, "--token", help="The token the agent printed (default: $EDGEKIT_AGENT_TOKEN)."),
    no_check: bool = typer.Option(False, "--no-check", help="Store it without asking the agent first."),
) -> None:
    """Remember a device (stored readable by you only)."""
    import os

    from edgekit.agent import devices

    token = token or os.environ.get("EDGEKIT_AGENT_TOKEN")
    if not no_check:
        from edgekit.agent.client import AgentClient

        facts = AgentClient(url, token).device()  # a wrong URL or token is one line now, not at the first profile
        print(f"{name}: {facts['cpu'].get('model') or facts['os']['machine']}, {facts['ram_total_bytes'] / 1e9:.1f} GB RAM, "
              f"runtimes: {', '.join(facts.get('runtimes', {})) or 'none'}")
    devices.add(name, url, token)
    print(f"added {name} ({url}) to {devices.config_dir() / 'devices.json'}")


@devices_app.command("list")
def devices_list() -> None:
    """List the remembered devices."""
    from edgekit.agent import devices

    for name, d in sorted(devices.load_all().items()):
        print(f"{name}\t{d['url']}\t{'token stored' if d.get('token') else 'no token'}")


@devices_app.command("remove")
def devices_remove(name: str = typer.Argument(...)) -> None:
    """Forget a device."""
    from edgekit.agent import devices

    devices.remove(name)
    print(f"removed {name}")


@app.command()
def sweep(
    spec: Path = typer.Argument(..., help="A sweep spec (TOML), e.g. examples/sweep.toml."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory: cache/, best/<device>/, sweep.json, sweep.csv, report.html."),
    workers: int = typer.Option(1, "--workers", "-w", help="Conversions run at once (each gets its share of the cores)."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Run every task on Ray: 'auto' (a local cluster, or the one "
                                      "RAY_ADDRESS names) or a cluster address."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Search recipes x formats x devices for the Pareto front per device (cached: a re-run does only what is missing)."""
    from edgekit.progress import progress_bars
    from edgekit.sweep import load, run_sweep

    if workers < 1:
        raise typer.BadParameter("--workers must be at least 1")
    the_spec = load(spec)
    with progress_bars(not json_out) as progress:
        result = run_sweep(the_spec, out, workers, ray, progress)
    if json_out:
        print(json.dumps(result, indent=2))
        return
    from edgekit.report import sweep_tables

    for table in sweep_tables(result):
        _console().print(table)
    st = result["stats"]
    _console().print(f"{len(result['candidates'])} candidates; conversions {st['conversions']['computed']} computed, "
                     f"{st['conversions']['cached']} cached; measurements {st['measurements']['computed']} computed, "
                     f"{st['measurements']['cached']} cached; {st['wall_s']:.0f} s on {st['executor']}. Wrote {out}/sweep.json, "
                     f"sweep.csv, report.html and best/<device>/", markup=False, highlight=False)


@app.command()
def verify(
    artifacts: List[Path] = typer.Argument(..., help="Artifact directories (from `edgekit convert`)."),
) -> None:
    """Check that each artifact's files are the ones its manifest describes (sizes and sha256)."""
    from edgekit.verify import verify as run_verify

    for a in artifacts:
        r = run_verify(a)
        print(f"{r['path']}: {r['files']} files, {r['bytes']} bytes, match manifest.json (sha256)")


@app.command("recipes")
def list_recipes(json_out: bool = typer.Option(False, "--json", help="Print the recipes as JSON.")) -> None:
    """List the built-in recipes (use one with `edgekit convert --recipe NAME`)."""
    from rich.table import Table

    from edgekit import recipes

    items = [recipes.load(n) for n in recipes.builtin_names()]
    if json_out:
        print(json.dumps([r.to_dict() for r in items], indent=2))
        return
    table = Table(title="built-in recipes")
    for col in ("name", "passes", "description"):
        table.add_column(col)
    for r in items:
        table.add_row(r.name, r.label(), r.description)
    _console().print(table)


@app.command("plugins")
def plugins() -> None:
    """List the registered architectures, compression passes, exporters and runtimes."""
    from edgekit.architectures import ARCHITECTURES
    from edgekit.registry import EXPORTERS, PASSES, RUNTIMES

    for reg in (ARCHITECTURES, PASSES, EXPORTERS, RUNTIMES):
        kind = reg.kind + ("es" if reg.kind.endswith("s") else "s")
        print(f"{kind} ({reg.group}): {', '.join(reg.names())}")
    # what each plug-in declares (the contracts the pipeline reads)
    for name in PASSES.names():
        p = PASSES.get(name)
        print(f"  pass {name}: {'/'.join(sorted(p.kinds))}{', structural' if p.structural else ''}"
              f"{', calibrated' if p.needs_calibration else ''}; tolerance {p.tolerance}")
    for name in EXPORTERS.names():
        c = EXPORTERS.get(name).capabilities
        print(f"  exporter {name}: {'/'.join(sorted(c.kinds))}; bits {sorted(c.bits)}; low-rank {c.lowrank}; "
              f"per-layer widths {c.per_layer_widths}")
    for name in RUNTIMES.names():
        rt = RUNTIMES.get(name)
        print(f"  runtime {name}: {rt.format} ({', '.join(rt.suffixes) or 'directories'}); "
              f"{rt.unavailable_reason() or 'runs on this host'}")


def main() -> None:
    from edgekit.errors import EdgekitError

    try:
        app(standalone_mode=False)
    except EdgekitError as exc:
        sys.stderr.write(f"error: {exc.one_line()}\n")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted; nothing was left half-written.\n")
        sys.exit(130)
    except Exception as exc:  # click's own usage errors
        import click

        # typer >= 0.20 raises from its vendored click (typer._click), whose classes are not click's
        modules = [click.exceptions, getattr(getattr(typer, "_click", None), "exceptions", None), typer]

        def kinds(name: str) -> tuple[type, ...]:
            return tuple(getattr(m, name) for m in modules if m is not None and isinstance(getattr(m, name, None), type))

        if isinstance(exc, kinds("Exit")):
            sys.exit(exc.exit_code)
        if isinstance(exc, kinds("ClickException")):
            sys.stderr.write(f"error: {exc.format_message()}\n")
            sys.exit(exc.exit_code)
        if isinstance(exc, kinds("Abort")):
            sys.stderr.write("error: aborted.\n")
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
