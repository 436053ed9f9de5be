"""Sessions on artifacts that carry a ``tokenizer.json`` and a JSON config (ONNX, Core ML).

:class:`TokenizerJsonSession` is everything a decoder session of such an artifact does apart from
running its model: tokenization exactly like llama.cpp's, streaming detokenization, the chat
template, sampling, the prefill / one-token-per-step generation loop and scoring. A backend
implements ``_step`` (run ids after the cached positions), ``reset``, ``_need_session`` and ``close``.
:class:`EncoderTextSession` is the same for sentence encoders: tokenization, length-sorted batching
and input checks; a backend implements ``_run(texts)``.

Needs tokenizers, numpy and jinja2 (chat templates); no torch.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from edgekit.errors import InputError, MissingDependencyError
from edgekit.runtimes import SessionLifetime, TextSession, render_template


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."


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


def _tokenizers():
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise MissingDependencyError("this runtime needs the tokenizers package", "pip install tokenizers") from None
    return Tokenizer


class TokenizerJsonSession(TextSession):
    """A decoder session whose tokenizer is ``tokenizer.json`` and whose settings are ``self.config``."""

    config: dict[str, Any]
    n_ctx: int
    n_batch: int
    n_vocab: int
    context_hint = "shorten the prompt or open the session with a larger n_ctx"

    def _text_setup(self, tokenizer_file: Path, seed: int | None, text_config: dict[str, Any] | None = None) -> None:
        """Read the tokenizer; ``text_config`` (default ``self.config``) gives vocab_size, eos_token_id (one
        or a list), control_token_ids, tokenizer_model ("gpt2" byte-level or "llama" SentencePiece),
        chat_template, bos_token and eos_token."""
        self._text_config = cfg = text_config if text_config is not None else self.config
        self.n_vocab = int(cfg["vocab_size"])
        eos = cfg.get("eos_token_id")
        self._eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self._rng = np.random.default_rng(seed)
        self._n_past = 0
        try:
            self._tok = _tokenizers().from_file(str(tokenizer_file))
        except MissingDependencyError:
            raise
        except Exception as exc:
            raise InputError(f"{tokenizer_file} is missing or unreadable ({one_line(exc)})", "re-export the model") from None
        control = set(cfg.get("control_token_ids", []))
        vocab = self._tok.get_vocab(with_added_tokens=True)
        table: list[bytes] = [b""] * (max(vocab.values()) + 1 if vocab else 0)
        piece = _spm_bytes if cfg.get("tokenizer_model") == "llama" else _bytelevel_bytes
        for text, i in vocab.items():
            if i not in control:
                table[i] = piece(text)
        self._bytes = table

    # ------------------------------------------------------------------ text

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
    def eos_token_id(self) -> int | None:
        return min(self._eos_ids) if self._eos_ids else None

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """Apply the model's own chat template (from the artifact's config), rendered like llama-cpp-python does."""
        cfg = self._text_config
        template = cfg.get("chat_template")
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
        return render_template(self.path, lambda: env.from_string(template).render(
            messages=messages, eos_token=cfg.get("eos_token", ""), bos_token=cfg.get("bos_token", ""),
            add_generation_prompt=True, raise_exception=raise_exception,
            strftime_now=lambda f: datetime.now().strftime(f)))

    # ------------------------------------------------------------------ the model (backends)

    def _need_session(self) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def _step(self, ids: Sequence[int], all_logits: bool = True) -> np.ndarray:
        """Run ``ids`` after the cached positions; logits [len(ids), vocab], or at least the last row."""
        raise NotImplementedError

    # ------------------------------------------------------------------ generation and scoring

    def _forward(self, ids: Sequence[int], keep: str = "all") -> np.ndarray:
        """Feed ``ids`` in chunks of ``n_batch``; logits of every position (``keep="all"``) or the last one."""
        self._need_session()
        if self._n_past + len(ids) > self.n_ctx:
            raise InputError(f"{self._n_past + len(ids)} tokens exceed the context of {self.n_ctx}", self.context_hint)
        rows = []
        for i in range(0, len(ids), self.n_batch):
            out = self._step(list(ids[i : i + self.n_batch]), all_logits=keep == "all")
            rows.append(out if keep == "all" else out[-1:])
        if keep != "all":
            return rows[-1][-1]
        return rows[0] if len(rows) == 1 else np.concatenate(rows)

    def prefill(self, prompt_ids: Sequence[int]) -> None:
        """Evaluate a prompt from an empty cache without sampling (what prefill speed measures)."""
        self.reset()
        if prompt_ids:
            self._forward(prompt_ids, keep="last")

    def _sample(self, logits: np.ndarray, temperature: float, top_p: float = 1.0, rng=None) -> int:
        if temperature <= 0:
            return int(np.argmax(logits))
        from edgekit.runtimes.speculative import truncated_distribution

        top, p = truncated_distribution(logits, temperature, top_p)  # top-k 40, as the llama.cpp session samples
        return int(top[(rng or self._rng).choice(len(top), p=p)])

    def stream_tokens(self, prompt_ids: Sequence[int], max_tokens: int, temperature: float = 0.0,
                      ignore_eos: bool = False, top_p: float = 1.0, seed: int | None = None) -> Iterator[int]:
        """Greedy (or sampled: top-k 40, then ``top_p``; ``seed`` makes it repeatable) token ids after a
        fresh prefill of ``prompt_ids``; stops at end-of-sequence unless ``ignore_eos`` (benchmarks want a
        fixed number of decode steps)."""
        self._need_session()
        ids = list(prompt_ids)
        if not ids:
            raise InputError("the prompt is empty", "pass at least one token")
        if len(ids) + max_tokens > self.n_ctx:
            raise InputError(f"prompt ({len(ids)}) + max_tokens ({max_tokens}) exceed the context of {self.n_ctx}",
                             self.context_hint)
        if self._drafter is not None:
            yield from self._speculate(ids, max_tokens, temperature, top_p, seed, self._eos_ids, ignore_eos)
            return
        self.reset()
        rng = np.random.default_rng(seed) if seed is not None else self._rng
        last = self._forward(ids, keep="last")
        for n in range(max_tokens):
            tok = self._sample(last, temperature, top_p, rng)
            if tok in self._eos_ids and not ignore_eos:
                return
            yield tok
            if n + 1 >= max_tokens:
                return
            last = self._spec_feed([tok])[-1] if self.batch_invariant else self._step([tok], all_logits=False)[-1]

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


class EncoderTextSession(SessionLifetime):
    """A sentence encoder session: ``embed(texts)`` -> float32 [n, dim] (L2-normalized when exported so)."""

    kind = "encoder"
    config: dict[str, Any]

    def _text_setup(self, tokenizer_file: Path, batch_size: int) -> None:
        from edgekit.encoder import text_tokenizer

        self.dim = int(self.config["dim"])
        self.max_length = int(self.config["max_length"])
        self.batch_size = max(1, min(int(batch_size), int(self.config.get("max_batch", batch_size))))
        try:
            self._tok = text_tokenizer(Path(tokenizer_file).read_text(encoding="utf-8"), self.max_length)
        except MissingDependencyError:
            raise
        except Exception as exc:
            raise InputError(f"{tokenizer_file} is missing or unreadable ({one_line(exc)})", "re-export the model") from None

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """Token ids of one text as the model sees it (with [CLS]/[SEP] unless ``special`` is False; truncated)."""
        return self._tok.encode(text, add_special_tokens=special).ids

    def _run(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    def _open(self) -> bool:
        raise NotImplementedError

    def embed(self, texts: Sequence[str] | str, batch_size: int | None = None) -> np.ndarray:
        """Sentence embeddings of ``texts`` in their order: float32 [n, dim]."""
        if not self._open():
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

    def sibling(self) -> "EncoderTextSession":
        """Embedding keeps no state between calls and the engines' run() is thread-safe: one session serves
        parallel requests."""
        return self

    def _not_a_decoder(self, *args: Any, **kw: Any):
        raise InputError(f"{self.path} is a sentence encoder: it embeds text and does not generate",
                         "call embed(texts) (in Python: edgekit.load(dir).embed([...]))")

    generate = logits = stream_tokens = _not_a_decoder
