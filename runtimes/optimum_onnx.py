"""Foreign artifact: an ONNX decoder exported by Hugging Face optimum, behind edgekit's session API.

What ``optimum-cli export onnx --task text-generation-with-past`` writes (optimum-onnx 0.1.x with
transformers 4.5x): a directory with ``config.json``, ``model.onnx`` (inputs ``input_ids``,
``attention_mask``, ``position_ids``, ``past_key_values.{i}.key/value``; outputs ``logits`` and
``present.{i}.key/value``, the cache concatenated by the graph) and the tokenizer files. edgekit's own
ONNX artifacts carry ``onnx_config.json`` instead, so the two never claim the same file.

Two engines run the same graph (option ``engine``, default from ``EDGEKIT_OPTIMUM_ENGINE``, else
"optimum"):

- "optimum": optimum's own ``ORTModelForCausalLM`` does the I/O, as an optimum user runs the model.
  It imports torch and transformers; that is accepted here because this runtime measures artifacts made
  elsewhere, and its memory figure then includes what optimum's runtime really costs.
- "onnxruntime": a plain ``InferenceSession`` fed the same inputs (no torch), so the graph itself can
  be compared with edgekit's ONNX artifacts without the wrapper's cost.

Either way the tokenizer is ``tokenizers`` on the directory's ``tokenizer.json`` and ``n_threads``
sets ``intra_op_num_threads`` explicitly (ORT's default behaves like one thread on these VMs).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgekit.contracts import Runtime
from edgekit.errors import InputError, MissingDependencyError
from edgekit.runtimes.onnxruntime import default_threads, open_ort_session
from edgekit.runtimes.text import TokenizerJsonSession
from edgekit.runtimes.text import one_line as _one_line

ENGINES = ("optimum", "onnxruntime")
ENGINE_ENV = "EDGEKIT_OPTIMUM_ENGINE"
EXPORT_HINT = "export it with `optimum-cli export onnx --model DIR --task text-generation-with-past OUT`"
PAST = "past_key_values."


def is_optimum_layout(path: Path) -> bool:
    """model.onnx-like file beside a Hugging Face config.json and no edgekit onnx_config.json."""
    p = Path(path)
    return (p.suffix.lower() == ".onnx" and p.is_file() and (p.parent / "config.json").is_file()
            and not (p.parent / "onnx_config.json").exists() and not (p.parent / "genai_config.json").exists())


def _read_json(path: Path, required: bool = True) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        if not required:
            return {}
        raise InputError(f"{path} is missing", EXPORT_HINT) from None
    except (OSError, ValueError, RecursionError) as exc:
        raise InputError(f"{path} is unreadable ({_one_line(exc)})", EXPORT_HINT) from None
    if not isinstance(data, dict):
        raise InputError(f"{path} is not a JSON object", EXPORT_HINT)
    return data


class _OrtEngine:
    """The optimum graph on a plain ONNX Runtime session (inputs as ORTModelForCausalLM builds them)."""

    def __init__(self, file: Path, n_threads: int):
        self.sess = open_ort_session(str(file), n_threads)
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        self.kv_in = [n for n in self.inputs if n.startswith(PAST)]
        if not self.kv_in:
            raise InputError(f"{file} has no past_key_values inputs (exported without the cache)", EXPORT_HINT)
        self.outputs = ["logits"] + [n.replace(PAST, "present.", 1) for n in self.kv_in]
        self.kv_shape = {}
        for n in self.kv_in:  # [batch, kv_heads, past, head_dim]: heads and head_dim are static in the export
            shape = self.inputs[n].shape
            if len(shape) != 4 or not all(isinstance(d, int) for d in (shape[1], shape[3])):
                raise InputError(f"{file}: {n} has shape {shape}, not [batch, heads, past, head_dim]", EXPORT_HINT)
            self.kv_shape[n] = (1, shape[1], 0, shape[3])

    def step(self, ids: np.ndarray, past: Any, n_past: int) -> tuple[np.ndarray, Any]:
        n = ids.shape[0]
        feeds = {"input_ids": ids[None]}
        if "attention_mask" in self.inputs:
            feeds["attention_mask"] = np.ones((1, n_past + n), dtype=np.int64)
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(n_past, n_past + n, dtype=np.int64)[None]
        if "use_cache_branch" in self.inputs:  # legacy merged decoders
            feeds["use_cache_branch"] = np.array([past is not None])
        if past is None:
            past = [np.zeros(self.kv_shape[k], dtype=np.float32) for k in self.kv_in]
        feeds.update(zip(self.kv_in, past))
        out = self.sess.run(self.outputs, feeds)
        return out[0][0], out[1:]


class _OptimumEngine:
    """optimum's ``ORTModelForCausalLM`` on the directory (torch tensors in and out, cache as it returns it)."""

    def __init__(self, file: Path, n_threads: int):
        try:
            import onnxruntime as ort
            import torch
            from optimum.onnxruntime import ORTModelForCausalLM
        except ImportError:
            raise MissingDependencyError("engine 'optimum' needs optimum-onnx and torch",
                                         "pip install optimum-onnx, or open with engine='onnxruntime'") from None
        import transformers

        transformers.logging.set_verbosity_error()
        self.torch = torch
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = int(n_threads), 1
        so.log_severity_level = 3
        try:
            self.model = ORTModelForCausalLM.from_pretrained(
                str(file.parent), file_name=file.name, session_options=so, provider="CPUExecutionProvider",
                use_cache=True, use_io_binding=False, local_files_only=True)
        except Exception as exc:  # optimum raises ValueError/OSError/ORT errors alike
            raise InputError(f"optimum could not load {file} ({_one_line(exc)})", EXPORT_HINT) from None
        if not self.model.can_use_cache:
            raise InputError(f"{file} has no past_key_values inputs (exported without the cache)", EXPORT_HINT)

    def step(self, ids: np.ndarray, past: Any, n_past: int) -> tuple[np.ndarray, Any]:
        torch = self.torch
        n = ids.shape[0]
        with torch.inference_mode():
            out = self.model(input_ids=torch.from_numpy(ids[None]), attention_mask=torch.ones((1, n_past + n), dtype=torch.long),
                             past_key_values=past, use_cache=True)
        return out.logits[0].numpy(), out.past_key_values


class HFTextSession(TokenizerJsonSession):
    """A session on a Hugging Face style directory: edgekit's tokenizer.json session fed from
    ``tokenizer.json`` / ``tokenizer_config.json`` (chat template, special tokens), on top of a backend's
    ``_run_step(ids)`` (logits [len(ids), vocab] after the cached positions) and ``_reset()``."""

    runtime = ""
    hint = EXPORT_HINT

    def _init_text(self, folder: Path, n_vocab: int, eos: Any, n_ctx: int, n_batch: int, n_threads: int | None,
                   seed: int | None) -> None:
        tok_config = _read_json(folder / "tokenizer_config.json", required=False)
        if (folder / "chat_template.jinja").is_file():  # transformers >= 4.5x saves the template on its own
            tok_config["chat_template"] = (folder / "chat_template.jinja").read_text()
        tok_json = _read_json(folder / "tokenizer.json", required=False)
        special = [t["id"] for t in tok_json.get("added_tokens", []) if isinstance(t, dict) and t.get("special")]
        tokens = {k: (v.get("content", "") if isinstance(v, dict) else v or "") for k, v in tok_config.items()
                  if k in ("bos_token", "eos_token")}
        self._text_setup(folder / "tokenizer.json", seed, {
            "vocab_size": n_vocab, "eos_token_id": eos, "control_token_ids": special,
            # byte-level BPE (GPT-2 style) or SentencePiece pieces ("▁", <0xNN> byte fallback)
            "tokenizer_model": "gpt2" if "ByteLevel" in json.dumps(tok_json.get("decoder")) else "llama",
            "chat_template": tok_config.get("chat_template"), **tokens})
        self.n_ctx, self.n_batch = int(n_ctx), max(1, int(n_batch))
        self.n_threads = int(n_threads or default_threads())
        self._ready = False

    def _reset(self) -> None:  # the backend drops its cache
        raise NotImplementedError

    def _run_step(self, ids: Sequence[int]) -> np.ndarray:
        raise NotImplementedError

    def _need_session(self) -> None:
        if not self._ready:
            raise InputError("this session was opened with vocab_only=True (or closed)", "open it again without vocab_only")

    def reset(self) -> None:
        self._reset()
        self._n_past = 0

    def _step(self, ids: Sequence[int], all_logits: bool = True) -> np.ndarray:
        self._need_session()
        logits = self._run_step(ids)
        self._n_past += len(ids)
        return logits


class OptimumOnnxSession(HFTextSession):
    """A loaded optimum ONNX decoder: same calls as edgekit's own sessions (generate, logits, tokenize)."""

    runtime = "optimum-onnx"

    def __init__(self, path: str | os.PathLike, n_ctx: int | None = None, n_threads: int | None = None, n_batch: int = 512,
                 vocab_only: bool = False, engine: str | None = None, seed: int | None = None):
        self.path = str(path)
        file = Path(self.path)
        if not file.is_file():
            raise InputError(f"{file} does not exist", EXPORT_HINT)
        self.config = _read_json(file.parent / "config.json")
        gen = _read_json(file.parent / "generation_config.json", required=False)
        if "vocab_size" not in self.config:
            raise InputError(f"{file.parent / 'config.json'} has no vocab_size", EXPORT_HINT)
        limit = int(self.config.get("max_position_embeddings", 2048))
        self._init_text(file.parent, self.config["vocab_size"], gen.get("eos_token_id", self.config.get("eos_token_id")),
                        min(int(n_ctx or 2048), limit), n_batch, n_threads, seed)
        self.engine = engine or os.environ.get(ENGINE_ENV) or "optimum"
        if self.engine not in ENGINES:
            raise InputError(f"unknown engine '{self.engine}'", f"use one of {', '.join(ENGINES)}")
        self._past, self._run = None, None
        if vocab_only:
            return
        self._run = (_OptimumEngine if self.engine == "optimum" else _OrtEngine)(file, self.n_threads)
        self._ready = True

    def _reset(self) -> None:
        self._past = None

    def _run_step(self, ids: Sequence[int]) -> np.ndarray:
        logits, self._past = self._run.step(np.asarray(ids, dtype=np.int64), self._past, self._n_past)
        return logits

    def close(self) -> None:
        self._past, self._run, self._ready = None, None, False


class OptimumOnnxRuntime(Runtime):
    """Runtime plug-in: opens ``model.onnx`` decoders exported by optimum (see the module docstring)."""

    name = "optimum-onnx"
    format = "onnx"
    suffixes = (".onnx",)
    priority = 10  # before edgekit's own ONNX runtime, which claims every .onnx

    @classmethod
    def unavailable_reason(cls) -> str | None:
        import importlib.util

        return None if importlib.util.find_spec("onnxruntime") else "onnxruntime is not installed"

    @classmethod
    def claims(cls, path: Path) -> bool:
        return is_optimum_layout(Path(path))

    @classmethod
    def open(cls, path: str | os.PathLike, **options: Any) -> OptimumOnnxSession:
        return OptimumOnnxSession(path, **options)
