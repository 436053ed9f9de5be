"""Foreign artifact: an onnxruntime-genai model directory (``genai_config.json`` + ``model.onnx``).

What onnxruntime-genai's model builder writes (``python -m onnxruntime_genai.models.builder``; version
0.18). ``og.Model`` / ``og.Generator`` run it: ``append_tokens`` runs the graph on new tokens after
the cached ones (the builder's graph returns logits for every position), ``rewind_to(0)`` empties the
cache. Sampling, streaming and scoring are edgekit's (:class:`HFTextSession`), so figures compare
with the other sessions token for token.

The tokenizer is ``tokenizers`` on the directory's ``tokenizer.json``, not ``og.Tokenizer``: the
latter mis-encodes spaces with a tokenizer.json rebuilt from a GGUF. ``n_threads`` is written into the
session options (genai's default thread settings behave like one thread on these VMs). No torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgekit.contracts import Runtime
from edgekit.errors import InputError, MissingDependencyError
from edgekit.runtimes.text import one_line as _one_line  # (moved by the lead)
from edgekit.runtimes.optimum_onnx import HFTextSession, _read_json

CONFIG = "genai_config.json"
HINT = "build it with `python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT -p int4 -e cpu`"


class GenaiSession(HFTextSession):
    """A loaded onnxruntime-genai decoder behind edgekit's session API."""

    runtime = "ort-genai"
    hint = HINT

    def __init__(self, path: str | os.PathLike, n_ctx: int | None = None, n_threads: int | None = None, n_batch: int = 512,
                 vocab_only: bool = False, seed: int | None = None):
        self.path = str(path)
        folder = Path(self.path).parent if Path(self.path).is_file() else Path(self.path)
        cfg = _read_json(folder / CONFIG).get("model")
        if not isinstance(cfg, dict) or "vocab_size" not in cfg:
            raise InputError(f"{folder / CONFIG} has no model.vocab_size", HINT)
        self.config = cfg
        limit = int(cfg.get("context_length", 2048))
        self._init_text(folder, cfg["vocab_size"], cfg.get("eos_token_id"), min(int(n_ctx or 2048), limit), n_batch,
                        n_threads, seed)
        self._gen = self._model = None
        if vocab_only:
            return
        try:
            import onnxruntime_genai as og
        except ImportError:
            raise MissingDependencyError("this runtime needs onnxruntime-genai", "pip install onnxruntime-genai") from None
        try:
            config = og.Config(str(folder))
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": self.n_threads, "inter_op_num_threads": 1}}}}))
            self._model = og.Model(config)
            params = og.GeneratorParams(self._model)
            # the KV buffer is allocated for max_length positions up front
            params.set_search_options(max_length=self.n_ctx, do_sample=False)
            self._gen = og.Generator(self._model, params)
        except Exception as exc:  # genai raises RuntimeError for every load problem
            raise InputError(f"onnxruntime-genai could not load {folder} ({_one_line(exc)})", HINT) from None
        self._ready = True

    def _reset(self) -> None:
        if self._gen is not None and self._n_past:
            self._gen.rewind_to(0)

    def _run_step(self, ids: Sequence[int]) -> np.ndarray:
        self._gen.append_tokens(np.asarray(ids, dtype=np.int32))
        out = self._gen.get_output("logits")  # [1, len(ids), vocab]
        return np.asarray(out[0], dtype=np.float32)

    def close(self) -> None:
        self._gen = self._model = None
        self._ready = False


def _genai_dir(path: Path) -> Path | None:
    p = Path(path)
    if p.is_dir():
        return p if (p / CONFIG).is_file() else None
    return p.parent if p.suffix.lower() == ".onnx" and (p.parent / CONFIG).is_file() else None


class GenaiRuntime(Runtime):
    """Runtime plug-in: opens the ``model.onnx`` of an onnxruntime-genai directory (genai_config.json beside it)."""

    name = "ort-genai"
    format = "onnx"
    suffixes = (".onnx",)
    priority = 20  # before edgekit's and optimum's ONNX runtimes

    @classmethod
    def unavailable_reason(cls) -> str | None:
        import importlib.util

        return None if importlib.util.find_spec("onnxruntime_genai") else "onnxruntime-genai is not installed"

    @classmethod
    def claims(cls, path: Path) -> bool:
        # the model file, not the directory: edgekit.load(DIR) then finds it, and profile hashes a file
        p = Path(path)
        return p.is_file() and _genai_dir(p) is not None

    @classmethod
    def open(cls, path: str | os.PathLike, **options: Any) -> GenaiSession:
        return GenaiSession(path, **options)
