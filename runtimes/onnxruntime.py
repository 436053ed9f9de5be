"""ONNX Runtime backend: runs ``model.onnx`` written by edgekit's ONNX exporter, same API as llama.cpp's.

Needs only onnxruntime, tokenizers, numpy and jinja2 (no torch, no transformers). The artifact
directory holds ``model.onnx`` (decoder with explicit past/present key-value tensors, see
:mod:`edgekit.converters.onnx` for the graph contract), ``tokenizer.json`` and ``onnx_config.json``.

Generation prefills the prompt once and then feeds one token per step. The KV cache is one numpy
buffer per layer and kind, [1, kv_heads, capacity, head_dim], wrapped as ``OrtValue``s and bound through
IOBinding both as ``past_*`` input and as ``present_*`` output: GroupQueryAttention writes the new
positions in place, so a step copies nothing but its own keys and values. The capacity doubles (one
copy) when a prompt outgrows it, up to ``n_ctx``. While generating, the graph computes logits for the
last position only (``num_logits`` = 1); ``logits()`` asks for every position. ``n_threads`` sets
``intra_op_num_threads`` explicitly: ORT's default thread settings behave like a single thread on these VMs.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from edgekit.contracts import Runtime
from edgekit.errors import InputError, MissingDependencyError
from edgekit.runtimes import TextSession

CONFIG_FILE = "onnx_config.json"
TOKENIZER_FILE = "tokenizer.json"
_OPT_LEVELS = ("disable", "basic", "extended", "all")


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError("the ONNX runtime backend needs onnxruntime", "pip install onnxruntime") from None
    return onnxruntime


def open_ort_session(path: str, n_threads: int, graph_optimization_level: str = "all", enable_profiling: bool = False,
                     profile_prefix: str | None = None):
    """An ``InferenceSession`` on the CPU with the settings every edgekit ONNX session exposes.

    Threads are set explicitly: ORT's default thread settings behave like one thread on these VMs.
    """
    ort = _ort()
    if graph_optimization_level not in _OPT_LEVELS:
        raise InputError(f"unknown graph_optimization_level '{graph_optimization_level}'", f"use one of {', '.join(_OPT_LEVELS)}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(n_threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[graph_optimization_level]
    so.log_severity_level = 3
    if enable_profiling:
        so.enable_profiling = True
        if profile_prefix:
            so.profile_file_prefix = profile_prefix
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own pybind exception types (InvalidProtobuf, Fail, ...)
        raise InputError(f"ONNX Runtime could not load {path} ({_one_line(exc)})", "re-export the model") from None


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level alphabet: the printable character standing for each byte, inverted."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_DECODER = _byte_decoder()


def _bytelevel_bytes(text: str) -> bytes:
    """A byte-level BPE token's bytes (a user-defined added token that is not byte-level: its own text)."""
    try:
        return bytes(_BYTE_DECODER[c] for c in text)
    except KeyError:
        return text.encode("utf-8")


def _spm_bytes(text: str) -> bytes:
    """A SentencePiece token's bytes, as llama.cpp renders it: "▁" is a space, ``<0xNN>`` one byte."""
    if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
        try:
            return bytes([int(text[3:5], 16)])
        except ValueError:
            pass
    return text.replace("\u2581", " ").encode("utf-8")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."


class OnnxRuntimeSession(TextSession):
    """A loaded ONNX decoder: generation (optionally streamed), raw logits, chat formatting."""

    runtime = "onnxruntime"

    def __init__(self, path: str | os.PathLike, n_ctx: int = 2048, n_threads: int | None = None, n_batch: int = 512,
                 vocab_only: bool = False, graph_optimization_level: str = "all", enable_profiling: bool = False,
                 profile_prefix: str | None = None, seed: int | None = None):
        self.path = str(path)
        p = Path(self.path)
        if not p.is_file():
            raise InputError(f"{self.path} does not exist", "check the path")
        folder = p.parent
        try:
            self.config = json.loads((folder / CONFIG_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{folder / CONFIG_FILE} is missing or unreadable ({_one_line(exc)})",
                             "re-export the model with `edgekit convert --format onnx`") from None
        self._load_tokenizer(folder / TOKENIZER_FILE)
        cfg = self.config
        self.n_ctx = int(n_ctx)
        self.n_batch = max(1, int(n_batch))
        self.n_threads = int(n_threads or default_threads())
        self.n_vocab = int(cfg["vocab_size"])
        self._eos = cfg.get("eos_token_id")
        self._rng = np.random.default_rng(seed)
        self._sess = None
        self._cache = []
        self._n_past = 0
        if vocab_only:
            return
        if int(cfg.get("version", 1)) < 2:  # version 1 graphs took position_ids and concatenated the cache
            raise InputError(f"{self.path} was written by an older edgekit ONNX exporter", "re-export the model")
        ort = _ort()
        self._sess = open_ort_session(self.path, self.n_threads, graph_optimization_level, enable_profiling, profile_prefix)
        names = {i.name for i in self._sess.get_inputs()}
        missing = [n for n in cfg["inputs"] if n not in names]
        if missing:
            raise InputError(f"{self.path} lacks the decoder inputs {missing[:3]}", "re-export the model with edgekit")
        if self.n_ctx > int(cfg["max_position"]):
            self.n_ctx = int(cfg["max_position"])  # the rotary tables end there
        self._ort = ort
        self._layers = int(cfg["num_layers"])
        self._kv_heads = [int(h) for h in cfg["layer_kv_heads"]]
        self._head_dim = int(cfg["head_dim"])
        self._io = self._sess.io_binding()
        self._cache: list[np.ndarray] = []  # past_key_0, past_value_0, past_key_1, ...
        self._cap = 0
        self._logits_rows = 0

    def _grow(self, total: int) -> None:
        """Make the cache hold ``total`` positions (capacity doubles from 256; old positions copied once)."""
        if total <= self._cap:
            return
        cap = min(self.n_ctx, max(256, 1 << (total - 1).bit_length()))
        new = []
        for j in range(2 * self._layers):
            buf = np.zeros((1, self._kv_heads[j // 2], cap, self._head_dim), dtype=np.float32)
            if self._n_past:
                buf[:, :, : self._n_past] = self._cache[j][:, :, : self._n_past]
            new.append(buf)
        self._cache, self._cap = new, cap
        for j, buf in enumerate(new):
            kind, layer = ("key", "value")[j % 2], j // 2
            val = self._ort.OrtValue.ortvalue_from_numpy(buf)  # shares the numpy memory
            self._io.bind_ortvalue_input(f"past_{kind}_{layer}", val)
            self._io.bind_ortvalue_output(f"present_{kind}_{layer}", val)

    # ------------------------------------------------------------------ text

    def _load_tokenizer(self, path: Path) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise MissingDependencyError("the ONNX runtime backend needs tokenizers", "pip install tokenizers") from None
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise InputError(f"{path} is missing or unreadable ({_one_line(exc)})", "re-export the model") from None
        control = set(self.config.get("control_token_ids", []))
        vocab = self._tok.get_vocab(with_added_tokens=True)
        table: list[bytes] = [b""] * (max(vocab.values()) + 1 if vocab else 0)
        piece = _spm_bytes if self.config.get("tokenizer_model") == "llama" else _bytelevel_bytes
        for text, i in vocab.items():
            if i not in control:
                table[i] = piece(text)
        self._bytes = table

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        # llama.cpp with parse_special=False reads "<|im_start|>" as plain text; tokenizers does that
        # when encode_special_tokens is set
        self._tok.encode_special_tokens = not special
        return self._tok.encode(text, add_special_tokens=False).ids

    def _token_bytes(self, tok: int) -> bytes:
        return self._bytes[tok] if 0 <= tok < len(self._bytes) else b""

    def detokenize(self, ids: Sequence[int]) -> str:
        return b"".join(self._token_bytes(int(t)) for t in ids).decode("utf-8", errors="replace")

    @property
    def eos_token_id(self) -> int:
        return self._eos

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """Apply the model's own chat template (from onnx_config.json), rendered like llama-cpp-python does."""
        template = self.config.get("chat_template")
        if not template:
            return "\n".join(m["content"] for m in messages)
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
        return env.from_string(template).render(
            messages=messages, eos_token=self.config.get("eos_token", ""), bos_token=self.config.get("bos_token", ""),
            add_generation_prompt=True, raise_exception=raise_exception,
            strftime_now=lambda f: datetime.now().strftime(f))

    # ------------------------------------------------------------------ the decoder

    def _need_session(self) -> None:
        if self._sess is None:
            raise InputError("this session was opened with vocab_only=True (or closed)", "open it again without vocab_only")

    def reset(self) -> None:
        self._n_past = 0  # the buffers stay; positions beyond seqlens_k are never read

    def _step(self, ids: Sequence[int], all_logits: bool = True) -> np.ndarray:
        """Run ``ids`` after the cached positions; extend the cache in place; return logits
        [len(ids), vocab] (``all_logits``) or [1, vocab] for the last position."""
        io, n = self._io, len(ids)
        total = self._n_past + n
        self._grow(total)
        rows = n if all_logits else 1
        io.bind_cpu_input("input_ids", np.asarray([ids], dtype=np.int64))
        io.bind_cpu_input("seqlens_k", np.array([total - 1], dtype=np.int32))
        io.bind_cpu_input("total_sequence_length", np.array(total, dtype=np.int32))
        io.bind_cpu_input("num_logits", np.array([rows], dtype=np.int64))
        if rows != self._logits_rows:  # a fixed output buffer: decoding allocates nothing per step
            self._logits = np.empty((1, rows, self.n_vocab), dtype=np.float32)
            io.bind_ortvalue_output("logits", self._ort.OrtValue.ortvalue_from_numpy(self._logits))
            self._logits_rows = rows
        self._sess.run_with_iobinding(io)
        self._n_past = total
        return self._logits[0].copy()

    def _forward(self, ids: Sequence[int], keep: str = "all") -> np.ndarray:
        """Feed ``ids`` in chunks of ``n_batch``; logits of every position (``keep="all"``) or the last one."""
        self._need_session()
        if self._n_past + len(ids) > self.n_ctx:
            raise InputError(f"{self._n_past + len(ids)} tokens exceed the context of {self.n_ctx}",
                             "shorten the prompt or open the session with a larger n_ctx")
        rows = []
        for i in range(0, len(ids), self.n_batch):
            chunk = list(ids[i : i + self.n_batch])
            last_chunk = i + self.n_batch >= len(ids)
            out = self._step(chunk, all_logits=keep == "all")
            if keep == "all" or last_chunk:
                rows.append(out)
        if keep != "all":
            return rows[-1][-1]
        return rows[0] if len(rows) == 1 else np.concatenate(rows)

    def prefill(self, prompt_ids: Sequence[int]) -> None:
        """Evaluate a prompt from an empty cache without sampling (what prefill speed measures)."""
        self.reset()
        if prompt_ids:
            self._forward(prompt_ids, keep="last")

    def _sample(self, logits: np.ndarray, temperature: float) -> int:
        if temperature <= 0:
            return int(np.argmax(logits))
        top = np.argpartition(logits, -40)[-40:]  # top-k 40, as the llama.cpp session samples
        z = logits[top].astype(np.float64) / temperature
        p = np.exp(z - z.max())
        return int(top[self._rng.choice(len(top), p=p / p.sum())])

    def stream_tokens(self, prompt_ids: Sequence[int], max_tokens: int, temperature: float = 0.0,
                      ignore_eos: bool = False) -> Iterator[int]:
        """Greedy (or sampled) token ids after a fresh prefill of ``prompt_ids``; stops at end-of-sequence
        unless ``ignore_eos`` (benchmarks want a fixed number of decode steps)."""
        self._need_session()
        ids = list(prompt_ids)
        if not ids:
            raise InputError("the prompt is empty", "pass at least one token")
        if len(ids) + max_tokens > self.n_ctx:
            raise InputError(f"prompt ({len(ids)}) + max_tokens ({max_tokens}) exceed the context of {self.n_ctx}",
                             "shorten the prompt or open the session with a larger n_ctx")
        self.reset()
        last = self._forward(ids, keep="last")
        for n in range(max_tokens):
            tok = self._sample(last, temperature)
            if tok == self._eos and not ignore_eos:
                return
            yield tok
            if n + 1 >= max_tokens:
                return
            last = self._step([tok], all_logits=False)[-1]

    # ------------------------------------------------------------------ scoring

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Next-token logits for every position of ``token_ids`` (shape [n, vocab], float32)."""
        ids = list(token_ids)
        if len(ids) > self.n_ctx:
            raise InputError(f"{len(ids)} tokens exceed the context of {self.n_ctx}", "score shorter windows")
        self.reset()
        try:
            return np.ascontiguousarray(self._forward(ids), dtype=np.float32) if ids else np.empty((0, self.n_vocab), np.float32)
        finally:
            self.reset()

    # ------------------------------------------------------------------ lifetime

    def end_profiling(self) -> str | None:
        """Stop ORT's profiler (opened with ``enable_profiling=True``); the JSON trace's path."""
        return self._sess.end_profiling() if self._sess is not None else None

    def close(self) -> None:
        self._cache = []
        self._io = None
        self._sess = None


class OnnxRuntimeRuntime(Runtime):
    """Runtime plug-in: opens the ``.onnx`` decoders and encoders written by edgekit's ONNX exporter."""

    name = "onnxruntime"
    format = "onnx"
    suffixes = (".onnx",)

    @classmethod
    def kind(cls, path: Path) -> str:
        from edgekit.formats.onnx import artifact_kind

        return artifact_kind(path)

    @classmethod
    def open(cls, path: str | os.PathLike, **options: Any) -> OnnxRuntimeSession:
        if cls.kind(Path(path)) == "encoder":  # sentence encoders: embed() instead of generate()
            from edgekit.runtimes.onnxruntime_encoder import OnnxEncoderSession

            return OnnxEncoderSession(path, **options)
        return OnnxRuntimeSession(path, **options)
