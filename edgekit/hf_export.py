"""Write a float model as a Hugging Face directory, so other tools (optimum, onnxruntime-genai) can export it.

``python -m edgekit.hf_export OUT [MODEL]`` writes ``config.json``, ``model.safetensors``,
``generation_config.json``, ``tokenizer.json`` and ``tokenizer_config.json`` for MODEL (default: the
embedded SmolLM2). The weights are edgekit's float reference (the GGUF dequantized to fp32) in
transformers' own class, so an export of this directory is compared against exactly the model
``edgekit profile --reference`` scores with. Needs torch and transformers (conversion extras).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from edgekit.errors import InputError
from edgekit.model import Model


def _meta(tokenizer: dict, key: str, default=None):
    return tokenizer[key]["value"] if key in tokenizer else default


def write_hf_dir(model: Model, out: str | Path) -> Path:
    """Save ``model`` (float weights) with its tokenizer as a Hugging Face directory at ``out``."""
    from edgekit.reference import build_torch_model
    from edgekit.tokenizer_convert import gguf_to_hf_tokenizer

    out = Path(out)
    net = build_torch_model(model)
    if not hasattr(net, "save_pretrained"):  # edgekit's own decoder stood in: transformers cannot express the spec
        raise InputError(f"{model.name} has no transformers config (rope factors read from a GGUF)",
                         "export a model whose rope scaling transformers can express")
    out.mkdir(parents=True, exist_ok=True)
    tok = model.tokenizer
    tokens = _meta(tok, "tokenizer.ggml.tokens", [])
    bos, eos = _meta(tok, "tokenizer.ggml.bos_token_id"), _meta(tok, "tokenizer.ggml.eos_token_id")
    net.config.bos_token_id, net.config.eos_token_id = bos, eos
    net.generation_config.bos_token_id, net.generation_config.eos_token_id = bos, eos
    net.save_pretrained(out, safe_serialization=True)
    gguf_to_hf_tokenizer(tok).save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
           "model_max_length": model.spec.max_position}
    for name, tid in (("bos_token", bos), ("eos_token", eos)):
        if tid is not None and 0 <= int(tid) < len(tokens):
            cfg[name] = tokens[int(tid)]
    template = _meta(tok, "tokenizer.chat_template")
    if template:
        cfg["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    return out


def main(argv: list[str] | None = None) -> None:
    from edgekit.sources import load_reference, resolve

    args = sys.argv[1:] if argv is None else argv
    if not args or len(args) > 2:
        raise SystemExit("usage: python -m edgekit.hf_export OUT [MODEL]")
    print(write_hf_dir(load_reference(resolve(args[1] if len(args) > 1 else None)), args[0]))


if __name__ == "__main__":
    main()
