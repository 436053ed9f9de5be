"""Model sources: a Hugging Face directory and a GGUF file convert, and agree with each other."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgekit.sources import read_hf_dir, resolve
from edgekit.tokenizer_convert import detect_pre_tokenizer, gguf_to_hf_tokenizer
from tests.conftest import smollm_tokenizer, tiny_model


def write_hf_dir(model, d):
    from safetensors.numpy import save_file

    from edgekit import architectures

    arch = architectures.of(model.spec)
    d.mkdir()
    (d / "config.json").write_text(json.dumps(arch.to_hf_config(model.spec)))
    save_file(arch.to_hf_state(model.tensors, model.spec), str(d / "model.safetensors"))
    meta = model.tokenizer
    gguf_to_hf_tokenizer(meta).save(str(d / "tokenizer.json"))
    tokens = meta["tokenizer.ggml.tokens"]["value"]
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": tokens[meta["tokenizer.ggml.bos_token_id"]["value"]],
        "eos_token": tokens[meta["tokenizer.ggml.eos_token_id"]["value"]],
        "chat_template": meta["tokenizer.chat_template"]["value"],
    }))
    return d


def test_hf_dir_reads_back_the_weights(tmp_path):
    model = tiny_model(seed=1)
    back = read_hf_dir(write_hf_dir(model, tmp_path / "hf"))
    assert back.spec == model.spec
    for n, w in model.tensors.items():
        assert np.array_equal(back.tensors[n], w), n
    assert back.tokenizer["tokenizer.ggml.pre"]["value"] == "smollm"
    assert back.tokenizer["tokenizer.chat_template"]["value"] == model.tokenizer["tokenizer.chat_template"]["value"]


def test_hf_dir_converts_and_llama_cpp_tokenizes_like_hugging_face(tmp_path):
    """Export-time validation compares llama.cpp's tokenization of the evaluation text with the
    Hugging Face tokenizer's; a wrong pre-tokenizer mapping would fail this conversion."""
    from edgekit.pipeline import ConvertRequest, convert

    src = write_hf_dir(tiny_model(seed=2), tmp_path / "hf")
    manifest = convert(ConvertRequest(str(src), "gguf", "f16", tmp_path / "out", eval_tokens=1024))
    assert manifest["source"]["kind"] == "hf"
    assert manifest["validation"]["passed"]
    assert manifest["quality"]["kld_mean"] < 5e-3


def test_pre_tokenizer_detection_rejects_unknown():
    from edgekit.errors import UnsupportedArchitectureError

    assert detect_pre_tokenizer({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}) == "gpt2"
    with pytest.raises(UnsupportedArchitectureError):
        detect_pre_tokenizer({"type": "Whitespace"})


def test_default_source_is_the_packaged_smollm2():
    src = resolve(None)
    assert src.kind == "default" and src.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and len(src.sha256) == 64
    assert smollm_tokenizer()["tokenizer.ggml.pre"]["value"] == "smollm"
