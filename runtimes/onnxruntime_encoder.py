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

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgekit.errors import InputError, MissingDependencyError
from edgekit.runtimes import SessionLifetime
from edgekit.runtimes.onnxruntime import _OPT_LEVELS, _one_line, default_threads, open_ort_session

CONFIG_FILE = "onnx_config.json"
TOKENIZER_FILE = "tokenizer.json"
FORMAT = "edgekit-onnx-encoder"


def is_encoder_artifact(path: str | os.PathLike) -> bool:
    """True when the ``onnx_config.json`` beside ``path`` describes an edgekit encoder."""
    try:
        return json.loads((Path(path).parent / CONFIG_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


class OnnxEncoderSession(SessionLifetime):
    """A loaded sentence encoder: ``embed(texts)`` -> float32 [n, dim] (L2-normalized when exported so)."""

    runtime = "onnxruntime"
    kind = "encoder"

    def __init__(self, path: str | os.PathLike, n_threads: int | None = None, graph_optimization_level: str = "all",
                 batch_size: int = 32, enable_profiling: bool = False, profile_prefix: str | None = None):
        self.path = str(path)
        self._sess = None
        p = Path(self.path)
        if not p.is_file():
            raise InputError(f"{self.path} does not exist", "check the path")
        try:
            self.config = json.loads((p.parent / CONFIG_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{p.parent / CONFIG_FILE} is missing or unreadable ({_one_line(exc)})",
                             "re-export the model with `edgekit convert --format onnx`") from None
        if self.config.get("format") != FORMAT:
            raise InputError(f"{self.path} is not an edgekit encoder (format {self.config.get('format')!r})",
                             "open it with edgekit.load, which picks the right session")
        if graph_optimization_level not in _OPT_LEVELS:
            raise InputError(f"unknown graph_optimization_level '{graph_optimization_level}'", f"use one of {', '.join(_OPT_LEVELS)}")
        self.dim = int(self.config["dim"])
        self.max_length = int(self.config["max_length"])
        self.batch_size = max(1, int(batch_size))
        self.n_threads = int(n_threads or default_threads())
        self._load_tokenizer(p.parent / TOKENIZER_FILE)
        self._sess = open_ort_session(self.path, self.n_threads, graph_optimization_level, enable_profiling, profile_prefix)
        names = [i.name for i in self._sess.get_inputs()]
        if names != list(self.config["inputs"]):
            raise InputError(f"{self.path} has inputs {names}, not {self.config['inputs']}", "re-export the model with edgekit")
        self._output = self.config["output"]

    def _load_tokenizer(self, path: Path) -> None:
        from edgekit.encoder import text_tokenizer

        try:
            text = path.read_text(encoding="utf-8")
            self._tok = text_tokenizer(text, self.max_length)
        except MissingDependencyError:
            raise
        except Exception as exc:
            raise InputError(f"{path} is missing or unreadable ({_one_line(exc)})", "re-export the model") from None

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """Token ids of one text as the model sees it (with [CLS]/[SEP] unless ``special`` is False; truncated)."""
        return self._tok.encode(text, add_special_tokens=special).ids

    def _run(self, texts: Sequence[str]) -> np.ndarray:
        from edgekit.encoder import encode_texts

        ids, mask = encode_texts(self._tok, texts)
        return self._sess.run([self._output], {"input_ids": ids, "attention_mask": mask})[0]

    def embed(self, texts: Sequence[str] | str, batch_size: int | None = None) -> np.ndarray:
        """Sentence embeddings of ``texts`` in their order: float32 [n, dim]."""
        if self._sess is None:
            raise InputError("this session is closed", "open the artifact again with edgekit.load")
        if isinstance(texts, str):
            raise InputError("embed() takes a list of texts", "wrap a single text in a list: embed([text])")
        texts = list(texts)
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise InputError(f"text #{bad} is a {type(texts[bad]).__name__}, not a str", "pass a list of strings")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        bs = max(1, int(batch_size or self.batch_size))
        # longest first, as sentence-transformers does: each batch pads only to its own longest text
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        for i in range(0, len(order), bs):
            idx = order[i : i + bs]
            out[idx] = self._run([texts[j] for j in idx])
        return out

    def _not_a_decoder(self, *args: Any, **kw: Any):
        raise InputError(f"{self.path} is a sentence encoder: it embeds text and does not generate",
                         "call embed(texts) (in Python: edgekit.load(dir).embed([...]))")

    generate = logits = stream_tokens = _not_a_decoder

    def close(self) -> None:
        self._sess = None

    def end_profiling(self) -> str | None:
        return self._sess.end_profiling() if self._sess is not None else None

