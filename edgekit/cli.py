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

QUANTS = "f16, q8_0, q4_0 (round-to-nearest), int4 (data-aware)"


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr)


@app.command()
def convert(
    model: Optional[str] = typer.Argument(None, help="A .gguf file, a Hugging Face Llama directory, or nothing for the embedded SmolLM2-135M."),
    format: str = typer.Option("gguf", "--format", "-f", help="Export format."),
    quant: str = typer.Option("int4", "--quant", "-q", help=f"Compression: {QUANTS}."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (artifact + manifest.json)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output directory."),
    eval_text: Optional[Path] = typer.Option(None, help="Text for the export-time quality check (default: shipped text)."),
    calib_text: Optional[Path] = typer.Option(None, help="Calibration text for data-aware passes (default: shipped text, disjoint from the evaluation text)."),
    calib_tokens: int = typer.Option(4096, help="Calibration tokens for data-aware passes."),
    json_out: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Convert a model into a compressed artifact, validated against the float reference."""
    from edgekit.convert import convert as run_convert
    from edgekit.progress import progress_bars

    err = _console(stderr=True)
    with progress_bars(not json_out) as progress:
        manifest = run_convert(model, format, quant, out, force, str(eval_text) if eval_text else None,
                               str(calib_text) if calib_text else None, calib_tokens, progress=progress,
                               log=lambda s: err.print(f"[dim]{s}[/dim]") if not json_out else None)
    if json_out:
        print(json.dumps(manifest, indent=2))
        return
    from edgekit.report import manifest_table

    _console().print(manifest_table(manifest, out))


@app.command()
def run(
    artifact: Path = typer.Argument(..., help="Artifact directory or model file."),
    prompt: str = typer.Argument(..., help="Prompt text."),
    max_tokens: int = typer.Option(128, help="Maximum tokens to generate."),
    raw: bool = typer.Option(False, "--raw", help="Continue the text as-is instead of applying the chat template."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
) -> None:
    """Stream a reply from an artifact."""
    import edgekit

    with edgekit.load(artifact) as session:
        for piece in session.generate(prompt, max_tokens=max_tokens, stream=True, temperature=temperature, chat=not raw):
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")


@app.command()
def profile(
    artifact: Path = typer.Argument(..., help="Artifact directory (from `edgekit convert`) or a .gguf file."),
    eval_text: Optional[Path] = typer.Option(None, help="Your own evaluation text (default: shipped text)."),
    reference: Optional[str] = typer.Option(None, help="Float reference for quality when the artifact has no manifest."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
    reps: int = typer.Option(5, help="Measured repetitions of each speed figure."),
    decode_tokens: int = typer.Option(64, help="Tokens generated per decode run."),
    no_quality: bool = typer.Option(False, "--no-quality", help="Skip the quality comparison."),
) -> None:
    """Measure load time, TTFT, prefill and decode speed, peak memory, size and quality on this machine."""
    from edgekit.harness.speed import SpeedConfig
    from edgekit.profile import profile as run_profile
    from edgekit.progress import progress_bars

    with progress_bars(not json_out) as progress:
        result = run_profile(artifact, str(eval_text) if eval_text else None, reference,
                             SpeedConfig(reps=reps, decode_tokens=decode_tokens), quality=not no_quality, progress=progress)
    if json_out:
        print(json.dumps(result, indent=2))
        return
    from edgekit.report import profile_table

    _console().print(profile_table(result))


@app.command("plugins")
def plugins() -> None:
    """List the registered compression passes, exporters and runtimes."""
    from edgekit.registry import EXPORTERS, PASSES, RUNTIMES

    for reg in (PASSES, EXPORTERS, RUNTIMES):
        print(f"{reg.kind}s ({reg.group}): {', '.join(reg.names())}")


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

        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        if isinstance(exc, click.ClickException):
            sys.stderr.write(f"error: {exc.format_message()}\n")
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.stderr.write("error: aborted.\n")
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
