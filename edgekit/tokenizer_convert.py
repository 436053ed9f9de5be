"""Tokenizers between Hugging Face ``tokenizer.json`` and llama.cpp's GGUF vocabulary keys.

llama.cpp does not read tokenizer.json: a GGUF carries the vocabulary, merges, token types and the
name of a pre-tokenizer llama.cpp implements in C++. gguf's ``SpecialVocab`` reads the special tokens,
merges and chat template; the token list, token types and the pre-tokenizer name are filled here
(the ``gguf`` package has no Hugging Face converter). Only byte-level BPE vocabularies are handled,
with the pre-tokenizers listed in ``_PRE_TOKENIZERS``; export-time validation then checks that
llama.cpp tokenizes the evaluation text exactly as the Hugging Face tokenizer does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgekit.errors import UnsupportedArchitectureError

_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _bytelevel(use_regex: bool) -> dict[str, Any]:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


# llama.cpp pre-tokenizer name -> the tokenizer.json pre_tokenizer that behaves the same
_PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    "gpt2": _bytelevel(True),
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _bytelevel(True)]},
    "llama-bpe": {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": _LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
            _bytelevel(False),
        ],
    },
}


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


def hf_tokenizer_to_gguf(model_dir: Path, vocab_size: int) -> dict[str, Any]:
    """GGUF ``tokenizer.*`` keys for a Hugging Face directory with a byte-level BPE tokenizer.json."""
    import gguf

    path = Path(model_dir) / "tokenizer.json"
    if not path.exists():
        raise UnsupportedArchitectureError(f"{model_dir} has no tokenizer.json", "save the tokenizer with a fast tokenizer")
    tok = json.loads(path.read_text())
    model = tok.get("model", {})
    if model.get("type") != "BPE" or tok.get("decoder", {}).get("type") != "ByteLevel":
        raise UnsupportedArchitectureError(
            f"tokenizer type {model.get('type')} is not supported", "only byte-level BPE tokenizers (GPT-2 style) are"
        )
    pre = detect_pre_tokenizer(tok.get("pre_tokenizer"))
    id_to_tok = {i: t for t, i in model["vocab"].items()}
    types = {i: 1 for i in id_to_tok}  # 1 = NORMAL
    for added in tok.get("added_tokens", []):
        id_to_tok[added["id"]] = added["content"]
        types[added["id"]] = 3 if added.get("special") else 4  # CONTROL / USER_DEFINED
    tokens, token_types = [], []
    for i in range(max(vocab_size, len(id_to_tok))):
        tokens.append(id_to_tok.get(i, f"[PAD{i}]"))
        token_types.append(types.get(i, 5))  # 5 = UNUSED
    out = {
        "tokenizer.ggml.model": _kv("STRING", "gpt2"),
        "tokenizer.ggml.pre": _kv("STRING", pre),
        "tokenizer.ggml.tokens": _kv("ARRAY", tokens, "STRING"),
        "tokenizer.ggml.token_type": _kv("ARRAY", token_types, "INT32"),
    }
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
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


def gguf_to_hf_tokenizer(meta: dict[str, Any]):
    """A ``tokenizers.Tokenizer`` equivalent to a GGUF byte-level BPE vocabulary."""
    from tokenizers import AddedToken, Tokenizer

    pre = meta["tokenizer.ggml.pre"]["value"]
    if meta["tokenizer.ggml.model"]["value"] != "gpt2" or pre not in _PRE_TOKENIZERS:
        raise UnsupportedArchitectureError(f"GGUF tokenizer '{meta['tokenizer.ggml.model']['value']}/{pre}' has no tokenizer.json form here")
    tokens = meta["tokenizer.ggml.tokens"]["value"]
    types = meta["tokenizer.ggml.token_type"]["value"]
    merges = [m.split(" ", 1) for m in meta.get("tokenizer.ggml.merges", {"value": []})["value"]]
    spec = {
        "version": "1.0",
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": _PRE_TOKENIZERS[pre],
        "post_processor": None,
        "decoder": _bytelevel(True),
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges,
        },
    }
    tk = Tokenizer.from_str(json.dumps(spec))
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
    return tk
