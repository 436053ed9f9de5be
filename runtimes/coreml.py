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

import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgekit.contracts import Runtime
from edgekit.errors import EdgekitError, InputError, MissingDependencyError
from edgekit.formats.coreml import artifact_kind
from edgekit.runtimes import SessionLifetime, TextSession
from edgekit.runtimes.onnxruntime import OnnxRuntimeSession
from edgekit.runtimes.onnxruntime_encoder import OnnxEncoderSession

CONFIG_FILE = "coreml_config.json"
TOKENIZER_FILE = "tokenizer.json"
_UNITS = ("all", "cpu_only", "cpu_and_gpu", "cpu_and_ne")
DECODER_FORMAT = "edgekit-coreml-decoder"
CONFIG_VERSIONS = (1, 2)  # 1: Llama only; 2: any architecture. Same interface.
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


class CoreMLSession(TextSession):
    """A loaded Core ML decoder: generation (optionally streamed), raw logits, chat formatting."""

    runtime = "coreml"

    # Tokenization and chat formatting are the ONNX session's (same tokenizer.json and config keys):
    # borrowed rather than copied so the two backends cannot drift apart.
    _load_tokenizer = OnnxRuntimeSession._load_tokenizer
    tokenize = OnnxRuntimeSession.tokenize
    _token_bytes = OnnxRuntimeSession._token_bytes
    detokenize = OnnxRuntimeSession.detokenize
    chat_prompt = OnnxRuntimeSession.chat_prompt
    _sample = OnnxRuntimeSession._sample
    # the generation loop is the ONNX session's: prefill, then one token per _step
    stream_tokens = OnnxRuntimeSession.stream_tokens
    prefill = OnnxRuntimeSession.prefill

    def __init__(self, path: str | os.PathLike, n_ctx: int | None = None, n_batch: int = 64, vocab_only: bool = False,
                 compute_units: str = "all", seed: int | None = None, n_threads: int | None = None):
        self.path = str(path)
        p = Path(self.path)
        if not p.is_dir():
            raise InputError(f"{self.path} is not an .mlpackage directory", "check the path")
        try:
            self.config = json.loads((p.parent / CONFIG_FILE).read_text())
        except (OSError, ValueError):
            raise InputError(f"{p.parent / CONFIG_FILE} is missing or unreadable",
                             "re-export the model with `edgekit convert --format coreml`") from None
        cfg = self.config
        if cfg.get("format", DECODER_FORMAT) != DECODER_FORMAT or int(cfg.get("version", 1)) not in CONFIG_VERSIONS:
            raise InputError(f"{p.parent / CONFIG_FILE} describes a {cfg.get('format')} version {cfg.get('version')} "
                             f"package, not an edgekit Core ML decoder this edgekit runs",
                             "re-export the model with this edgekit's `edgekit convert --format coreml`")
        self._inputs = tuple(cfg.get("inputs") or (INPUT_IDS, CAUSAL_MASK))
        self._logits = (cfg.get("outputs") or [LOGITS])[0]
        self._load_tokenizer(p.parent / TOKENIZER_FILE)
        self.n_ctx = min(int(n_ctx or cfg["context"]), int(cfg["context"]))
        self.n_batch = max(1, int(n_batch))
        self.n_vocab = int(cfg["vocab_size"])
        self._eos = cfg.get("eos_token_id")
        self._rng = np.random.default_rng(seed)
        self._model = None
        self._state = None
        self._n_past = 0
        if vocab_only:
            return
        self._model = _open_mlmodel(self.path, compute_units)
        self.reset()

    @property
    def eos_token_id(self) -> int:
        return self._eos

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

    def _forward(self, ids: Sequence[int], keep: str = "all") -> np.ndarray:
        self._need_model()
        if self._n_past + len(ids) > self.n_ctx:
            raise InputError(f"{self._n_past + len(ids)} tokens exceed the context of {self.n_ctx}",
                             "shorten the prompt or re-export with a larger context")
        rows = []
        for i in range(0, len(ids), self.n_batch):
            out = self._step(list(ids[i : i + self.n_batch]))
            rows.append(out if keep == "all" else out[-1:])
        if keep != "all":
            return rows[-1][-1]
        return rows[0] if len(rows) == 1 else np.concatenate(rows)

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Next-token logits for every position of ``token_ids`` (shape [n, vocab], float32)."""
        ids = list(token_ids)
        if len(ids) > self.n_ctx:
            raise InputError(f"{len(ids)} tokens exceed the context of {self.n_ctx}", "score shorter windows")
        self.reset()
        try:
            return np.ascontiguousarray(self._forward(ids)) if ids else np.empty((0, self.n_vocab), np.float32)
        finally:
            self.reset()

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


class CoreMLEncoderSession(SessionLifetime):
    """A Core ML sentence encoder: ``embed(texts)`` -> float32 [n, dim], as the ONNX encoder session.

    Tokenization, batching and input checks are the ONNX encoder session's (borrowed: one definition).
    """

    runtime = "coreml"
    kind = "encoder"

    _load_tokenizer = OnnxEncoderSession._load_tokenizer
    tokenize = OnnxEncoderSession.tokenize
    embed = OnnxEncoderSession.embed

    def __init__(self, path: str | os.PathLike, batch_size: int = 32, compute_units: str = "all", **_: Any):
        self.path = str(path)
        p = Path(self.path)
        try:
            self.config = json.loads((p.parent / CONFIG_FILE).read_text())
        except (OSError, ValueError):
            raise InputError(f"{p.parent / CONFIG_FILE} is missing or unreadable",
                             "re-export the model with `edgekit convert --format coreml`") from None
        self.dim = int(self.config["dim"])
        self.max_length = int(self.config["max_length"])
        self.batch_size = max(1, min(int(batch_size), int(self.config.get("max_batch", batch_size))))
        self._load_tokenizer(p.parent / TOKENIZER_FILE)
        self._sess = _open_mlmodel(self.path, compute_units)

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

    @classmethod
    def kind(cls, path: Path) -> str:
        return artifact_kind(path)

    @classmethod
    def open(cls, path: str | os.PathLike, **options: Any) -> CoreMLSession | CoreMLEncoderSession:
        if cls.kind(Path(path)) == "encoder":  # sentence encoders: embed() instead of generate()
            return CoreMLEncoderSession(path, **options)
        return CoreMLSession(path, **options)
