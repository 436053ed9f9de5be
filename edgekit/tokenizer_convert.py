"""Tokenizers between Hugging Face tokenizer files and llama.cpp's GGUF vocabulary keys.

llama.cpp does not read tokenizer.json: a GGUF carries the vocabulary, merges or scores, token types
and the name of a pre-tokenizer llama.cpp implements in C++. Two kinds are handled, each the way
llama.cpp's own ``convert_hf_to_gguf.py`` writes it:

- byte-level BPE (SmolLM2, Llama 3, Qwen2/3): ``tokenizer.ggml.model = "gpt2"``, merges, and one of the
  pre-tokenizers listed in ``_PRE_TOKENIZERS``;
- SentencePiece BPE with byte fallback (Llama 2, TinyLlama, Phi-3, Gemma): ``tokenizer.ggml.model =
  "llama"``, per-token scores (llama.cpp merges the adjacent pair whose merged token scores highest),
  token types and ``add_space_prefix``. Read from ``tokenizer.model`` with sentencepiece when there is
  one, otherwise from a tokenizer.json of that kind (LlamaTokenizerFast / GemmaTokenizerFast).

gguf's ``SpecialVocab`` reads the special tokens, merges and chat template; the rest is filled here (the
``gguf`` package has no converter of its own). The way back, GGUF keys -> ``tokenizers.Tokenizer`` for the
ONNX and Core ML exports, uses transformers' GGUF converter for SentencePiece vocabularies. Export-time
validation then checks that llama.cpp tokenizes the evaluation text exactly as the Hugging Face tokenizer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from edgekit.errors import InputError, MissingDependencyError, UnsupportedArchitectureError

SUPPORTED = ("byte-level BPE (pre-tokenizers: gpt2, smollm, llama-bpe, qwen2) and SentencePiece BPE with byte "
             "fallback (tokenizer.model, or a Llama/Gemma-style tokenizer.json)")

_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2 (src/llama-vocab.cpp quotes it as the original from Qwen2's
# tokenizer.json): Llama 3's with single digits
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")

# GGUF token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_SPIECE = "\u2581"  # "▁", SentencePiece's visible space
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _bytelevel(use_regex: bool) -> dict[str, Any]:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def _split_then_bytelevel(regex: str) -> dict[str, Any]:
    return {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            _bytelevel(False),
        ],
    }


# llama.cpp pre-tokenizer name -> the tokenizer.json pre_tokenizer that behaves the same
_PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    "gpt2": _bytelevel(True),
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _bytelevel(True)]},
    "llama-bpe": _split_then_bytelevel(_LLAMA3_REGEX),
    "qwen2": _split_then_bytelevel(_QWEN2_REGEX),
}
# edgekit's names are llama.cpp's (the GGUF value of tokenizer.ggml.pre) but for GPT-2's, which llama.cpp
# spells "gpt-2" (it refuses to load "gpt2")
_GGUF_PRE = {"gpt2": "gpt-2"}
_FROM_GGUF_PRE = {v: k for k, v in _GGUF_PRE.items()}
# Normalizers a byte-level tokenizer.json may carry: llama.cpp applies none, so NFC (Qwen2's) tokenizes
# the same only on NFC text, which is what evaluation texts and typed input are in practice.
_NORMALIZERS: dict[str, dict[str, Any] | None] = {"gpt2": None, "smollm": None, "llama-bpe": None, "qwen2": {"type": "NFC"}}
# llama.cpp turns ignore_merges on for these (a word already in the vocabulary is one token)
_IGNORE_MERGES = {"llama-bpe"}


def _shape(pre: dict[str, Any] | None) -> Any:
    """The parts of a pre_tokenizer that decide behaviour (ignores offsets bookkeeping)."""
    if pre is None:
        return None
    if pre.get("type") == "Sequence":
        return ("Sequence", tuple(_shape(p) for p in pre.get("pretokenizers", [])))
    keep = {"type", "individual_digits", "use_regex", "add_prefix_space", "pattern", "behavior", "invert"}
    return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in pre.items() if k in keep))


def detect_pre_tokenizer(pre: dict[str, Any] | None) -> str:
    shape = _shape(pre)
    for name, known in _PRE_TOKENIZERS.items():
        if _shape(known) == shape:
            return name
    raise UnsupportedArchitectureError(
        "the tokenizer's pre-tokenizer is not one edgekit can map to llama.cpp",
        f"supported byte-level BPE pre-tokenizers: {', '.join(_PRE_TOKENIZERS)}",
    )


def _kv(vtype: str, value: Any, sub: str | None = None) -> dict[str, Any]:
    return {"type": vtype, "sub": sub, "value": value}


def _unsupported(what: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(what, f"supported tokenizers: {SUPPORTED}")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


# ----------------------------------------------------------------------------- Hugging Face -> GGUF


def hf_tokenizer_to_gguf(model_dir: Path, vocab_size: int) -> dict[str, Any]:
    """GGUF ``tokenizer.*`` keys for a Hugging Face model directory.

    ``vocab_size`` is the model's (its embedding rows): the token list is padded to it with unused
    ``[PAD<i>]`` tokens, as llama.cpp's converter does. A ``tokenizer.model`` (SentencePiece) is read the way
    llama.cpp reads it; otherwise ``tokenizer.json`` decides between byte-level BPE and SentencePiece BPE.
    Anything else raises :class:`UnsupportedArchitectureError`.
    """
    model_dir = Path(model_dir)
    tok = _read_json(model_dir / "tokenizer.json")
    if (model_dir / "tokenizer.model").is_file():
        spm_keys = _spm_model_to_gguf(model_dir, vocab_size)
        if spm_keys is not None:
            return spm_keys
    if tok is None:
        raise _unsupported(f"{model_dir} has no tokenizer.json (nor a SentencePiece tokenizer.model)")
    model = tok.get("model", {})
    decoder = tok.get("decoder") or {}
    if model.get("type") == "BPE" and decoder.get("type") == "ByteLevel":
        return _bytelevel_to_gguf(model_dir, tok, vocab_size)
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return _spm_json_to_gguf(model_dir, tok, vocab_size)
    raise _unsupported(f"tokenizer type {model.get('type')} (byte_fallback={bool(model.get('byte_fallback'))}) is not supported")


def _special_keys(model_dir: Path, n_tokens: int, load_merges: bool) -> dict[str, Any]:
    """Special token ids, add_bos/add_eos, chat template (and BPE merges), read by gguf's SpecialVocab."""
    import gguf

    special = gguf.SpecialVocab(model_dir, load_merges=load_merges, n_vocab=n_tokens)
    out: dict[str, Any] = {}
    if special.merges:
        out["tokenizer.ggml.merges"] = _kv("ARRAY", list(special.merges), "STRING")
    for typ, tid in special.special_token_ids.items():
        key = {"unk": "unknown"}.get(typ, typ)
        out[f"tokenizer.ggml.{key}_token_id"] = _kv("UINT32", int(tid))
    for typ, flag in special.add_special_token.items():
        out[f"tokenizer.ggml.add_{typ}_token"] = _kv("BOOL", bool(flag))
    if isinstance(special.chat_template, str):
        out["tokenizer.chat_template"] = _kv("STRING", special.chat_template)
    return out


def _check_ids(model_dir: Path, id_to_tok: dict, vocab_size: int) -> None:
    """Token ids index the embedding: each must be a whole number below the vocabulary's size (a stray
    10^20 would have the token list padded to that length)."""
    limit = max(vocab_size, len(id_to_tok))
    for i, t in id_to_tok.items():
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < limit:
            raise InputError(f"{model_dir / 'tokenizer.json'}: token {str(t)[:40]!r} has id {i!r}, outside 0..{limit - 1}",
                             "re-save the tokenizer with transformers")


def _bytelevel_to_gguf(model_dir: Path, tok: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    model = tok["model"]
    pre = detect_pre_tokenizer(tok.get("pre_tokenizer"))
    norm = tok.get("normalizer")
    if norm is not None and norm != _NORMALIZERS[pre]:
        raise _unsupported(f"normalizer {norm.get('type')} with pre-tokenizer {pre} has no llama.cpp equivalent")
    id_to_tok = {i: t for t, i in model["vocab"].items()}
    types = {i: NORMAL for i in id_to_tok}
    for added in tok.get("added_tokens", []):
        id_to_tok[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    _check_ids(model_dir, id_to_tok, vocab_size)
    tokens, token_types = [], []
    for i in range(max(vocab_size, len(id_to_tok), max(id_to_tok, default=-1) + 1)):
        tokens.append(id_to_tok.get(i, f"[PAD{i}]"))
        token_types.append(types.get(i, UNUSED))
    out = {
        "tokenizer.ggml.model": _kv("STRING", "gpt2"),
        "tokenizer.ggml.pre": _kv("STRING", _GGUF_PRE.get(pre, pre)),
        "tokenizer.ggml.tokens": _kv("ARRAY", tokens, "STRING"),
        "tokenizer.ggml.token_type": _kv("ARRAY", token_types, "INT32"),
    }
    out.update(_special_keys(model_dir, len(tokens), load_merges=True))
    return out


def _spm_keys(tokens: list[str], scores: list[float], types: list[int], add_space_prefix: bool) -> dict[str, Any]:
    return {
        "tokenizer.ggml.model": _kv("STRING", "llama"),
        "tokenizer.ggml.pre": _kv("STRING", "default"),
        "tokenizer.ggml.tokens": _kv("ARRAY", tokens, "STRING"),
        "tokenizer.ggml.scores": _kv("ARRAY", [float(s) for s in scores], "FLOAT32"),
        "tokenizer.ggml.token_type": _kv("ARRAY", types, "INT32"),
        # llama.cpp's default for SPM is true; Gemma-style models do not prepend "▁"
        "tokenizer.ggml.add_space_prefix": _kv("BOOL", bool(add_space_prefix)),
    }


def _looks_special(token: str) -> bool:
    """llama.cpp's ``does_token_look_special``: added tokens some models forget to mark special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>")) or (token.startswith("<unused") and token.endswith(">")))


def _apply_added_tokens(model_dir: Path, tok: dict[str, Any] | None, tokens: list[str], scores: list[float],
                        types: list[int]) -> None:
    """Added tokens over the base vocabulary, as llama.cpp's ``_create_vocab_sentencepiece``: added_tokens.json
    (user-defined), then tokenizer.json's and tokenizer_config.json's added tokens (special or looking
    special -> control; otherwise user-defined, with "▁" pre-normalized to a space as llama.cpp matches
    user-defined tokens on the raw text)."""
    def put(tid: int, text: str, typ: int) -> None:
        while tid >= len(tokens):  # an added token past the model's vocabulary grows the list
            tokens.append(f"[PAD{len(tokens)}]")
            scores.append(-1000.0)
            types.append(UNUSED)
        tokens[tid], scores[tid], types[tid] = text, -1000.0, typ

    for text, tid in (_read_json(model_dir / "added_tokens.json") or {}).items():
        put(int(tid), text, USER_DEFINED)
    entries = [(a["id"], a) for a in (tok or {}).get("added_tokens", [])]
    config = _read_json(model_dir / "tokenizer_config.json") or {}
    entries += [(int(i), a) for i, a in config.get("added_tokens_decoder", {}).items()]
    for tid, a in entries:
        text = a["content"]
        if a.get("special") or _looks_special(text):
            put(tid, text, CONTROL)
        else:
            put(tid, text.replace(_SPIECE, " "), USER_DEFINED)


def _spm_model_to_gguf(model_dir: Path, vocab_size: int) -> dict[str, Any] | None:
    """Keys from ``tokenizer.model`` exactly as llama.cpp's ``_set_vocab_sentencepiece``; None when the file
    is not a SentencePiece model (some repositories ship a tiktoken file under that name)."""
    try:
        from sentencepiece import SentencePieceProcessor
        from sentencepiece import sentencepiece_model_pb2 as sp_pb2
    except ImportError:
        raise MissingDependencyError("reading tokenizer.model needs sentencepiece", "pip install sentencepiece protobuf") from None
    path = model_dir / "tokenizer.model"
    try:
        proto = sp_pb2.ModelProto.FromString(path.read_bytes())
        sp = SentencePieceProcessor(model_file=str(path))
    except Exception:  # not a SentencePiece protobuf
        return None
    kind = sp_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
    if kind != "BPE":
        raise _unsupported(f"SentencePiece {kind} models are not supported (llama.cpp's 'llama' tokenizer is BPE)")
    if not proto.trainer_spec.byte_fallback:
        # llama.cpp spells unknown characters as <0xXX> byte tokens; without them it cannot match <unk>
        raise _unsupported("SentencePiece models without byte_fallback are not supported")
    if proto.trainer_spec.treat_whitespace_as_suffix:
        raise _unsupported("SentencePiece models with treat_whitespace_as_suffix are not supported")
    n = max(vocab_size, sp.vocab_size())
    tokens = [f"[PAD{i}]" for i in range(n)]
    scores = [-10000.0] * n
    types = [UNUSED] * n
    for i in range(sp.vocab_size()):
        typ = NORMAL
        if sp.IsUnknown(i):
            typ = UNKNOWN
        elif sp.IsControl(i):
            typ = CONTROL
        elif sp.IsUnused(i):
            typ = UNUSED
        elif sp.IsByte(i):
            typ = BYTE
        tokens[i], scores[i], types[i] = sp.IdToPiece(i), sp.GetScore(i), typ
    _apply_added_tokens(model_dir, _read_json(model_dir / "tokenizer.json"), tokens, scores, types)
    # add_prefix_space in tokenizer_config.json makes transformers rebuild its fast tokenizer from
    # tokenizer.model with that setting, and llama.cpp's Llama converter honours it too
    prefix = (_read_json(model_dir / "tokenizer_config.json") or {}).get("add_prefix_space")
    if prefix is None:
        prefix = proto.normalizer_spec.add_dummy_prefix
    out = _spm_keys(tokens, scores, types, prefix)
    out.update(_special_keys(model_dir, len(tokens), load_merges=False))
    return out


def _is_replace_space(norm: dict[str, Any] | None) -> bool:
    return (norm or {}).get("type") == "Replace" and norm.get("pattern") == {"String": " "} and norm.get("content") == _SPIECE


def _spm_json_prefix(tok: dict[str, Any]) -> bool:
    """Whether a SentencePiece-BPE tokenizer.json prepends "▁" (llama.cpp's add_space_prefix).

    The shapes transformers saves: legacy Llama (normalizer Prepend("▁") + Replace(" ", "▁")), Gemma
    (Replace(" ", "▁"), then a no-op Split on " "), non-legacy Llama (Metaspace without splitting).
    """
    norm, pre = tok.get("normalizer"), tok.get("pre_tokenizer")
    parts = [] if norm is None else norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
    kinds = [p.get("type") for p in parts]
    if kinds in (["Prepend", "Replace"], ["Replace"]) and _is_replace_space(parts[-1]) \
            and (kinds[0] != "Prepend" or parts[0].get("prepend") == _SPIECE):
        # spaces are already "▁" when the pre-tokenizer runs, so Gemma's Split(" ") never splits
        if pre is None or (pre.get("type") == "Split" and pre.get("pattern") == {"String": " "}):
            return kinds[0] == "Prepend"
    if norm is None and (pre or {}).get("type") == "Metaspace" and pre.get("replacement") == _SPIECE:
        scheme = pre.get("prepend_scheme") or ("always" if pre.get("add_prefix_space", True) else "never")
        # split=True (the default of older files) cuts words at every "▁": llama.cpp never does. Metaspace
        # prepends "▁" only to text that does not start with one, where SentencePiece and llama.cpp always
        # do: on text starting with a space the two differ by that one "▁" (llama.cpp has no such option).
        if not pre.get("split", True):
            return scheme != "never"
    raise _unsupported("this SentencePiece-BPE tokenizer.json's normalizer/pre-tokenizer has no llama.cpp equivalent")


def _spm_json_to_gguf(model_dir: Path, tok: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """Keys from a SentencePiece-BPE tokenizer.json (no tokenizer.model).

    tokenizer.json keeps merges but no scores, and llama.cpp's SPM tokenizer merges by score: each token
    gets minus the rank of the first merge that makes it, so the pair llama.cpp merges first is the one
    with the lowest merge rank, as in Hugging Face's BPE. Tokens no merge makes (characters, bytes,
    specials) keep 0.0: llama.cpp merges symbols pairwise from characters, so a single character is
    never a merge result, and merges producing the others are not in tokenizer.json either.
    """
    add_prefix = _spm_json_prefix(tok)
    model = tok["model"]
    vocab: dict[str, int] = model["vocab"]
    id_to_tok = {i: t for t, i in vocab.items()}
    _check_ids(model_dir, id_to_tok, vocab_size)
    n = max(vocab_size, max(id_to_tok) + 1)
    tokens = [id_to_tok.get(i, f"[PAD{i}]") for i in range(n)]
    scores = [0.0 if i in id_to_tok else -10000.0 for i in range(n)]
    types = [NORMAL if i in id_to_tok else UNUSED for i in range(n)]
    first_rank: dict[str, int] = {}
    for rank, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        first_rank.setdefault(left + right, rank)
    for text, rank in first_rank.items():
        if text in vocab:
            scores[vocab[text]] = -float(rank)
    if "\t" in vocab and "<0x09>" not in vocab:
        # transformers' GemmaConverter renames the <0x09> byte piece "\t"; the tokenizer.model name keeps the
        # GGUF identical to the one made from tokenizer.model (same ids either way: llama.cpp's byte fallback)
        tokens[vocab["\t"]] = "<0x09>"
    for i, text in enumerate(tokens):
        if _BYTE_TOKEN.fullmatch(text):
            types[i] = BYTE
    if model.get("unk_token") in vocab:
        types[vocab[model["unk_token"]]] = UNKNOWN
    _apply_added_tokens(model_dir, tok, tokens, scores, types)
    out = _spm_keys(tokens, scores, types, add_prefix)
    out.update(_special_keys(model_dir, len(tokens), load_merges=False))
    return out


# ----------------------------------------------------------------------------- GGUF -> Hugging Face


def _value(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    return meta[key]["value"] if key in meta else default


def gguf_to_hf_tokenizer(meta: dict[str, Any]):
    """A ``tokenizers.Tokenizer`` equivalent to a GGUF vocabulary (byte-level BPE or SentencePiece)."""
    model = _value(meta, "tokenizer.ggml.model")
    if model == "llama":
        return _spm_gguf_to_hf(meta)
    pre = _value(meta, "tokenizer.ggml.pre")
    pre = _FROM_GGUF_PRE.get(pre, pre)
    if model != "gpt2" or pre not in _PRE_TOKENIZERS:
        raise _unsupported(f"GGUF tokenizer '{model}/{pre}' has no tokenizer.json form here")
    return _bytelevel_gguf_to_hf(meta, pre)


def _bytelevel_gguf_to_hf(meta: dict[str, Any], pre: str):
    from tokenizers import AddedToken, Tokenizer

    tokens = _value(meta, "tokenizer.ggml.tokens")
    types = _value(meta, "tokenizer.ggml.token_type")
    merges = [m.split(" ", 1) for m in _value(meta, "tokenizer.ggml.merges", [])]
    spec = {
        "version": "1.0",
        "added_tokens": [],
        "normalizer": _NORMALIZERS[pre],
        "pre_tokenizer": _PRE_TOKENIZERS[pre],
        "post_processor": None,
        "decoder": _bytelevel(True),
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": pre in _IGNORE_MERGES,
            "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges,
        },
    }
    tk = Tokenizer.from_str(json.dumps(spec))
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == CONTROL])
    return tk


def _spm_gguf_to_hf(meta: dict[str, Any]):
    """SentencePiece GGUF vocabulary -> tokenizer through transformers' own GGUF converter (the one
    ``from_pretrained(gguf_file=...)`` uses for Llama), fed the keys under transformers' names."""
    from transformers.convert_slow_tokenizer import generate_merges
    from transformers.integrations.ggml import convert_gguf_tokenizer

    tokens = list(_value(meta, "tokenizer.ggml.tokens"))
    scores = [float(s) for s in _value(meta, "tokenizer.ggml.scores")]
    types = list(_value(meta, "tokenizer.ggml.token_type"))
    # transformers' GGUFTokenizerSkeleton derives the merges from scores with a list lookup per split
    # (minutes for a 32k vocabulary, hours for Gemma's 256k); generate_merges is the same derivation with
    # dict lookups. Tokens holding a space (user-defined ones llama.cpp pre-normalized) are left out: its
    # SPM merges run on text whose spaces are already "▁", so they are never a merge result.
    vocab = {t: i for i, t in enumerate(tokens) if " " not in t}
    merges = generate_merges(vocab, {t: scores[i] for t, i in vocab.items()})
    info: dict[str, Any] = {
        "tokenizer_type": "llama",
        "tokens": tokens,
        "scores": scores,
        "token_type": types,
        "merges": [f"{a} {b}" for a, b in merges],
        # user-defined tokens are matched on the raw text, before SentencePiece, as llama.cpp does
        "added_tokens": [t for t, ty in zip(tokens, types) if ty == USER_DEFINED],
        "add_prefix_space": bool(_value(meta, "tokenizer.ggml.add_space_prefix", True)),
    }
    for key in ("bos", "eos", "unknown", "padding"):
        tid = _value(meta, f"tokenizer.ggml.{key}_token_id")
        if tid is not None:
            info[f"{'unk' if key == 'unknown' else 'pad' if key == 'padding' else key}_token_id"] = int(tid)
    tk, _ = convert_gguf_tokenizer("llama", info)
    return tk
