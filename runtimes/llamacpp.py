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
from edgekit.runtimes import TextSession, default_threads, render_template


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


# KV cache element types llama.cpp accepts for K and V (ggml type ids)
KV_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}


class LlamaCppSession(TextSession):
    """A loaded GGUF model: generation (optionally streamed), raw logits, chat formatting."""

    runtime = "llamacpp"

    def __init__(self, path: str | os.PathLike, n_ctx: int = 2048, n_threads: int | None = None,
                 n_batch: int = 512, vocab_only: bool = False, n_gpu_layers: int = 0, kv_type: str | None = None,
                 flash_attn: bool | None = None, batch_invariant: bool = False):
        llama_cpp = _llama_cpp()
        self._lib = llama_cpp
        kv_type = kv_type or "f16"
        if kv_type not in KV_TYPES:
            raise InputError(f"unknown kv_type '{kv_type}'", f"use one of {', '.join(KV_TYPES)}")
        self.kv_type = kv_type
        # llama.cpp stores a quantized V cache only with flash attention; otherwise it keeps its own default
        self.flash_attn = bool(flash_attn) if flash_attn is not None else kv_type != "f16"
        if kv_type != "f16" and not self.flash_attn:
            raise InputError(f"a {kv_type} KV cache needs flash attention in llama.cpp", "drop flash_attn=False")
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
                flash_attn=self.flash_attn, type_k=KV_TYPES[kv_type], type_v=KV_TYPES[kv_type],
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
        self._drafter = None
        self._n_past = 0  # positions in the KV cache (the low-level paths below keep it)
        self._history: list[int] = []  # the token at each cached position
        self.batch_invariant = bool(batch_invariant)
        self._one = (llama_cpp.llama_token * 1)()

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

    # The generation loop drives llama.cpp's C API directly (llama_decode on a one-token batch, the C sampler
    # chain reading the logits where llama.cpp left them): llama-cpp-python's generate() adds Python work per
    # token (a batch refilled field by field, the token history copied, a KV-cache trim call) that costs a
    # 135M model several percent of its decode speed.

    def _clear(self) -> None:
        self._llm.reset()
        self._lib.llama_memory_clear(self._llm._ctx.memory, True)
        self._n_past = 0
        self._history = []

    def _decode(self, ids: Sequence[int], all_logits: bool = False) -> None:
        """Run ``ids`` after the cached positions, in chunks of n_batch; logits kept for the last position
        (every position with ``all_logits``: only for one chunk)."""
        lib, ctx = self._lib, self._llm._ctx.ctx
        n_batch = self._llm.n_batch
        if self._n_past + len(ids) > self.n_ctx:
            raise InputError(f"{self._n_past + len(ids)} tokens exceed the context of {self.n_ctx}",
                             "shorten the prompt or open the session with a larger n_ctx")
        for i in range(0, len(ids), n_batch):
            chunk = list(ids[i : i + n_batch])
            if all_logits:
                from llama_cpp._internals import LlamaBatch

                if self._batch is None:
                    self._batch = LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1)
                self._batch.set_batch(batch=chunk, n_past=self._n_past, logits_all=True)
                rc = lib.llama_decode(ctx, self._batch.batch)
            else:
                arr = self._one if len(chunk) == 1 else (lib.llama_token * len(chunk))(*chunk)
                if len(chunk) == 1:
                    arr[0] = chunk[0]
                rc = lib.llama_decode(ctx, lib.llama_batch_get_one(arr, len(chunk)))
            if rc != 0:
                raise InputError(f"llama.cpp could not decode ({'no room in the KV cache' if rc == 1 else f'code {rc}'})",
                                 "open the session with a larger n_ctx")
            self._n_past += len(chunk)
            self._history.extend(chunk)

    def _sampler(self, temperature: float, top_p: float, seed: int | None):
        """The C sampler chain: greedy, or top-k 40, temperature, then the nucleus top_p (the order every edgekit
        runtime and the speculative sampler use), drawn from ``seed`` (a fresh seed unless given)."""
        lib = self._lib
        params = lib.llama_sampler_chain_default_params()
        chain = lib.llama_sampler_chain_init(params)
        if temperature <= 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            return chain
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(40))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(float(temperature)))
        if top_p < 1.0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(float(top_p), 1))
        s = int(seed) & 0xFFFFFFFF if seed is not None else random.getrandbits(32)
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(s))
        return chain

    def prefill(self, prompt_ids: Sequence[int]) -> None:
        """Evaluate a prompt from an empty cache without sampling (what prefill speed measures)."""
        self._clear()
        if prompt_ids:
            self._decode(prompt_ids)

    def stream_tokens(self, prompt_ids: Sequence[int], max_tokens: int, temperature: float = 0.0,
                      ignore_eos: bool = False, top_p: float = 1.0, seed: int | None = None) -> Iterator[int]:
        """Greedy (or sampled: top-k 40, then ``top_p``; ``seed`` makes it repeatable) token ids after a fresh
        prefill of ``prompt_ids``; stops at end-of-sequence unless ``ignore_eos`` (benchmarks want a fixed
        number of decode steps). With a draft (:meth:`use_draft`) the same tokens come speculatively."""
        ids = list(prompt_ids)
        if not ids:
            raise InputError("the prompt is empty", "pass at least one token")
        if len(ids) + max_tokens > self.n_ctx:
            raise InputError(f"prompt ({len(ids)}) + max_tokens ({max_tokens}) exceed the context of {self.n_ctx}",
                             "shorten the prompt or open the session with a larger n_ctx")
        eos = self._llm.token_eos()
        if self._drafter is not None:
            yield from self._speculate(ids, max_tokens, temperature, top_p, seed, {eos}, ignore_eos)
            return
        lib, ctx = self._lib, self._llm._ctx.ctx
        self._clear()
        self._decode(ids)
        chain = self._sampler(temperature, top_p, seed)
        try:
            for n in range(max_tokens):
                tok = lib.llama_sampler_sample(chain, ctx, -1)
                if tok == eos and not ignore_eos:
                    return
                yield tok
                if n + 1 >= max_tokens:
                    return
                if self.batch_invariant:  # two rows, every logit kept: the sampler reads the last one
                    self._decode(self._even_rows([tok])[0], all_logits=True)
                    continue
                self._one[0] = tok
                if lib.llama_decode(ctx, lib.llama_batch_get_one(self._one, 1)) != 0:
                    raise InputError("llama.cpp could not decode (no room in the KV cache)", "open the session with a larger n_ctx")
                self._n_past += 1
                self._history.append(tok)
        finally:
            lib.llama_sampler_free(chain)

    # ------------------------------------------------------------------ speculative decoding (runtimes/speculative.py)

    def _spec_reset(self) -> None:
        self._clear()

    def _spec_feed(self, ids: Sequence[int], all_logits: bool = True) -> np.ndarray:
        every = all_logits or (self.batch_invariant and self._n_past > 0)
        ids, rerun = self._even_rows(ids)
        n = len(ids)
        if every and n > self._llm.n_batch:
            raise InputError(f"{n} draft tokens exceed the batch of {self._llm.n_batch}", "draft fewer tokens")
        self._decode(ids, all_logits=every)
        rows = n if every else 1
        got = np.ctypeslib.as_array(self._lib.llama_get_logits(self._llm._ctx.ctx), shape=(rows * self.n_vocab,))
        got = got.reshape(rows, self.n_vocab)[rerun:]
        return (got if all_logits else got[-1:]).copy()

    def _spec_truncate(self, n_past: int) -> None:
        if n_past < self._n_past:
            self._lib.llama_memory_seq_rm(self._llm._ctx.memory, 0, n_past, -1)
        self._n_past = min(self._n_past, n_past)
        del self._history[self._n_past:]

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
        self._n_past = 0
        return out

    # ------------------------------------------------------------------ lifetime

    def sibling(self) -> "LlamaCppSession":
        """A second session over the same file: llama.cpp memory-maps the weights, so the pages are shared
        and each sibling adds only its KV cache and compute buffers."""
        return LlamaCppSession(self.path, n_ctx=self.n_ctx, n_threads=self.n_threads, n_batch=self._llm.n_batch,
                               kv_type=self.kv_type, flash_attn=self.flash_attn, batch_invariant=self.batch_invariant)

    def close(self) -> None:
        self.close_draft()
        if getattr(self, "_llm", None) is not None:
            self._llm.close()
            self._llm = None


class LlamaCppRuntime(Runtime):
    """Runtime plug-in: opens ``.gguf`` files."""

    name = "llamacpp"
    format = "gguf"
    suffixes = (".gguf",)
    sessions = {"decoder": LlamaCppSession}
