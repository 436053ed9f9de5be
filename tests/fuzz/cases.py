"""Fuzz case kinds: how each mutated input is made and which user entry point reads it."""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tests.fuzz import mutate


@dataclass
class Case:
    kind: str
    index: int
    what: str  # the mutation, for the report
    argv: list[str] | None = None  # an `edgekit` command line ...
    action: tuple[str, list[str]] | None = None  # ... or a library call: (function in tests.fuzz.actions, args)
    out: Path | None = None  # an output directory that must be complete or absent afterwards
    marker: Path | None = None  # a file that only a template escaping its sandbox would create
    timeout: float = 60.0
    files: list[Path] = field(default_factory=list)  # the mutated inputs, kept when the outcome is bad


def _linked_copy(src: Path, dst: Path) -> Path:
    """A directory copy whose unchanged files are hard links (cheap; the mutated file is rewritten, never edited)."""
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.is_file():
            os.link(p, dst / p.name)
    return dst


def _write(path: Path, data: bytes) -> Path:
    if path.exists():
        path.unlink()  # a hard link: replace the name, never the shared file's bytes
    path.write_bytes(data)
    return path


CONVERT_TIMEOUT = 240.0


def gguf_load(rng, seeds: Path, d: Path, i: int) -> Case:
    data, what = mutate.gguf(rng, seeds / "gguf" / "model.gguf")
    f = _write(d / "model.gguf", data)
    return Case("gguf-load", i, what, action=("load_generate", [str(f)]), files=[f])


def gguf_convert(rng, seeds: Path, d: Path, i: int) -> Case:
    data, what = mutate.gguf(rng, seeds / "gguf" / "model.gguf")
    f = _write(d / "model.gguf", data)
    return Case("gguf-convert", i, what, argv=["convert", str(f), "-q", "q8_0", "-o", str(d / "out")], out=d / "out",
                timeout=CONVERT_TIMEOUT, files=[f])


def gguf_profile(rng, seeds: Path, d: Path, i: int) -> Case:
    data, what = mutate.gguf(rng, seeds / "gguf" / "model.gguf")
    f = _write(d / "model.gguf", data)
    return Case("gguf-profile", i, what, argv=["profile", str(f), "--no-quality", "--reps", "1", "--decode-tokens", "2",
                                              "--json"], timeout=120.0, files=[f])


def onnx_artifact(rng, seeds: Path, d: Path, i: int) -> Case:
    art = _linked_copy(seeds / "art-onnx", d / "art")
    changed, what = mutate.onnx_model(rng, art)
    files = [_write(art / name, data) for name, data in changed.items()]
    return Case("onnx", i, what, action=("load_generate", [str(art)]), files=files)


def manifest(rng, seeds: Path, d: Path, i: int) -> Case:
    src = seeds / ("art-gguf" if rng.random() < 0.6 else "art-onnx")
    art = _linked_copy(src, d / "art")
    data, what = mutate.json_text(rng, (art / "manifest.json").read_text())
    f = _write(art / "manifest.json", data)
    if rng.random() < 0.25:
        return Case("manifest", i, what, argv=["profile", str(art), "--no-quality", "--reps", "1", "--decode-tokens", "2"],
                    timeout=120.0, files=[f])
    return Case("manifest", i, what, action=("load_generate", [str(art)]), files=[f])


def recipe(rng, seeds: Path, d: Path, i: int) -> Case:
    good = rng.choice(sorted((seeds / "recipes").glob("*.toml")))
    data, what = mutate.toml_text(rng, good.read_text())
    f = _write(d / "recipe.toml", data)
    return Case("recipe", i, f"{good.stem}: {what}", argv=["convert", str(seeds / "gguf" / "model.gguf"), "--recipe", str(f),
                                                           "-o", str(d / "out")],
                out=d / "out", timeout=CONVERT_TIMEOUT, files=[f])


def device_profile(rng, seeds: Path, d: Path, i: int) -> Case:
    (d / "profiles").mkdir()
    data, what = mutate.toml_text(rng, (seeds / "profiles" / "fuzz-device.toml").read_text())
    f = _write(d / "profiles" / "fuzz-device.toml", data)
    if rng.random() < 0.2:  # a prediction from the profile, next to a measurement
        return Case("device-profile", i, what, argv=["profile", str(seeds / "art-gguf"), "--no-quality", "--reps", "1",
                                                    "--decode-tokens", "2", "--target", "fuzz-device", "--profiles-dir",
                                                    str(d / "profiles")], timeout=120.0, files=[f])
    return Case("device-profile", i, what, argv=["targets", "--profiles-dir", str(d / "profiles")], files=[f])


def _hf(kind: str, name: str, mutator: Callable) -> Callable:
    def make(rng, seeds: Path, d: Path, i: int) -> Case:
        hf = _linked_copy(seeds / "hf", d / "hf")
        data, what = mutator(rng, hf / name)
        f = _write(hf / name, data)
        return Case(kind, i, what, argv=["convert", str(hf), "-q", "q8_0", "-o", str(d / "out")], out=d / "out",
                    timeout=CONVERT_TIMEOUT, files=[f])

    return make


def chat_template(rng, seeds: Path, d: Path, i: int) -> Case:
    marker = d / "ESCAPED"
    if rng.random() < 0.5:
        path = seeds / "gguf" / "model.gguf"
        lay = mutate.gguf_layout(str(path))
        raw = path.read_bytes()
        good = json.loads(json.dumps(_gguf_template(path)))
        text, what = mutate.template(rng, good, str(marker))
        data = mutate.gguf_string_value(raw[: lay.header_end], "tokenizer.chat_template", lay, text, raw[lay.data_start :])
        f = _write(d / "model.gguf", data)
        return Case("chat-template", i, f"gguf {what}", action=("load_chat", [str(f)]), marker=marker, files=[f])
    art = _linked_copy(seeds / "art-onnx", d / "art")
    cfg = json.loads((art / "onnx_config.json").read_text())
    text, what = mutate.template(rng, cfg.get("chat_template") or "", str(marker))
    cfg["chat_template"] = text
    f = _write(art / "onnx_config.json", json.dumps(cfg).encode("utf-8", errors="surrogatepass"))
    return Case("chat-template", i, f"onnx {what}", action=("load_chat", [str(art)]), marker=marker, files=[f])


_TEMPLATES: dict[str, str] = {}


def _gguf_template(path: Path) -> str:
    if str(path) not in _TEMPLATES:
        import gguf

        field = gguf.GGUFReader(str(path)).fields["tokenizer.chat_template"]
        _TEMPLATES[str(path)] = bytes(field.parts[field.data[0]]).decode()
    return _TEMPLATES[str(path)]


def _json_file(rng, path: Path):
    return mutate.json_text(rng, path.read_text())


# kind -> (maker, weight in a full run: the share of cases it gets)
KINDS: dict[str, tuple[Callable, float]] = {
    "gguf-load": (gguf_load, 3.0),
    "gguf-convert": (gguf_convert, 0.6),
    "gguf-profile": (gguf_profile, 0.6),
    "onnx": (onnx_artifact, 1.5),
    "manifest": (manifest, 1.5),
    "recipe": (recipe, 0.8),
    "device-profile": (device_profile, 1.0),
    "tokenizer-json": (_hf("tokenizer-json", "tokenizer.json", _json_file), 0.6),
    "hf-config": (_hf("hf-config", "config.json", _json_file), 0.6),
    "safetensors": (_hf("safetensors", "model.safetensors", mutate.safetensors), 0.6),
    "chat-template": (chat_template, 1.2),
}


def plan(total: int, only: list[str] | None = None) -> list[tuple[str, int]]:
    """(kind, index) for ``total`` cases split by weight (at least one of each kind asked for)."""
    kinds = {k: w for k, (_, w) in KINDS.items() if not only or k in only}
    scale = total / sum(kinds.values())
    counts = {k: max(1, round(w * scale)) for k, w in kinds.items()}
    return [(k, i) for k, n in counts.items() for i in range(n)]


def make(kind: str, index: int, seed: int, seeds: Path, work: Path) -> Case:
    rng = random.Random(f"{seed}:{kind}:{index}")
    d = work / f"{kind}-{index}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return KINDS[kind][0](rng, seeds, d, index)
