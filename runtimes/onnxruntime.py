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

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from edgekit.contracts import Runtime
from edgekit.errors import InputError, MissingDependencyError
from edgekit.formats import onnx as fmt
from edgekit.runtimes import default_threads
from edgekit.runtimes.text import TokenizerJsonSession, one_line

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
        raise InputError(f"ONNX Runtime could not load {path} ({one_line(exc)})", "re-export the model") from None


class OnnxRuntimeSession(TokenizerJsonSession):
    """A loaded ONNX decoder: generation (optionally streamed), raw logits, chat formatting."""

    runtime = "onnxruntime"
    _rerun_always = True

    def __init__(self, path: str | os.PathLike, n_ctx: int = 2048, n_threads: int | None = None, n_batch: int = 512,
                 vocab_only: bool = False, graph_optimization_level: str = "all", enable_profiling: bool = False,
                 profile_prefix: str | None = None, seed: int | None = None, kv_type: str | None = None,
                 batch_invariant: bool = False, _shared=None):
        self.path = str(path)
        self.batch_invariant = bool(batch_invariant)
        self._history: list[int] = []  # the token at each cached position
        if kv_type not in (None, "f32"):
            raise InputError(f"ONNX Runtime sessions keep the KV cache in float32, not {kv_type}",
                             "drop kv_type, or use a GGUF artifact (llama.cpp stores q8_0 / q4_0 caches)")
        p = Path(self.path)
        if not p.is_file():
            raise InputError(f"{self.path} does not exist", "check the path")
        # version 1 graphs took position_ids and concatenated the cache: the schema refuses them
        self.config = cfg = fmt.CONFIG.read(p, "decoder")
        self._text_setup(p.parent / fmt.TOKENIZER_FILE, seed)
        self.n_ctx = int(n_ctx)
        self.n_batch = max(1, int(n_batch))
        self.n_threads = int(n_threads or default_threads())
        self._sess = None
        self._cache = []
        if vocab_only:
            return
        ort = _ort()
        # a sibling shares the InferenceSession (weights once; ORT's run() is thread-safe) and owns
        # only its I/O binding and KV cache
        self._sess = _shared or open_ort_session(self.path, self.n_threads, graph_optimization_level, enable_profiling,
                                                 profile_prefix)
        self._check_contract(cfg)
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

    # the element types the session binds (ORT's type strings)
    _INPUT_TYPES = {"input_ids": "tensor(int64)", "seqlens_k": "tensor(int32)", "total_sequence_length": "tensor(int32)",
                    "num_logits": "tensor(int64)"}

    def _check_contract(self, cfg: dict) -> None:
        """The graph must take and give what this session binds, or ORT would fail mid-generation."""
        hint = "re-export the model with edgekit"
        inputs = {i.name: i.type for i in self._sess.get_inputs()}
        missing = [n for n in cfg["inputs"] if n not in inputs]
        if missing:
            raise InputError(f"{self.path} lacks the decoder inputs {missing[:3]}", hint)
        layers = int(cfg["num_layers"])
        wrong = [f"{n} is {inputs[n]}" for n, t in self._INPUT_TYPES.items() if n in inputs and inputs[n] != t]
        wrong += [f"{n} is {inputs[n]}" for n in inputs if n.startswith("past_") and inputs[n] != "tensor(float)"]
        if wrong:
            raise InputError(f"{self.path}: decoder input {wrong[0]}, not what the session binds", hint)
        outputs = {o.name for o in self._sess.get_outputs()}
        want = ["logits"] + [f"present_{k}_{i}" for i in range(layers) for k in ("key", "value")]
        missing = [n for n in want if n not in outputs]
        if missing:
            raise InputError(f"{self.path} lacks the decoder outputs {missing[:3]}", hint)

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

    # ------------------------------------------------------------------ the decoder

    def _need_session(self) -> None:
        if self._sess is None:
            raise InputError("this session was opened with vocab_only=True (or closed)", "open it again without vocab_only")

    def reset(self) -> None:
        self._n_past = 0  # the buffers stay; positions beyond seqlens_k are never read
        self._history = []

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
        try:
            self._sess.run_with_iobinding(io)
        except Exception as exc:  # the graph opened but does not compute (e.g. an initializer of the wrong shape)
            why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise InputError(f"ONNX Runtime failed running {self.path} ({why})", "re-export the model with edgekit") from None
        self._n_past = total
        self._history.extend(int(t) for t in ids)
        return self._logits[0].copy()

    # ------------------------------------------------------------------ speculative decoding (runtimes/speculative.py)

    def _spec_reset(self) -> None:
        self._need_session()
        self.reset()

    def _spec_feed(self, ids: Sequence[int], all_logits: bool = True) -> np.ndarray:
        every = all_logits or (self.batch_invariant and self._n_past > 0)
        ids, rerun = self._even_rows(ids)
        out = self._forward(ids, keep="all" if every else "last")
        if not every:
            return out[None, :]
        return out[rerun:] if all_logits else out[-1:]

    def _spec_truncate(self, n_past: int) -> None:
        # positions past seqlens_k are never read and the next step overwrites them in place
        self._n_past = min(self._n_past, n_past)
        del self._history[self._n_past:]

    # ------------------------------------------------------------------ lifetime

    def sibling(self) -> "OnnxRuntimeSession":
        """A second session over the same weights: it shares this one's InferenceSession."""
        self._need_session()
        return OnnxRuntimeSession(self.path, n_ctx=self.n_ctx, n_threads=self.n_threads, n_batch=self.n_batch,
                                  batch_invariant=self.batch_invariant, _shared=self._sess)

    def end_profiling(self) -> str | None:
        """Stop ORT's profiler (opened with ``enable_profiling=True``); the JSON trace's path."""
        return self._sess.end_profiling() if self._sess is not None else None

    def close(self) -> None:
        self.close_draft()
        self._cache = []
        self._io = None
        self._sess = None


class OnnxRuntimeRuntime(Runtime):
    """Runtime plug-in: opens the ``.onnx`` decoders and encoders written by edgekit's ONNX exporter."""

    name = "onnxruntime"
    format = "onnx"
    suffixes = (".onnx",)

    # sentence encoders: embed() instead of generate()
    sessions = {"decoder": OnnxRuntimeSession, "encoder": "edgekit.runtimes.onnxruntime_encoder:OnnxEncoderSession"}

    @classmethod
    def kind(cls, path: Path) -> str:
        return fmt.artifact_kind(path)
