"""Tokenizer conversion: llama.cpp (from the GGUF keys) and the rebuilt tokenizer.json tokenize exactly like
the Hugging Face tokenizer, for each kind edgekit converts.

Kinds: SentencePiece BPE with a dummy prefix (Llama 2 style, from tokenizer.model), without one (Gemma
style), the same two from tokenizer.json alone, Qwen2's and GPT-2's byte-level BPE, and the packaged SmolLM2. Each
tokenizer is built in code (tests/tiny_tokenizers.py); the comparison runs on the whole evaluation text
plus strings that exercise leading spaces, newlines, digits, non-ASCII and byte fallback. The last tests
show the comparison fails when a setting is wrong.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from edgekit.errors import UnsupportedArchitectureError
from edgekit.tokenizer_convert import gguf_to_hf_tokenizer, hf_tokenizer_to_gguf
from tests.tiny_tokenizers import gpt2_tokenizer_dir, qwen_tokenizer_dir, spm_tokenizer_dir

EVAL_TEXT = (Path(__file__).resolve().parent.parent / "edgekit" / "data" / "eval.txt").read_text(encoding="utf-8")
TRICKY = [
    "Hello world",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "\nstarts with a newline",
    "two\n\nparagraphs\n\n\nand more\n",
    "\r\nwindows line\r\n",
    "tab\there\t\tend",
    "12345 and 3.14159, 1,000,000",
    "héllo wörld, naïve café",
    "日本語のテキスト",
    "emoji 🤖👍🏽 ok!",
    "don't  can't  I'M",
    "x  y   z    w",
    "",
]
TEXTS = [EVAL_TEXT] + TRICKY

KINDS = ["spm", "spm_gemma", "spm_json", "spm_gemma_json", "qwen2", "gpt2"]


def write_vocab_gguf(keys: dict, path: Path) -> Path:
    """A GGUF with no tensors: llama.cpp's vocab_only load reads general.architecture and tokenizer.* only."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    for key, kv in keys.items():
        sub = gguf.GGUFValueType[kv["sub"]] if kv.get("sub") else None
        w.add_key_value(key, kv["value"], gguf.GGUFValueType[kv["type"]], sub_type=sub)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_cpp_tokenize(gguf_path: Path, texts: list[str]) -> list[list[int]]:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    try:
        return [llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in texts]
    finally:
        llm.close()


def mismatch(name: str, text: str, want: list[int], got: list[int]) -> str:
    i = next((k for k, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    return (f"{name} on {text[:40]!r}: {len(got)} tokens vs {len(want)}; first difference at {i}: "
            f"{got[max(0, i - 2):i + 4]} vs {want[max(0, i - 2):i + 4]}")


class Kind:
    def __init__(self, path: Path, vocab_size: int):
        from transformers import AutoTokenizer

        self.path = path
        self.vocab_size = vocab_size
        self.hf = AutoTokenizer.from_pretrained(str(path))
        self.keys = hf_tokenizer_to_gguf(path, vocab_size)
        self.expected = [self.hf.encode(t, add_special_tokens=False) for t in TEXTS]

    def gguf(self, keys: dict | None = None, name: str = "vocab.gguf") -> Path:
        return write_vocab_gguf(self.keys if keys is None else keys, self.path / name)


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    pytest.importorskip("sentencepiece")
    pytest.importorskip("transformers")
    built: dict[str, Kind] = {}

    def get(name: str) -> Kind:
        if name not in built:
            d = tmp_path_factory.mktemp(name)
            if name == "qwen2":
                n = qwen_tokenizer_dir(d)
            elif name == "gpt2":
                n = gpt2_tokenizer_dir(d)
            elif name == "spm_metaspace_json":
                n = spm_tokenizer_dir(d, legacy=False, sentencepiece_model=False)
            else:
                n = spm_tokenizer_dir(d, add_dummy_prefix="gemma" not in name, sentencepiece_model="json" not in name)
            built[name] = Kind(d, n)
        return built[name]

    return get


@pytest.mark.parametrize("kind", KINDS)
def test_llama_cpp_tokenizes_like_hugging_face(kinds, kind):
    k = kinds(kind)
    got = llama_cpp_tokenize(k.gguf(), TEXTS)
    for text, want, ids in zip(TEXTS, k.expected, got):
        assert ids == want, mismatch(f"llama.cpp ({kind})", text, want, ids)


@pytest.mark.parametrize("kind", KINDS)
def test_rebuilt_tokenizer_json_encodes_and_decodes_like_hugging_face(kinds, kind):
    from tokenizers import Tokenizer

    k = kinds(kind)
    # through its JSON, as the ONNX / Core ML exports save it and their runtimes load it
    tok = Tokenizer.from_str(gguf_to_hf_tokenizer(copy.deepcopy(k.keys)).to_str())
    for text, want in zip(TEXTS, k.expected):
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == want, mismatch(f"rebuilt tokenizer.json ({kind})", text, want, ids)
        assert tok.decode(ids) == text


@pytest.mark.parametrize("kind", KINDS)
def test_source_tokenizer_json_is_the_hugging_face_tokenizer(kinds, kind):
    """edgekit checks artifacts against the source's tokenizer.json read by `tokenizers` alone
    (edgekit.kinds.source_tokenizer); it must be what transformers' AutoTokenizer computes."""
    from tokenizers import Tokenizer

    k = kinds(kind)
    tok = Tokenizer.from_file(str(k.path / "tokenizer.json"))
    assert [tok.encode(t, add_special_tokens=False).ids for t in TEXTS] == k.expected


def test_json_only_tokenizers_give_the_keys_of_the_sentencepiece_model(kinds):
    """Without tokenizer.model the scores are merge ranks, not SentencePiece's; the rest is the same."""
    for spm, js in (("spm", "spm_json"), ("spm_gemma", "spm_gemma_json")):
        a, b = kinds(spm).keys, kinds(js).keys
        assert set(a) == set(b)
        for key in a:
            if key != "tokenizer.ggml.scores":
                assert a[key] == b[key], key
        assert kinds(spm).expected == kinds(js).expected  # the same tokenizer, read from other files


@pytest.mark.parametrize("kind,prefix,bos,eos", [("spm", True, "<s>", "</s>"), ("spm_gemma", False, "<bos>", "<eos>")])
def test_sentencepiece_keys(kinds, kind, prefix, bos, eos):
    k = kinds(kind)
    keys = k.keys
    tokens = keys["tokenizer.ggml.tokens"]["value"]
    types = keys["tokenizer.ggml.token_type"]["value"]
    assert keys["tokenizer.ggml.model"]["value"] == "llama"
    assert keys["tokenizer.ggml.scores"]["sub"] == "FLOAT32" and len(keys["tokenizer.ggml.scores"]["value"]) == len(tokens)
    assert len(tokens) == k.vocab_size == len(k.hf)
    assert keys["tokenizer.ggml.add_space_prefix"]["value"] is prefix
    assert tokens[keys["tokenizer.ggml.bos_token_id"]["value"]] == bos
    assert tokens[keys["tokenizer.ggml.eos_token_id"]["value"]] == eos
    assert keys["tokenizer.ggml.add_bos_token"]["value"] is True
    assert keys["tokenizer.ggml.add_eos_token"]["value"] is False
    assert "message" in keys["tokenizer.chat_template"]["value"]
    assert types[tokens.index("<0x0A>")] == 6  # BYTE: llama.cpp spells newlines (not in the vocabulary) with it
    assert types[tokens.index(bos)] == 3
    if kind == "spm_gemma":
        assert types[tokens.index("<start_of_turn>")] == 3
        # user-defined pieces: llama.cpp matches them on the raw text, so "▁" is written as a space
        assert types[tokens.index("  ")] == 4 and types[tokens.index("\n")] == 4


def test_add_prefix_space_of_tokenizer_config_overrides_the_sentencepiece_model(kinds, tmp_path):
    """transformers rebuilds the tokenizer from tokenizer.model with tokenizer_config's add_prefix_space."""
    import json
    import shutil

    from transformers import AutoTokenizer

    d = tmp_path / "no_prefix"
    shutil.copytree(kinds("spm").path, d, ignore=shutil.ignore_patterns("*.gguf"))
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "add_prefix_space": False}))
    hf = AutoTokenizer.from_pretrained(str(d))
    keys = hf_tokenizer_to_gguf(d, len(hf))
    assert keys["tokenizer.ggml.add_space_prefix"]["value"] is False
    want = [hf.encode(t, add_special_tokens=False) for t in TEXTS]
    assert want != kinds("spm").expected
    assert llama_cpp_tokenize(write_vocab_gguf(keys, d / "vocab.gguf"), TEXTS) == want


def test_metaspace_tokenizer_json_matches_but_for_a_leading_space(kinds):
    """Non-legacy Llama tokenizer.json (Metaspace, prepend_scheme "first") prepends "▁" only when the text
    does not start with a space; SentencePiece and llama.cpp always do. Nothing else differs, and the
    rebuilt tokenizer.json follows llama.cpp (so the ONNX / Core ML exports tokenize as the GGUF does)."""
    k = kinds("spm_metaspace_json")
    assert k.keys["tokenizer.ggml.add_space_prefix"]["value"] is True
    got = llama_cpp_tokenize(k.gguf(), TEXTS)
    rebuilt = gguf_to_hf_tokenizer(k.keys)
    for text, want, ids in zip(TEXTS, k.expected, got):
        assert rebuilt.encode(text, add_special_tokens=False).ids == ids
        if text.startswith(" "):
            # exactly the one "▁" Metaspace leaves out: llama.cpp(text) is Hugging Face's tokens of " " + text
            want = k.hf.encode(" " + text, add_special_tokens=False)
        assert ids == want, mismatch("llama.cpp (Metaspace tokenizer.json)", text, want, ids)


def test_qwen2_keys(kinds):
    keys = kinds("qwen2").keys
    tokens = keys["tokenizer.ggml.tokens"]["value"]
    assert keys["tokenizer.ggml.model"]["value"] == "gpt2" and keys["tokenizer.ggml.pre"]["value"] == "qwen2"
    assert tokens[keys["tokenizer.ggml.eos_token_id"]["value"]] == "<|im_end|>"
    assert keys["tokenizer.ggml.token_type"]["value"][tokens.index("<|im_start|>")] == 3
    assert "<|im_start|>" in keys["tokenizer.chat_template"]["value"]


def test_qwen2_rebuilt_tokenizer_normalizes_like_qwen2(kinds):
    """Qwen2's tokenizer.json NFC-normalizes; llama.cpp does not, so only the rebuilt tokenizer can match
    it on decomposed text (llama.cpp matches on NFC text, the test above)."""
    k = kinds("qwen2")
    text = "cafe\u0301 re\u0301sume\u0301"  # decomposed accents
    assert gguf_to_hf_tokenizer(k.keys).encode(text, add_special_tokens=False).ids == k.hf.encode(text, add_special_tokens=False)


def test_smollm2_llama_cpp_and_rebuilt_tokenizer_agree(tmp_path):
    """The packaged SmolLM2 GGUF (no Hugging Face files offline): llama.cpp on its own vocabulary, the
    rebuilt tokenizer.json, and the GGUF keys converted back from that tokenizer.json all agree."""
    from edgekit.sources import default_model_path
    from tests.conftest import smollm_tokenizer

    keys = smollm_tokenizer()
    tok = gguf_to_hf_tokenizer(keys)
    want = [tok.encode(t, add_special_tokens=False).ids for t in TEXTS]
    for text, ids in zip(TEXTS, want):
        assert tok.decode(ids) == text
    got = llama_cpp_tokenize(default_model_path(), TEXTS)
    for text, w, ids in zip(TEXTS, want, got):
        assert ids == w, mismatch("llama.cpp (SmolLM2)", text, w, ids)
    tok.save(str(tmp_path / "tokenizer.json"))
    back = hf_tokenizer_to_gguf(tmp_path, len(keys["tokenizer.ggml.tokens"]["value"]))
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        assert back[key] == keys[key], key
    again = llama_cpp_tokenize(write_vocab_gguf(back, tmp_path / "vocab.gguf"), TEXTS)
    assert again == want


# --------------------------------------------------------------------------- the comparison can fail


def _differs(k: Kind, keys: dict) -> int:
    got = llama_cpp_tokenize(k.gguf(keys, "wrong.gguf"), TEXTS)
    return sum(g != w for g, w in zip(got, k.expected))


@pytest.mark.parametrize("kind", ["spm", "spm_gemma", "spm_json"])
def test_flipped_add_space_prefix_is_caught(kinds, kind):
    k = kinds(kind)
    keys = copy.deepcopy(k.keys)
    keys["tokenizer.ggml.add_space_prefix"]["value"] = not keys["tokenizer.ggml.add_space_prefix"]["value"]
    assert _differs(k, keys) >= len(TEXTS) - 2  # every text but "" (and at most one lucky one)
    tok = gguf_to_hf_tokenizer(keys)
    assert tok.encode(EVAL_TEXT, add_special_tokens=False).ids != k.expected[0]


@pytest.mark.parametrize("kind", ["spm", "spm_json"])
def test_scores_that_ignore_merge_priority_are_caught(kinds, kind):
    """llama.cpp's SentencePiece tokenizer merges by score: equal scores (gguf's LlamaHfVocab writes -1000
    for all) or reversed ones tokenize differently."""
    k = kinds(kind)
    for wrong in (lambda s: -1000.0, lambda s: -s):
        keys = copy.deepcopy(k.keys)
        keys["tokenizer.ggml.scores"]["value"] = [wrong(s) for s in keys["tokenizer.ggml.scores"]["value"]]
        assert _differs(k, keys) > 0


def test_wrong_pre_tokenizer_is_caught(kinds):
    """GPT-2's regex keeps punctuation apart from the following letters and a space with digits; Qwen2's
    does not. (Llama 3's "llama-bpe" differs from Qwen2 only on digit runs, which this small vocabulary
    never merges, so it would tokenize the same here.)"""
    k = kinds("qwen2")
    keys = copy.deepcopy(k.keys)
    keys["tokenizer.ggml.pre"]["value"] = "gpt-2"
    assert _differs(k, keys) > 0
    ids = gguf_to_hf_tokenizer(keys).encode(EVAL_TEXT, add_special_tokens=False).ids
    assert ids != k.expected[0]


def test_gpt2_pre_tokenizer_is_written_as_llama_cpp_spells_it(kinds):
    assert kinds("gpt2").keys["tokenizer.ggml.pre"]["value"] == "gpt-2"  # llama.cpp refuses "gpt2"


# --------------------------------------------------------------------------- unsupported kinds


def _save(tok, d: Path) -> Path:
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    return d


def test_unigram_and_wordpiece_tokenizer_json_are_rejected(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    uni = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0)], unk_id=0, byte_fallback=False))
    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    for name, tok in (("unigram", uni), ("wordpiece", wp)):
        with pytest.raises(UnsupportedArchitectureError) as exc:
            hf_tokenizer_to_gguf(_save(tok, tmp_path / name), 3)
        line = exc.value.one_line()
        assert "\n" not in line and "SentencePiece BPE" in line and "byte-level BPE" in line


def test_unigram_sentencepiece_model_is_rejected(tmp_path):
    import io

    import sentencepiece as spm

    from tests.tiny_tokenizers import training_lines

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(training_lines()), model_writer=model, model_type="unigram",
                                   vocab_size=600, byte_fallback=True, minloglevel=2, num_threads=1)
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    with pytest.raises(UnsupportedArchitectureError, match="UNIGRAM"):
        hf_tokenizer_to_gguf(tmp_path, 600)


def test_unknown_gguf_tokenizer_model_is_rejected():
    with pytest.raises(UnsupportedArchitectureError):
        gguf_to_hf_tokenizer({"tokenizer.ggml.model": {"type": "STRING", "sub": None, "value": "t5"}})
