"""Small tokenizer directories built in code (nothing downloaded), one per tokenizer kind edgekit converts.

- :func:`spm_tokenizer_dir`: a SentencePiece BPE model with byte fallback (the kind of Llama 2 / TinyLlama /
  Phi-3 / Gemma), trained on the shipped texts, saved as ``tokenizer.model`` plus the transformers fast
  tokenizer (LlamaTokenizerFast, or GemmaTokenizerFast for the Gemma style without a dummy prefix).
- :func:`qwen_tokenizer_dir`: a byte-level BPE with Qwen2's pre-tokenizer, saved as a Qwen2TokenizerFast;
  :func:`gpt2_tokenizer_dir` the same with GPT-2's.

The vocabularies are a few hundred tokens so that tiny test models built on them stay tiny.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "edgekit" / "data"

# Qwen2's pre-tokenizer regex, as in its tokenizer.json (llama.cpp's "qwen2": Llama 3's with \p{N} for \p{N}{1,3})
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

LLAMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}{{ '<start_of_turn>' + role + '\n' + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def training_texts() -> list[str]:
    """The shipped texts (edgekit/data/*.txt), whole."""
    return [f.read_text(encoding="utf-8") for f in sorted(DATA.glob("*.txt"))]


def training_lines() -> list[str]:
    """Every non-empty line of the shipped texts: SentencePiece trains on sentences (no newlines in them)."""
    return [ln for text in training_texts() for ln in text.splitlines() if ln.strip()]


def spm_tokenizer_dir(path: Path, vocab_size: int = 640, add_dummy_prefix: bool = True, style: str | None = None,
                      sentencepiece_model: bool = True, legacy: bool = True) -> int:
    """Train a SentencePiece BPE tokenizer with byte fallback into ``path``; return its vocabulary size.

    ``style`` "llama" saves a LlamaTokenizerFast (<unk>=0, <s>=1, </s>=2, legacy normalizer that prepends
    "▁" when ``add_dummy_prefix``), "gemma" a GemmaTokenizerFast (<pad>=0, <eos>=1, <bos>=2, <unk>=3, no
    dummy prefix, <start_of_turn>/<end_of_turn> and whitespace runs as user-defined pieces). Default:
    "llama" with a dummy prefix, "gemma" without.
    ``sentencepiece_model=False`` leaves only the fast tokenizer's files (tokenizer.model deleted);
    ``legacy=False`` (llama style) saves the newer form, a Metaspace pre-tokenizer instead of the normalizer.
    """
    import sentencepiece as spm

    style = style or ("llama" if add_dummy_prefix else "gemma")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # Options as Llama 2's / Gemma's tokenizer.model carry them: identity normalization, whitespace kept
    # as is (runs of spaces become "▁▁" pieces), digits split, unseen characters as <0xXX> bytes.
    ids = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1) if style == "llama" else dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3)
    # Gemma's tokenizer.model keeps its turn markers and whitespace runs as user-defined pieces (matched whole,
    # before BPE); llama.cpp and transformers both turn them into added tokens
    gemma_pieces = ["<start_of_turn>", "<end_of_turn>", "\t", "\n", "\n\n", "\u2581\u2581", "\u2581\u2581\u2581\u2581"]
    extra = {"user_defined_symbols": gemma_pieces} if style == "gemma" else {}
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_lines()), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, add_dummy_prefix=add_dummy_prefix, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, character_coverage=0.9995,
        pad_piece="<pad>", bos_piece="<s>" if style == "llama" else "<bos>",
        eos_piece="</s>" if style == "llama" else "<eos>", num_threads=1, minloglevel=2, **ids, **extra,
    )
    (path / "tokenizer.model").write_bytes(model.getvalue())
    if style == "llama":
        from transformers import LlamaTokenizerFast

        # legacy=True is what Llama 2 / TinyLlama ship (a Prepend("▁") + Replace(" ", "▁") normalizer);
        # legacy=False is the form newer conversions save (a Metaspace pre-tokenizer, prepend_scheme "first")
        tok = LlamaTokenizerFast(vocab_file=str(path / "tokenizer.model"), legacy=legacy, add_prefix_space=add_dummy_prefix,
                                 chat_template=LLAMA2_CHAT_TEMPLATE)
    elif style == "gemma":
        from transformers import GemmaTokenizerFast

        tok = GemmaTokenizerFast(vocab_file=str(path / "tokenizer.model"), chat_template=GEMMA_CHAT_TEMPLATE,
                                 additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    else:
        raise ValueError(f"unknown style {style!r}")
    tok.save_pretrained(str(path))
    if not sentencepiece_model:
        (path / "tokenizer.model").unlink()
        # add_prefix_space in tokenizer_config.json makes LlamaTokenizerFast rebuild itself from
        # tokenizer.model; tokenizer.json already holds the prefix (its Prepend normalizer)
        config = json.loads((path / "tokenizer_config.json").read_text())
        config.pop("add_prefix_space", None)
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return len(tok)


def qwen_tokenizer_dir(path: Path, vocab_size: int = 600) -> int:
    """Train a byte-level BPE with Qwen2's normalizer and pre-tokenizer into ``path`` (Qwen2TokenizerFast)."""
    from tokenizers import Regex, normalizers, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    # the pipeline of Qwen2's tokenizer.json: NFC, the regex split, then byte-level without its own regex
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tk = _train_bytelevel(vocab_size, pre, normalizers.NFC(), ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = Qwen2TokenizerFast(tokenizer_object=tk, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                             pad_token="<|endoftext|>", chat_template=QWEN2_CHAT_TEMPLATE)
    tok.save_pretrained(str(Path(path)))
    return len(tok)


def gpt2_tokenizer_dir(path: Path, vocab_size: int = 600) -> int:
    """Train a byte-level BPE with GPT-2's pre-tokenizer (ByteLevel with its own regex) into ``path``."""
    from tokenizers import pre_tokenizers
    from transformers import GPT2TokenizerFast

    tk = _train_bytelevel(vocab_size, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), None,
                          ["<|endoftext|>"])
    tok = GPT2TokenizerFast(tokenizer_object=tk, unk_token="<|endoftext|>", bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>")
    tok.save_pretrained(str(Path(path)))
    return len(tok)


def _train_bytelevel(vocab_size: int, pre_tokenizer, normalizer, specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    if normalizer is not None:
        tk.normalizer = normalizer
    tk.pre_tokenizer = pre_tokenizer
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # whole texts, so that newline runs ("\n\n", ".\n") get merges as in a real vocabulary
    tk.train_from_iterator(training_texts(), trainer=trainer)
    # after the BPE vocabulary, as Qwen2 / GPT-2 number them
    tk.add_special_tokens(specials)
    return tk
