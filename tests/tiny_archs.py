"""Tiny random decoders of every architecture, built in code with transformers' own classes.

Biases, every norm weight and q/k-norm weights are randomised (transformers initialises them to 0 / 1,
which would test nothing), and linear weights are scaled like a trained model's with a few outliers so
block scales matter. Configs avoid the runtimes' shape traps (see shared/ARCHITECTURES.md): heads x
head_dim == hidden where llama.cpp assumes it, head_dim and rotated dims multiples of 16 for ONNX
Runtime's rotary, Gemma's query_pre_attn_scalar == head_dim.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from edgekit.architectures.spec import FULL, SLIDING

VOCAB = 49152  # SmolLM2's vocabulary, so its tokenizer (and the shipped texts) can drive these models
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-5,
            tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)

CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(rope_theta=10000.0)),
    "llama3": ("LlamaConfig", dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", dict(sliding_window=None, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(rope_theta=1000000.0, use_sliding_window=False)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, rope_theta=1000000.0)),
    "gemma3": ("Gemma3TextConfig", dict(num_hidden_layers=3, head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
                                        layer_types=[SLIDING, SLIDING, FULL], rope_theta=1000000.0,
                                        rope_local_base_freq=10000.0, hidden_activation="gelu_pytorch_tanh",
                                        num_key_value_heads=1, final_logit_softcapping=None)),
    "phi3": ("Phi3Config", dict(hidden_size=128, head_dim=32, partial_rotary_factor=0.5, sliding_window=None,
                                pad_token_id=None, original_max_position_embeddings=512)),
}
# the architecture each config is (llama3 is Llama with rope scaling)
ARCH_OF = {"llama3": "llama"}
HF_CLASS = {"LlamaConfig": "LlamaForCausalLM", "MistralConfig": "MistralForCausalLM", "Qwen2Config": "Qwen2ForCausalLM",
            "Qwen3Config": "Qwen3ForCausalLM", "Gemma3TextConfig": "Gemma3ForCausalLM", "Phi3Config": "Phi3ForCausalLM"}
NAMES = tuple(CONFIGS)


def hf_config(name: str, **overrides):
    import transformers

    cls, kw = CONFIGS[name]
    return getattr(transformers, cls)(**{**BASE, **kw, **overrides})


def hf_model(name: str, seed: int = 0, **overrides):
    """A transformers model of ``name`` with randomised weights, biases and norms (float32, eval mode)."""
    import torch
    import transformers

    cfg = hf_config(name, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, HF_CLASS[type(cfg).__name__])(cfg).eval()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                # Gemma stores w of (1 + w); the others the multiplier itself
                centre = 0.0 if "gemma" in type(cfg).__name__.lower() else 1.0
                p.copy_(torch.from_numpy((centre + 0.1 * rng.standard_normal(p.shape)).astype(np.float32)))
            elif pname.endswith(".bias"):
                p.copy_(torch.from_numpy((0.1 * rng.standard_normal(p.shape)).astype(np.float32)))
            elif p.ndim == 2:
                w = rng.standard_normal(p.shape).astype(np.float32) / np.sqrt(p.shape[1])
                w[rng.random(p.shape) < 0.01] *= 6  # a few outliers, as real weights have
                p.copy_(torch.from_numpy(w))
    return model


def save_hf_dir(name: str, path, seed: int = 0, tokenizer_dir=None, **overrides):
    """Save a tiny model of ``name`` as a Hugging Face directory (safetensors + config + a tokenizer)."""
    import shutil
    from pathlib import Path

    model = hf_model(name, seed, **overrides)
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file() and f.name != "config.json":
                shutil.copy(f, path / f.name)
    else:
        smollm_tokenizer_json(path / "tokenizer.json")
    return model


@lru_cache(maxsize=1)
def _smollm_tokenizer_str() -> str:
    from conftest import smollm_tokenizer

    from edgekit.tokenizer_convert import gguf_to_hf_tokenizer

    return gguf_to_hf_tokenizer(smollm_tokenizer()).to_str()


def smollm_tokenizer_json(path) -> None:
    from pathlib import Path

    Path(path).write_text(_smollm_tokenizer_str())


def edgekit_model(name: str, seed: int = 0, **overrides):
    """(edgekit Model read through the architecture's sanitize, the transformers model it came from)."""
    from conftest import smollm_tokenizer

    from edgekit import architectures
    from edgekit.model import Model

    hf = hf_model(name, seed, **overrides)
    arch = architectures.get(ARCH_OF.get(name, name))
    spec = arch.spec_from_hf(hf.config.to_dict() | {"model_type": hf.config.model_type})
    state = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
    tensors = {n: np.ascontiguousarray(a, dtype=np.float32) for n, a in arch.sanitize(state, spec).items()}
    # llama.cpp gives models named "phi3" Phi-3's special-token attributes, which need Phi-3's vocabulary
    return Model(spec, tensors, dict(smollm_tokenizer()), name=f"tiny-{name}".replace("phi3", "phi")), hf


def hf_logits(hf, ids: list[int]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return hf(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().numpy()
