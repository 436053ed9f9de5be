"""The good inputs every fuzz case starts from, built once per seed directory (in a child process, so the
runner that forks cases never runs torch itself).

    gguf/model.gguf        tiny Llama (hidden 64, SmolLM2's vocabulary), f32
    art-gguf/              `edgekit convert` of it at q8_0 (model.gguf + manifest.json)
    art-onnx/              `edgekit convert` of it to ONNX at q4_0 (model.onnx, .data, tokenizer.json, onnx_config.json)
    hf/                    the same architecture as a Hugging Face directory (config.json, tokenizer.json, safetensors)
    recipes/*.toml         recipes that convert the tiny model quickly
    profiles/fuzz-device.toml   a device profile (a copy of the Raspberry Pi 5's, renamed)
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

STAMP = ".seeds-done"
RECIPES = {
    "prune-q8": '[[passes]]\npass = "prune"\nmlp = 0.25\nrecover = 2\n\n[[passes]]\npass = "q8_0"\n',
    "lowrank-q4": 'description = "low-rank then q4_0"\n[[passes]]\npass = "lowrank"\nrank = 0.5\n\n[[passes]]\npass = "q4_0"\n',
}


def build(root: Path) -> Path:
    root = Path(root)
    if (root / STAMP).exists():
        return root
    from edgekit.converters.gguf import GGUFExporter
    from edgekit.pipeline import ConvertRequest, convert
    from tests.conftest import REPO, tiny_model
    from tests.test_sources import write_hf_dir

    shutil.rmtree(root, ignore_errors=True)
    (root / "gguf").mkdir(parents=True)
    GGUFExporter().export(tiny_model(), root / "gguf")
    src = str(root / "gguf" / "model.gguf")
    convert(ConvertRequest(src, "gguf", "q8_0", root / "art-gguf", eval_tokens=512))
    convert(ConvertRequest(src, "onnx", "q4_0", root / "art-onnx", eval_tokens=512))
    write_hf_dir(tiny_model(seed=2), root / "hf")
    (root / "recipes").mkdir()
    for name, text in RECIPES.items():
        (root / "recipes" / f"{name}.toml").write_text(text)
    (root / "profiles").mkdir()
    text = (REPO / "profiles" / "raspberry-pi-5.toml").read_text().replace('name = "raspberry-pi-5"', 'name = "fuzz-device"')
    (root / "profiles" / "fuzz-device.toml").write_text(text)
    (root / STAMP).write_text("ok\n")
    return root


if __name__ == "__main__":
    build(Path(sys.argv[1]))
