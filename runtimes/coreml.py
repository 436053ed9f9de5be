"""Core ML backend: runs ``model.mlpackage`` written by edgekit's Core ML exporter, same API as the others.

Core ML's runtime exists only on macOS: elsewhere opening a model fails with one line saying so
(``vocab_only=True`` still works everywhere: tokenization needs only ``tokenizer.json``). Needs
coremltools, tokenizers, numpy and jinja2 (no torch).

The package is a stateful decoder of any architecture edgekit converts (see
:mod:`edgekit.converters.coreml_torch`): each call passes ``inputIds`` int32 [1, S] and ``causalMask``
fp16 [1, 1, S, P + S] (the plain causal mask: sliding-window layers apply their window inside the
program) and updates the KV-cache states ``keyCache`` / ``valueCache`` held by an ``MLState`` in place;
the session keeps ``P`` (tokens cached). Generation prefills the prompt in chunks, then feeds one
token per step. Everything the session needs is in ``coreml_config.json`` (context, vocabulary,
special tokens, chat template, the input / state / output names); nothing here depends on the
architecture.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgekit.contracts import Runtime
from edgekit.errors import EdgekitError, InputError, MissingDependencyError
from edgekit.formats import coreml as fmt
from edgekit.runtimes.text import EncoderTextSession, TokenizerJsonSession

_UNITS = ("all", "cpu_only", "cpu_and_gpu", "cpu_and_ne")
# the interface's names (version 1 configs did not always list them)
INPUT_IDS, CAUSAL_MASK, LOGITS = "inputIds", "causalMask", "logits"


class PlatformError(EdgekitError):
    """The artifact's runtime does not exist on this operating system."""


def unavailable_reason() -> str | None:
    return None if sys.platform == "darwin" else (
        f"Core ML models run only on macOS (Core ML's runtime); this machine runs {sys.platform}")


def causal_mask(past: int, n: int) -> np.ndarray:
    """fp16 ``[1, 1, n, past + n]``: query i sees keys j <= past + i (0 visible, -inf hidden).

    The same mask for every architecture: sliding-window layers apply their window inside the program."""
    q = np.arange(n)[:, None] + past
    k = np.arange(past + n)[None, :]
    return np.where(k > q, -np.inf, 0.0).astype(np.float16)[None, None]


class CoreMLSession(TokenizerJsonSession):
    """A loaded Core ML decoder: generation (optionally streamed), raw logits, chat formatting."""

    runtime = "coreml"
    context_hint = "shorten the prompt or re-export with a larger context"

    def __init__(self, path: str | os.PathLike, n_ctx: int | None = None, n_batch: int = 64, vocab_only: bool = False,
                 compute_units: str = "all", seed: int | None = None, n_threads: int | None = None):
        self.path = str(path)
        p = Path(self.path)
        if not p.is_dir():
            raise InputError(f"{self.path} is not an .mlpackage directory", "check the path")
        # config versions: 1 Llama only, 2 any architecture; the same interface
        self.config = cfg = fmt.CONFIG.read(p, "decoder")
        self._inputs = tuple(cfg.get("inputs") or (INPUT_IDS, CAUSAL_MASK))
        self._logits = (cfg.get("outputs") or [LOGITS])[0]
        self._text_setup(p.parent / fmt.TOKENIZER_FILE, seed)
        self.n_ctx = min(int(n_ctx or cfg["context"]), int(cfg["context"]))
        self.n_batch = max(1, int(n_batch))
        self._model = None
        self._state = None
        if vocab_only:
            return
        self._model = _open_mlmodel(self.path, compute_units)
        self.reset()

    def _need_model(self) -> None:
        if self._model is None:
            raise InputError("this session was opened with vocab_only=True (or closed)", "open it again without vocab_only")

    _need_session = _need_model

    def reset(self) -> None:
        """Empty the KV cache (a fresh state: the old keys are masked out anyway, but start clean)."""
        if self._model is not None:
            self._state = self._model.make_state()
        self._n_past = 0

    def _step(self, ids: Sequence[int], all_logits: bool = True) -> np.ndarray:
        # the Core ML program returns every position's logits (all_logits is the ONNX graph's option)
        n = len(ids)
        ids_name, mask_name = self._inputs
        out = self._model.predict({ids_name: np.asarray([ids], dtype=np.int32),
                                   mask_name: causal_mask(self._n_past, n)}, state=self._state)
        self._n_past += n
        return np.asarray(out[self._logits], dtype=np.float32)[0]

    def close(self) -> None:
        self._state = None
        self._model = None


def _open_mlmodel(path: str, compute_units: str):
    why = unavailable_reason()
    if why:
        raise PlatformError(why, "copy the artifact to a Mac (macOS 15 or later) to run it; "
                                 "`edgekit profile` here reports its size and predicted figures")
    if compute_units not in _UNITS:
        raise InputError(f"unknown compute_units '{compute_units}'", f"use one of {', '.join(_UNITS)}")
    try:
        import coremltools as ct
    except ImportError:
        raise MissingDependencyError("the Core ML backend needs coremltools", "pip install coremltools") from None
    try:
        return ct.models.MLModel(path, compute_units=getattr(ct.ComputeUnit, compute_units.upper()))
    except Exception as exc:
        raise InputError(f"Core ML could not load {path} ({' '.join(str(exc).split())[:200]})",
                         "re-export the model (it needs macOS 15 / iOS 18 or later)") from None


class CoreMLEncoderSession(EncoderTextSession):
    """A Core ML sentence encoder: ``embed(texts)`` -> float32 [n, dim], as the ONNX encoder session."""

    runtime = "coreml"

    def __init__(self, path: str | os.PathLike, batch_size: int = 32, compute_units: str = "all", **_: Any):
        self.path = str(path)
        self.config = fmt.CONFIG.read(Path(self.path), "encoder")
        self._text_setup(Path(self.path).parent / fmt.TOKENIZER_FILE, batch_size)
        self._sess = _open_mlmodel(self.path, compute_units)

    def _open(self) -> bool:
        return self._sess is not None

    def _run(self, texts: Sequence[str]) -> np.ndarray:
        from edgekit.encoder import encode_texts

        ids, mask = encode_texts(self._tok, texts)
        out = self._sess.predict({"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32)})
        return np.asarray(out[self.config["output"]], dtype=np.float32)

    def close(self) -> None:
        self._sess = None


class CoreMLRuntime(Runtime):
    """Runtime plug-in: opens ``.mlpackage`` decoders and encoders written by edgekit's Core ML exporter (macOS only)."""

    name = "coreml"
    format = "coreml"
    suffixes = (".mlpackage",)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return unavailable_reason()

    sessions = {"decoder": CoreMLSession, "encoder": CoreMLEncoderSession}  # encoders embed()

    @classmethod
    def kind(cls, path: Path) -> str:
        return fmt.artifact_kind(path)
