"""What is Core ML specific about the traced decoder: its conversion contract, its mask, its names.

The module traced is :class:`edgekit.architectures.torch_decoder.DecoderNet` in stateful mode
(``DecoderNet(model, cache_len=ctx)``), the one torch decoder every architecture and every pass
uses; this module adds no forward pass of its own. Everything architectural (biases, qk-norm,
sandwich norms, GeGLU, embedding scale, sliding windows, partial rotary, rope scaling, per-layer
widths after pruning, low-rank factor pairs) is DecoderNet's.

Conversion contract (what :mod:`edgekit.runtimes.coreml` relies on), as in Apple's stateful-LLM
recipe:

- inputs ``inputIds`` int32 ``[1, S]`` and ``causalMask`` fp16 ``[1, 1, S, P + S]`` (0 where a key is
  visible, -inf where not); ``P`` (tokens already in the cache) is read from the two shapes. The
  mask is the plain causal one for every architecture: sliding-window layers add their window to it
  inside the graph, so the runtime needs no per-layer mask;
- states ``keyCache`` / ``valueCache`` fp16 ``[L, 1, max_kv_heads, ctx, head_dim]``, written in place by
  slice assignment (layers with fewer KV heads use the first rows; sliding layers keep every
  position too and mask the old ones);
- output ``logits`` ``[1, S, vocab]``;
- one ``scaled_dot_product_attention`` per layer: query heads sharing a KV head are folded into the
  query axis (K/V never repeated) and the softmax scale is folded into q (Core ML keeps its fused op).

Every tensor of :meth:`~edgekit.model.Model.tensor_order` (matrices, norms, biases, q/k norms) is a
parameter named ``w<k>``, ``k`` its index in :func:`weight_names`, used once through ``F.linear``
(``[out, in]``, Core ML's ``linear`` layout), ``F.embedding``, a multiply (norms) or an add (biases),
so the MIL pass in :mod:`edgekit.converters.coreml_weights` finds each tensor's const by that name
and puts the pass's own numbers in its place. A tied output head is the embedding's parameter used
twice.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from edgekit.architectures.torch_decoder import STATES, DecoderNet
from edgekit.model import Model
from edgekit.runtimes.coreml import causal_mask

__all__ = ["STATES", "causal_mask", "weight_names", "cache_shape", "stateful_net", "trace", "reference_logits",
           "as_stored"]


def weight_names(model: Model) -> list[str]:
    """Every tensor the traced module holds, in its parameter order (index ``k`` = parameter ``w<k>``)."""
    return model.tensor_order()


def cache_shape(model: Model, ctx: int) -> tuple[int, ...]:
    """The shape of each KV-cache state (the widest layer's KV heads), without building the module."""
    s = model.spec
    kvh = max(model.layer_widths(i)["kv_heads"] for i in range(s.num_layers))
    return (s.num_layers, 1, kvh, ctx, s.head_dim)


def stateful_net(model: Model, ctx: int) -> DecoderNet:
    """The module that is traced: float32 parameters named ``w<k>``, fp16 cache buffers of ``ctx`` positions."""
    net = DecoderNet(model, cache_len=ctx).eval()
    if net.index != {n: k for k, n in enumerate(weight_names(model))}:  # the packing pass relies on it
        raise RuntimeError("DecoderNet's parameter order differs from model.tensor_order()")
    return net


def trace(net: DecoderNet) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` of the stateful module, with a non-empty past so nothing specialises on P == 0
    or on the number of new tokens (the cache buffers are zeroed again afterwards)."""
    example = (torch.zeros((1, 2), dtype=torch.int32), torch.from_numpy(causal_mask(3, 2)))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, example, check_trace=False)
        for name in STATES:
            getattr(net, name).zero_()
    return traced


def reference_logits(model: Model, ids: list[int], ctx: int, chunks: list[int] | None = None,
                     net: torch.nn.Module | None = None) -> np.ndarray:
    """Logits ``[len(ids), vocab]`` of the module that is traced, run in torch (float32 weights, fp16
    cache): what the package computes. ``chunks`` are the sizes of successive calls through the cache
    (default: one call), e.g. ``[30] + [1] * 10`` for a prefill then step-by-step decoding. ``net``
    runs another module of the same contract instead (e.g. the traced one)."""
    net = net if net is not None else stateful_net(model, ctx)
    chunks = list(chunks) if chunks is not None else [len(ids)]
    if sum(chunks) != len(ids) or len(ids) > ctx:
        raise ValueError(f"chunks {chunks} do not split {len(ids)} tokens within a context of {ctx}")
    out, past = [], 0
    with torch.inference_mode():
        for name in STATES:
            getattr(net, name).zero_()
        for n in chunks:
            x = torch.tensor([ids[past : past + n]], dtype=torch.int32)
            out.append(net(x, torch.from_numpy(causal_mask(past, n)))[0].float().numpy())
            past += n
    return np.concatenate(out)


def as_stored(model: Model) -> Model:
    """The float model the package computes with: every tensor as stored (block encodings dequantized),
    rounded to fp16 like everything in an fp16 ML program (norms and biases included)."""
    tensors = {n: model.effective_weight(n).astype(np.float16).astype(np.float32) for n in model.tensors}
    return Model(model.spec, tensors, model.tokenizer, model.name)
