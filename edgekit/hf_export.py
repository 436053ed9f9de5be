"""Write a float model as a Hugging Face directory, so other tools (optimum, onnxruntime-genai) can export it.

``python -m edgekit.hf_export OUT [MODEL]`` writes ``config.json``, ``model.safetensors``,
``generation_config.json``, ``tokenizer.json`` and ``tokenizer_config.json`` for MODEL (default: the
embedded SmolLM2). The weights are edgekit's float reference (the GGUF dequantized to fp32) in
transformers' own class, so an export of this directory is compared against exactly the model
``edgekit profile --reference`` scores with. Needs torch and transformers (conversion extras).

``build_genai(HF_DIR, OUT, precision)`` runs onnxruntime-genai's own model builder on such a directory
(``python -m edgekit.hf_export --genai HF_DIR OUT PRECISION`` in a child process, with the two shims
its 0.18 release needs under transformers 4.57).
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


# onnxruntime-genai 0.18's builder imports classes that only transformers 5 has and iterates
# config.rope_scaling, which transformers 4.57 leaves None: both are shimmed in the child that runs it.
_GENAI_MISSING_OK = ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration",
                     "Qwen3VLForConditionalGeneration", "Lfm2VlForConditionalGeneration",
                     "Mistral3ForConditionalGeneration", "Gemma3ForConditionalGeneration",
                     "Qwen2_5_VLForConditionalGeneration")


def _run_genai_builder(hf_dir: Path, out: Path, precision: str) -> None:
    """In this (child) process: shim transformers, patch a copy of the config, run the builder's CLI."""
    import runpy
    import shutil
    import tempfile

    import onnxruntime_genai.models as gm

    sys.path.insert(0, gm.__path__[0])  # the builder imports its siblings as top-level modules
    import transformers

    names = ("AutoModelForCausalLM", "AutoModelForSpeechSeq2Seq", "AutoTokenizer", "GenerationConfig") + _GENAI_MISSING_OK
    missing = []
    for name in names:  # importing some of these replaces sys.modules["transformers"]: resolve them all first
        try:
            getattr(sys.modules["transformers"], name)
        except (AttributeError, ImportError):
            missing.append(name)
    for name in missing:
        if name not in _GENAI_MISSING_OK:
            raise InputError(f"transformers {transformers.__version__} lacks {name}, which the genai builder needs")
        setattr(sys.modules["transformers"], name, type(name, (), {}))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "hf"
        shutil.copytree(hf_dir, src)
        cfg = json.loads((src / "config.json").read_text())
        if cfg.get("rope_scaling") is None:
            cfg["rope_scaling"] = {"rope_type": "default"}  # what transformers 5's rope_parameters would say
        (src / "config.json").write_text(json.dumps(cfg))
        sys.argv = ["builder", "-i", str(src), "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(Path(tmp) / "cache")]
        runpy.run_path(str(Path(gm.__path__[0]) / "builder.py"), run_name="__main__")
    # the builder adds the tokenizer's end-of-turn token even when it lies outside the model's vocabulary
    # (tiny test models), which og.Model then refuses
    gpath = out / "genai_config.json"
    g = json.loads(gpath.read_text())
    eos = g["model"].get("eos_token_id")
    if isinstance(eos, list):
        g["model"]["eos_token_id"] = [e for e in eos if e < g["model"]["vocab_size"]]
        gpath.write_text(json.dumps(g, indent=4))


def build_genai(hf_dir: str | Path, out: str | Path, precision: str = "int4", timeout: float = 1800) -> Path:
    """Build an onnxruntime-genai directory from a Hugging Face directory with genai's own model builder
    (in a child process, so its shims never touch the caller's transformers)."""
    import subprocess

    out = Path(out)
    proc = subprocess.run([sys.executable, "-m", "edgekit.hf_export", "--genai", str(hf_dir), str(out), precision],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not (out / "genai_config.json").is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise InputError(f"the onnxruntime-genai builder failed on {hf_dir} ({last})", "pip install onnxruntime-genai onnx-ir")
    return out


def main(argv: list[str] | None = None) -> None:
    from edgekit.sources import load_reference, resolve

    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--genai"] and len(args) == 4:
        _run_genai_builder(Path(args[1]), Path(args[2]), args[3])
        return
    if not args or len(args) > 2:
        raise SystemExit("usage: python -m edgekit.hf_export OUT [MODEL] | --genai HF_DIR OUT PRECISION")
    print(write_hf_dir(load_reference(resolve(args[1] if len(args) > 1 else None)), args[0]))


if __name__ == "__main__":
    main()
