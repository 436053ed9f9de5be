"""llama.cpp runtime through llama-cpp-python: GGUF artifacts.

Settings that decide speed are explicit: ``n_threads`` defaults to every core (llama-cpp-python's own
default is half of them, which halves decode speed on a 2-core machine).
"""

from __future__ import annotations

import ctypes
import os
import random
import sys
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from edgekit.contracts import Runtime
from edgekit.errors import InputError, MissingDependencyError
from edgekit.runtimes import TextSession, render_template


_LOG_CALLBACK = None


def _llama_cpp():
    global _LOG_CALLBACK
    try:
        import llama_cpp
    except ImportError:
        raise MissingDependencyError("the llama.cpp runtime needs llama-cpp-python", "pip install llama-cpp-python") from None
    if _LOG_CALLBACK is None:
        # verbose=False does not silence every message llama.cpp prints (e.g. context warnings for
        # vocab-only loads); route its log to nothing unless EDGEKIT_LLAMA_LOG is set
        @llama_cpp.llama_log_callback
        def _quiet(level, text, user_data):
            if os.environ.get("EDGEKIT_LLAMA_LOG"):
                sys.stderr.write(text.decode("utf-8", errors="replace"))

        _LOG_CALLBACK = _quiet
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
    return llama_cpp


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


class LlamaCppSession(TextSession):
    """A loaded GGUF model: generation (optionally streamed), raw logits, chat formatting."""

    runtime = "llamacpp"

    def __init__(self, path: str | os.PathLike, n_ctx: int = 2048, n_threads: int | None = None,
                 n_batch: int = 512, vocab_only: bool = False, n_gpu_layers: int = 0):
        llama_cpp = _llama_cpp()
        self.path = str(path)
        if not Path(self.path).is_file():
            raise InputError(f"{self.path} does not exist", "check the path")
        self.n_threads = n_threads or default_threads()
        from edgekit.formats.gguf_header import check

        check(self.path)  # llama.cpp trusts much of the header: a malformed file is refused here, in one line
        try:
            self._llm = llama_cpp.Llama(
                model_path=self.path, n_ctx=n_ctx, n_threads=self.n_threads, n_threads_batch=self.n_threads,
                n_batch=n_batch, vocab_only=vocab_only, verbose=False, n_gpu_layers=n_gpu_layers,
            )
        except (ValueError, RuntimeError) as exc:
            raise InputError(f"llama.cpp could not load {self.path} ({exc})", "re-export the model") from None
        except Exception as exc:  # llama-cpp-python compiles the file's chat templates while it loads
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}" if str(exc) else type(exc).__name__
            what = "its chat template does not compile" if "jinja2" in type(exc).__module__ else "it failed"
            raise InputError(f"llama-cpp-python could not open {self.path}: {what} ({why})",
                             "fix tokenizer.chat_template in the file, or re-export the model") from None
        # llama.cpp rounds its context up to a multiple of 256 but llama-cpp-python's token buffer keeps
        # the asked size: the smaller one is what a prompt may fill
        self.n_ctx = min(self._llm.n_ctx(), int(n_ctx)) if n_ctx else self._llm.n_ctx()
        self.n_vocab = self._llm.n_vocab()
        self._batch = None

    # ------------------------------------------------------------------ text

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def _token_bytes(self, tok: int) -> bytes:
        return self._llm.detokenize([tok])

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._llm.detokenize(list(ids)).decode("utf-8", errors="replace")

    @property
    def eos_token_id(self) -> int:
        return self._llm.token_eos()

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """Apply the model's own chat template (carried in the GGUF metadata)."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self._llm.metadata.get("tokenizer.chat_template")
        if not template:
            return "\n".join(m["content"] for m in messages)
        tok = self._llm._model

        def render() -> str:  # llama-cpp-python's formatter renders in Jinja's ImmutableSandboxedEnvironment
            fmt = Jinja2ChatFormatter(template, eos_token=tok.token_get_text(self._llm.token_eos()),
                                      bos_token=tok.token_get_text(self._llm.token_bos()))
            return fmt(messages=messages).prompt

        return render_template(self.path, render)

    # ------------------------------------------------------------------ generation

    def prefill(self, prompt_ids: Sequence[int]) -> None:
        """Evaluate a prompt from an empty cache without sampling (what prefill speed measures)."""
        self._llm.reset()
        self._llm.eval(list(prompt_ids))

    def stream_tokens(self, prompt_ids: Sequence[int], max_tokens: int, temperature: float = 0.0,
                      ignore_eos: bool = False, top_p: float = 1.0, seed: int | None = None) -> Iterator[int]:
        """Greedy (or sampled: top-k 40, then ``top_p``; ``seed`` makes it repeatable) token ids after a fresh
        prefill of ``prompt_ids``; stops at end-of-sequence unless ``ignore_eos`` (benchmarks want a fixed
        number of decode steps)."""
        if len(prompt_ids) + max_tokens > self.n_ctx:
            raise InputError(f"prompt ({len(prompt_ids)}) + max_tokens ({max_tokens}) exceed the context of {self.n_ctx}",
                             "shorten the prompt or open the session with a larger n_ctx")
        self._llm.reset()
        # the sampler chain is built per generate() call from this seed: a fresh one unless asked
        self._llm.set_seed(int(seed) & 0xFFFFFFFF if seed is not None else random.getrandbits(32))
        eos = self._llm.token_eos()
        for n, tok in enumerate(self._llm.generate(list(prompt_ids), temp=temperature, top_k=1 if temperature == 0 else 40,
                                                   top_p=top_p, min_p=0.0, repeat_penalty=1.0, reset=False)):
            if tok == eos and not ignore_eos:
                return
            yield tok
            if n + 1 >= max_tokens:
                return

    # ------------------------------------------------------------------ scoring

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Next-token logits for every position of ``token_ids`` (shape [n, vocab], float32)."""
        from llama_cpp._internals import LlamaBatch

        ids = list(token_ids)
        if len(ids) > self.n_ctx:
            raise InputError(f"{len(ids)} tokens exceed the context of {self.n_ctx}", "score shorter windows")
        llm = self._llm
        if self._batch is None:
            self._batch = LlamaBatch(n_tokens=llm.n_batch, embd=0, n_seq_max=1)
        llm.reset()
        llm._ctx.kv_cache_clear()
        out = np.empty((len(ids), self.n_vocab), dtype=np.float32)
        for i in range(0, len(ids), llm.n_batch):
            chunk = ids[i : i + llm.n_batch]
            self._batch.set_batch(batch=chunk, n_past=i, logits_all=True)
            llm._ctx.decode(self._batch)
            rows = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(chunk) * self.n_vocab,))
            out[i : i + len(chunk)] = rows.reshape(len(chunk), self.n_vocab)
        llm._ctx.kv_cache_clear()
        llm.reset()
        return out

    # ------------------------------------------------------------------ lifetime

    def sibling(self) -> "LlamaCppSession":
        """A second session over the same file: llama.cpp memory-maps the weights, so the pages are shared
        and each sibling adds only its KV cache and compute buffers."""
        return LlamaCppSession(self.path, n_ctx=self.n_ctx, n_threads=self.n_threads, n_batch=self._llm.n_batch)

    def close(self) -> None:
        if getattr(self, "_llm", None) is not None:
            self._llm.close()
            self._llm = None


class LlamaCppRuntime(Runtime):
    """Runtime plug-in: opens ``.gguf`` files."""

    name = "llamacpp"
    format = "gguf"
    suffixes = (".gguf",)
    sessions = {"decoder": LlamaCppSession}
