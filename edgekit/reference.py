"""The float reference in torch (transformers' LlamaForCausalLM), used for quality and calibration.

Only conversion and profiling import this module; the runtime wrapper never does.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from edgekit.errors import MissingDependencyError
from edgekit.model import Model


def _torch():
    try:
        import torch
    except ImportError:
        raise MissingDependencyError("torch is needed for the float reference", "run `make setup`") from None
    from edgekit.torch_llama import torch_threads

    torch.set_num_threads(torch_threads())
    return torch


def build_torch_model(model: Model, effective: bool = False):
    """A transformers LlamaForCausalLM holding ``model``'s weights (``effective``: as stored after passes)."""
    torch = _torch()
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    transformers.logging.set_verbosity_error()
    cfg = LlamaConfig(**model.spec.to_hf_config())
    with torch.device("meta"):
        net = LlamaForCausalLM(cfg)
    state = {
        n: torch.from_numpy(np.array(model.effective_weight(n) if effective else model.tensors[n], dtype=np.float32))
        for n in model.tensors
    }
    if model.spec.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    net.load_state_dict(state, strict=True, assign=True)
    if model.spec.tie_word_embeddings:
        net.tie_weights()
    # rotary buffers were created on the meta device: rebuild them on the CPU
    rotary = net.model.rotary_emb
    inv_freq, scaling = rotary.rope_init_fn(rotary.config, torch.device("cpu"))
    rotary.inv_freq = inv_freq
    rotary.original_inv_freq = inv_freq
    rotary.attention_scaling = scaling
    return net.eval()


class TorchReference:
    """Logits of a float model on token ids, in windows of ``ctx`` tokens."""

    def __init__(self, model: Model, effective: bool = False):
        self.torch = _torch()
        self.net = build_torch_model(model, effective=effective)

    def logits(self, ids: list[int]) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            out = self.net(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False).logits[0]
        return out.float().numpy()

    def windows(self, chunks: list[list[int]]) -> Iterator[np.ndarray]:
        for chunk in chunks:
            yield self.logits(chunk)
