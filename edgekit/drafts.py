"""``edgekit convert --draft-for ARTIFACT``: a speculative-decoding draft made from the artifact's own source model.

Each candidate recipe (shallower models by default: layers dropped by block influence, distilled from the
float model, stored at 4 bits in the target's format) is converted, then measured where it will be used:
the target artifact decodes greedily with and without the candidate as its draft, on an input-grounded
prompt (rewrite a passage of the calibration text, never the evaluation text) and an open-ended one, in
alternating rounds. The candidate with the highest measured speed-up is kept; acceptance rates, tokens per
target step, speed-ups and how many leading greedy tokens equal plain decoding's go into its manifest under
``draft``.

What decides the speed-up is measured, not predicted: on a small model the fixed cost of a target step
(the vocabulary head, the Python loop) is a large share, so a draft that reads half the bytes can still lose.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from edgekit.errors import InputError

DEFAULT_CANDIDATES = ("draft-drop50-int4", "draft-drop80-head4")
OPEN_ENDED = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def grounded_prompt(words: int = 200) -> str:
    """Rewrite a passage of the shipped calibration text: the input-grounded case speculation is made for."""
    from importlib.resources import files

    text = files("edgekit").joinpath("data/calibration.txt").read_text(encoding="utf-8")
    passage = " ".join(text.split()[:words])
    return f"Rewrite the following passage in your own words, keeping every detail:\n\n{passage}"


def timed_decode(tokens) -> tuple[float, list[int]]:
    """Decode tok/s between the first and last token (the prefill stays outside), and the tokens."""
    stamps, out = [], []
    for t in tokens:
        stamps.append(time.perf_counter())
        out.append(t)
    return (len(out) - 1) / max(1e-9, stamps[-1] - stamps[0]), out


def measure_draft(target: Any, draft_path: Path | None, prompt_ids: dict[str, list[int]], tokens: int,
                  rounds: int) -> dict[str, Any]:
    """Speed-up of ``target`` (an open session) with ``draft_path`` as its draft, per prompt, from alternating
    rounds, and how many leading greedy tokens equal plain decoding's. ``draft_path`` None measures prompt lookup."""
    plain: dict[str, list[float]] = {p: [] for p in prompt_ids}
    spec: dict[str, list[float]] = {p: [] for p in prompt_ids}
    stats: dict[str, list[dict]] = {p: [] for p in prompt_ids}
    same: dict[str, int] = {p: tokens for p in prompt_ids}  # leading tokens equal to plain decoding, worst round
    for rnd in range(rounds + 1):  # round 0 warms both paths up
        for p, ids in prompt_ids.items():
            target.close_draft()
            r0, want = timed_decode(target.stream_tokens(ids, tokens, ignore_eos=True))
            if draft_path is None:
                target.use_draft("prompt-lookup")
            else:
                target.use_draft(str(draft_path), n_ctx=target.n_ctx)
            r1, got = timed_decode(target.stream_tokens(ids, tokens, ignore_eos=True))
            # llama.cpp does not compute a position the same in a batch as one token at a time (logits up to ~0.9
            # apart on the 135M Q4_0), so the verified token can differ from plain decoding's: recorded, not hidden
            same[p] = min(same[p], next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want))))
            if rnd:
                plain[p].append(r0)
                spec[p].append(r1)
                stats[p].append(target.last_speculation or {})
    target.close_draft()
    out = {}
    for p in prompt_ids:
        base, fast = statistics.median(plain[p]), statistics.median(spec[p])
        out[p] = {"tok_s_without": round(base, 2), "tok_s_with": round(fast, 2), "speedup": round(fast / base, 3),
                  "acceptance_rate": round(statistics.mean(s.get("acceptance_rate") or 0.0 for s in stats[p]), 3),
                  "tokens_per_target_step": round(statistics.mean(s.get("tokens_per_target_step") or 0.0
                                                                  for s in stats[p]), 3),
                  "identical_greedy": same[p] >= tokens, "identical_leading_tokens": same[p]}
    return out


def _layers_after(manifest: dict[str, Any]) -> int | None:
    """Decoder layers of the artifact: the last structural pass that changed them says, else the source's."""
    layers = (manifest["model"].get("spec") or {}).get("num_layers")
    for rec in manifest["recipe"].get("passes") or []:
        layers = rec.get("layers_after", layers)
    return layers


def build_draft(target_dir: Path, out: Path, candidates: list[str] | None = None, force: bool = False,
                tokens: int = 64, rounds: int = 2, calib_text: str | None = None,
                log: Callable[[str], None] = lambda s: None,
                progress: Callable[[str, int, int], None] = lambda d, a, b: None) -> dict[str, Any]:
    """Convert each candidate draft recipe for the artifact in ``target_dir``, measure it as that artifact's draft,
    and write the best into ``out`` (artifact + manifest with a ``draft`` section). Returns that manifest."""
    import edgekit
    from edgekit import recipes
    from edgekit.atomic import atomic_output_dir, check_output_dir
    from edgekit.manifest import MANIFEST, read_manifest
    from edgekit.pipeline import ConvertRequest, convert

    target_dir, out = Path(target_dir), Path(out)
    man = read_manifest(target_dir) if target_dir.is_dir() else None
    if man is None:
        raise InputError(f"{target_dir} is not an artifact directory with a manifest",
                         "give --draft-for the directory `edgekit convert` wrote")
    src = man.get("source") or {}
    if (man.get("model") or {}).get("kind", src.get("model_kind")) == "encoder":
        raise InputError(f"{target_dir} is a sentence encoder; speculative decoding drafts are for decoders",
                         "give --draft-for a decoder artifact")
    model = None if src.get("kind") == "default" else src.get("path")
    if model is not None and not Path(model).exists():
        raise InputError(f"the source model of {target_dir} ({model}) is not there any more",
                         "convert the draft from the same source with --recipe draft-drop50-int4 instead")
    check_output_dir(out, force)
    names = list(candidates or DEFAULT_CANDIDATES)
    recipe_list = [recipes.load(n) for n in names]  # every recipe is checked before minutes of work
    fmt = man["artifact"]["format"]
    work = out.parent / f".{out.name}.candidates"
    work.mkdir(parents=True, exist_ok=True)
    target = edgekit.load(target_dir)
    try:
        prompt_ids = {name: target.tokenize(target.chat_prompt([{"role": "user", "content": text}]), special=True)
                      for name, text in (("input-grounded", grounded_prompt()), ("open-ended", OPEN_ENDED))}
        results = []
        for i, (name, recipe) in enumerate(zip(names, recipe_list)):
            cdir = work / f"{i}-{Path(name).stem}"  # a recipe may be a file path
            cman = read_manifest(cdir) if cdir.is_dir() else None
            if cman is None or cman.get("recipe", {}).get("label") != recipe.label():
                log(f"converting draft candidate {name} ({recipe.label()})")
                cman = convert(ConvertRequest(model, fmt, None, cdir, force=True, recipe=recipe, calib_text=calib_text,
                                              progress=progress, log=log))
            log(f"measuring {name} as the draft of {target_dir.name}")
            measured = measure_draft(target, cdir / cman["artifact"]["file"], prompt_ids, tokens, rounds)
            results.append({"candidate": name, "dir": cdir.name, "recipe": recipe.label(), "size_bytes": cman["size_bytes"],
                            "layers": _layers_after(cman),
                            "kld_mean": (cman.get("quality") or {}).get("kld_mean"), "prompts": measured})
        lookup = measure_draft(target, None, prompt_ids, tokens, rounds)
    finally:
        target.close()

    def score(r: dict[str, Any]) -> float:  # geometric mean of the speed-ups over the prompts
        return statistics.geometric_mean(p["speedup"] for p in r["prompts"].values())

    best = max(results, key=score)
    best_dir = work / best["dir"]
    for r in results:
        r["speedup_geomean"] = round(score(r), 3)
        del r["dir"]
    section = {"for": str(target_dir), "target_sha256": (man.get("files") or [{}])[0].get("sha256"),
               "chosen": best["candidate"], "chosen_because": f"highest measured speed-up (geometric mean {score(best):.2f}x "
               f"over the prompts) of {len(results)} candidates", "tokens": tokens, "rounds": rounds,
               "candidates": results, "prompt_lookup": lookup}
    with atomic_output_dir(out, force) as stage:
        for p in best_dir.iterdir():
            shutil.copy2(p, stage / p.name)
        body = json.loads((stage / MANIFEST).read_text())
        body["draft"] = section
        (stage / MANIFEST).write_text(json.dumps(body, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return body
