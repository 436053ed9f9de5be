"""The float reference in torch (transformers' class of the architecture), used for quality and calibration.

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
    from edgekit.architectures.torch_decoder import torch_threads

    torch.set_num_threads(torch_threads())
    return torch


def build_torch_model(model: Model, effective: bool = False):
    """The transformers class of ``model``'s architecture holding its weights (``effective``: as stored
    after passes). transformers is the independent oracle; only when its config cannot express the spec
    (rope factors read from a GGUF) does edgekit's own torch decoder stand in."""
    torch = _torch()
    import transformers
    from transformers.modeling_utils import no_init_weights

    from edgekit import architectures

    arch = architectures.of(model.spec)
    cfg = arch.to_hf_config(model.spec)
    if cfg is None:
        from edgekit.architectures.torch_decoder import DecoderNet

        return _OwnDecoder(DecoderNet(model, effective=effective).eval())
    transformers.logging.set_verbosity_error()
    config = getattr(transformers, arch.hf_config_class)(**cfg)
    with no_init_weights():
        net = getattr(transformers, arch.hf_class)(config)
    tensors = {n: np.array(model.effective_weight(n) if effective else model.tensors[n], dtype=np.float32)
               for n in model.tensors}
    state = {k: torch.from_numpy(v) for k, v in arch.to_hf_state(tensors, model.spec).items()}
    missing, unexpected = net.load_state_dict(state, strict=False)
    allowed = {"lm_head.weight"} if model.spec.tie_word_embeddings else set()
    if set(missing) - allowed or unexpected:
        raise RuntimeError(f"{arch.hf_class} state mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if model.spec.tie_word_embeddings:
        net.tie_weights()
    return net.eval()


class _OwnDecoder:
    """Calls edgekit's decoder the way transformers' models are called below."""

    def __init__(self, net):
        self.net = net

    def __call__(self, input_ids, use_cache=False):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.net(input_ids))


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
