"""ONNX Runtime session for sentence encoders exported by :mod:`edgekit.converters.onnx_encoder`.

Needs only onnxruntime, tokenizers and numpy (no torch). ``edgekit.load(dir)`` returns an
:class:`OnnxEncoderSession` for an encoder artifact (``onnx_config.json`` says
``format: edgekit-onnx-encoder``)::

    with edgekit.load("out/minilm-int8") as enc:
        vectors = enc.embed(["A sentence.", "Another one."])   # float32 [2, 384], unit length

Texts are tokenized like :func:`edgekit.encoder.text_tokenizer` (the float reference's tokenizer),
sorted by length and batched so that each batch pads to its own longest text, then returned in the
caller's order.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from edgekit.errors import InputError
from edgekit.formats import onnx as fmt
from edgekit.runtimes.onnxruntime import _OPT_LEVELS, default_threads, open_ort_session
from edgekit.runtimes.text import EncoderTextSession


class OnnxEncoderSession(EncoderTextSession):
    """A loaded sentence encoder: ``embed(texts)`` -> float32 [n, dim] (L2-normalized when exported so)."""

    runtime = "onnxruntime"

    def __init__(self, path: str | os.PathLike, n_threads: int | None = None, graph_optimization_level: str = "all",
                 batch_size: int = 32, enable_profiling: bool = False, profile_prefix: str | None = None):
        self.path = str(path)
        self._sess = None
        p = Path(self.path)
        if not p.is_file():
            raise InputError(f"{self.path} does not exist", "check the path")
        self.config = fmt.CONFIG.read(p, "encoder")
        if graph_optimization_level not in _OPT_LEVELS:
            raise InputError(f"unknown graph_optimization_level '{graph_optimization_level}'", f"use one of {', '.join(_OPT_LEVELS)}")
        self.n_threads = int(n_threads or default_threads())
        self._text_setup(p.parent / fmt.TOKENIZER_FILE, batch_size)
        self._sess = open_ort_session(self.path, self.n_threads, graph_optimization_level, enable_profiling, profile_prefix)
        names = [i.name for i in self._sess.get_inputs()]
        if names != list(self.config["inputs"]):
            raise InputError(f"{self.path} has inputs {names}, not {self.config['inputs']}", "re-export the model with edgekit")
        self._output = self.config["output"]

    def _open(self) -> bool:
        return self._sess is not None

    def _run(self, texts: Sequence[str]) -> np.ndarray:
        from edgekit.encoder import encode_texts

        ids, mask = encode_texts(self._tok, texts)
        return self._sess.run([self._output], {"input_ids": ids, "attention_mask": mask})[0]

    def close(self) -> None:
        self._sess = None

    def end_profiling(self) -> str | None:
        return self._sess.end_profiling() if self._sess is not None else None
