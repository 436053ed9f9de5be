"""The one torch decoder for every architecture, built from an edgekit :class:`~edgekit.model.Model`
whatever the passes did to it, with an optional in-place KV cache.

transformers' classes (used for the float reference) need one width for every layer and one matrix per
linear; compression breaks both (pruning leaves layers with different MLP widths and head counts,
low-rank puts two matrices where one was). This module reads every width from the tensors, and every
architectural switch from the :class:`~edgekit.architectures.spec.DecoderSpec`, so the same code
computes calibration statistics, quality after each pass, distillation (recovery) and the Core ML trace.

- Scoring / training (``forward(ids)``): no cache, causal attention (sliding-window masks where the
  layer has a window). Numerics follow transformers' float32 order of operations (a test per
  architecture checks logits at 1e-4).
- Stateful (``cache_len`` set; ``forward(ids, causal_mask)``): fp16 buffers ``keyCache`` / ``valueCache``
  ``[layers, 1, max_kv_heads, cache_len, head_dim]`` written in place by slice assignment, which Core ML
  converts to states. Query heads sharing a KV head are folded into the query axis so K/V are never
  repeated, and the softmax scale is folded into q so Core ML keeps its fused attention op.

Every tensor is one parameter ``w<k>`` (``k`` its index in ``model.tensor_order()``), used through
``F.linear`` / ``F.embedding``; a tied head is the embedding's parameter used twice. Two hooks make
recovery compression-aware: per-layer ``mlp_mask`` / ``head_mask`` (1 = keep), and ``weight_fn`` on a
:class:`Linear` (e.g. a ternary projection with a straight-through gradient).
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from edgekit.architectures import layout as L
from edgekit.model import Model

STATES = ("keyCache", "valueCache")
# short keys of a block's linears (what passes and hooks use)
ROLE_KEYS = {"q": L.Q, "k": L.K, "v": L.V, "o": L.O, "gate": L.GATE, "up": L.UP, "down": L.DOWN}


def torch_threads() -> int:
    """Threads for torch work: every core this process may use, or ``EDGEKIT_TORCH_THREADS``.

    On a machine other processes keep busy, fewer threads than cores is much faster: torch's threads
    spin waiting for a core another process holds.
    """
    env = os.environ.get("EDGEKIT_TORCH_THREADS")
    if env:
        return max(1, int(env))
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def set_threads() -> None:
    torch.set_num_threads(torch_threads())


class Linear:
    """``y = x @ W^T (+ b)`` with W dense ``[out, in]``, or two factors ``y = (x @ A^T) @ B^T (+ b)``."""

    def __init__(self, net: "DecoderNet", model: Model, base: str):
        self.net, self.base = net, base
        factors = model.lowrank_factors(base)
        self.names = list(factors) if factors else [base + ".weight"]
        self.bias_name = base + ".bias" if base + ".bias" in model.tensors else None
        self.weight_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
        # per weight name, overriding weight_fn (the two factors of a low-rank linear quantize apart)
        self.weight_fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        self.input_hook: Callable[[str, torch.Tensor], None] | None = None
        # what the runtime does to the input before the matmul (e.g. llama.cpp's int8 blocks of 32): QAT trains
        # through it so that the numbers it learns are the ones the runtime's arithmetic rewards
        self.input_fn: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def weights(self) -> list[torch.nn.Parameter]:
        return [self.net.param(n) for n in self.names]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.names:
            if self.input_hook is not None:
                self.input_hook(name, x)
            w = self.net.param(name)
            fn = self.weight_fns.get(name, self.weight_fn)
            x = F.linear(self.input_fn(x) if self.input_fn is not None else x, fn(w) if fn is not None else w)
        if self.bias_name is not None:
            x = x + self.net.param(self.bias_name)
        return x

    @property
    def out_features(self) -> int:
        return int(self.net.param(self.names[-1]).shape[0])


class Block:
    """One layer's linears, norms and widths (plain object: the parameters live on the net)."""

    def __init__(self, net: "DecoderNet", model: Model, i: int):
        self.i, self.prefix = i, L.prefix(i)
        self.lin = {k: Linear(net, model, L.linear(i, role)) for k, role in ROLE_KEYS.items()}
        hd = model.spec.head_dim
        self.head_dim = hd
        self.heads = self.lin["q"].out_features // hd
        self.kv_heads = self.lin["k"].out_features // hd
        self.window = model.spec.window(i)
        self.rope = model.spec.rope_kind(i)
        self.mlp_mask: torch.Tensor | None = None  # [intermediate]
        self.head_mask: torch.Tensor | None = None  # [heads]


class DecoderNet(torch.nn.Module):
    """Causal LM over ``[batch, seq]`` token ids; stateful (Core ML) when ``cache_len`` is given."""

    def __init__(self, model: Model, effective: bool = False, trainable: bool = False, cache_len: int | None = None):
        super().__init__()
        s = model.spec
        self.spec = s
        get = model.effective_weight if effective else (lambda n: model.tensors[n])
        self.names = model.tensor_order()
        self.index = {n: k for k, n in enumerate(self.names)}
        frozen = {L.EMBED, L.HEAD}  # the embedding / head stay frozen in training
        for n, k in self.index.items():
            a = torch.from_numpy(np.array(get(n), dtype=np.float32))
            self.register_parameter(f"w{k}", torch.nn.Parameter(a, requires_grad=trainable and n not in frozen))
        self.blocks = [Block(self, model, i) for i in range(s.num_layers)]
        self.head_name = L.output_head(s)
        self.cache_len = cache_len
        positions = cache_len or s.max_position
        for kind in ("global", "local"):
            inv = torch.from_numpy(s.inv_freq(kind))
            self.register_buffer(f"inv_freq_{kind}", inv, persistent=False)
            if cache_len:
                freqs = torch.arange(positions, dtype=torch.float32)[:, None] * inv[None, :]
                emb = torch.cat((freqs, freqs), dim=-1)
                self.register_buffer(f"cos_{kind}", emb.cos(), persistent=False)
                self.register_buffer(f"sin_{kind}", emb.sin(), persistent=False)
        if cache_len:
            for name in STATES:
                self.register_buffer(name, torch.zeros(self.cache_shape(cache_len), dtype=torch.float16))

    # ------------------------------------------------------------------ pieces

    def param(self, name: str) -> torch.nn.Parameter:
        return getattr(self, f"w{self.index[name]}")

    def cache_shape(self, ctx: int) -> tuple[int, ...]:
        return (self.spec.num_layers, 1, max(b.kv_heads for b in self.blocks), ctx, self.spec.head_dim)

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return self.param(name) * (x * torch.rsqrt(var + self.spec.rms_norm_eps))

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rd = self.spec.rotary_dim
        rot, rest = (x[..., :rd], x[..., rd:]) if rd < x.shape[-1] else (x, None)
        h = rd // 2
        out = rot * cos + torch.cat((-rot[..., h:], rot[..., :h]), dim=-1) * sin
        return out if rest is None else torch.cat((out, rest), dim=-1)

    def _tables(self, kind: str, start, end) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache_len:
            return getattr(self, f"cos_{kind}")[start:end][None, None], getattr(self, f"sin_{kind}")[start:end][None, None]
        pos = torch.arange(start, end, dtype=torch.float32)
        freqs = pos[:, None] * getattr(self, f"inv_freq_{kind}")[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[None, None], emb.sin()[None, None]

    def _mlp(self, blk: Block, h: torch.Tensor) -> torch.Tensor:
        gate = blk.lin["gate"](h)
        act = F.gelu(gate, approximate="tanh") if self.spec.activation == "gelu_tanh" else F.silu(gate)
        a = act * blk.lin["up"](h)
        if blk.mlp_mask is not None:
            a = a * blk.mlp_mask
        return blk.lin["down"](a)

    def _qkv(self, blk: Block, h: torch.Tensor, cos, sin):
        B, S, _ = h.shape
        hd = blk.head_dim
        q = blk.lin["q"](h).view(B, S, blk.heads, hd)
        k = blk.lin["k"](h).view(B, S, blk.kv_heads, hd)
        v = blk.lin["v"](h).view(B, S, blk.kv_heads, hd).transpose(1, 2)
        if self.spec.qk_norm:
            q, k = self._norm(q, blk.prefix + L.Q_NORM), self._norm(k, blk.prefix + L.K_NORM)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        return self._rope(q, cos, sin), self._rope(k, cos, sin), v

    # ------------------------------------------------------------------ forward

    def hidden(self, ids: torch.Tensor, causal_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, S = ids.shape
        end = causal_mask.shape[-1] if causal_mask is not None else S
        past = end - S
        x = self.embed(ids)
        tables = self.rope_tables(past, end)
        masks: dict[int | None, torch.Tensor] = {}
        for blk in self.blocks:
            x = self.block_forward(blk, x, tables, masks, causal_mask, past, end)
        return self._norm(x, L.FINAL_NORM)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(ids, self.param(L.EMBED))
        if self.spec.embed_scale != 1.0:
            x = x * torch.tensor(self.spec.embed_scale, dtype=torch.float32)
        return x

    def rope_tables(self, start: int, end: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {kind: self._tables(kind, start, end) for kind in {b.rope for b in self.blocks}}

    def block_forward(self, blk: Block, x: torch.Tensor, tables: dict, masks: dict,
                      causal_mask: torch.Tensor | None = None, past: int = 0, end: int | None = None) -> torch.Tensor:
        """One decoder layer on the residual stream ``x`` [batch, seq, hidden] (block-wise training runs these one at a time)."""
        s = self.spec
        B, S, _ = x.shape
        p = blk.prefix
        h = self._norm(x, p + L.ATTN_NORM)
        q, k, v = self._qkv(blk, h, *tables[blk.rope])
        if causal_mask is None:
            o = self._attend(blk, q, k, v, S, masks)
        else:
            o = self._attend_cached(blk, q, k, v, past, end, causal_mask, masks)
        if blk.head_mask is not None:
            o = o * blk.head_mask[None, :, None, None]
        o = blk.lin["o"](o.transpose(1, 2).reshape(B, S, -1))
        if s.sandwich_norms:
            o = self._norm(o, p + L.POST_ATTN_NORM)
        x = x + o
        m = self._mlp(blk, self._norm(x, p + L.MLP_NORM))
        if s.sandwich_norms:
            m = self._norm(m, p + L.POST_MLP_NORM)
        return x + m

    def block_params(self, blk: Block) -> list[str]:
        """The tensor names of one layer (its linears, biases and norms)."""
        return [n for n in self.names if n.startswith(blk.prefix)]

    def _attend(self, blk: Block, q, k, v, S: int, masks: dict) -> torch.Tensor:
        group = blk.heads // blk.kv_heads
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scale = self.spec.softmax_scale
        if blk.window is None or blk.window >= S:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        if blk.window not in masks:  # keys j with i - window < j <= i (transformers' sliding window)
            i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
            masks[blk.window] = (j <= i) & (j > i - blk.window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=masks[blk.window], scale=scale)

    def _attend_cached(self, blk: Block, q, k, v, past, end, causal_mask, masks: dict) -> torch.Tensor:
        i, kvh, hd = blk.i, blk.kv_heads, blk.head_dim
        S = q.shape[2]
        self.keyCache[i, :, :kvh, past:end, :] = k.half()
        self.valueCache[i, :, :kvh, past:end, :] = v.half()
        keys = self.keyCache[i, :, :kvh, :end, :].float()
        values = self.valueCache[i, :, :kvh, :end, :].float()
        key = blk.window
        if key not in masks:
            mask = causal_mask.float()  # [1, 1, S, T]: 0 where visible, -inf where not
            if blk.window is not None:
                qpos = torch.arange(S)[:, None] + past
                kpos = torch.arange(end)[None, :]
                mask = mask.masked_fill((kpos <= qpos - blk.window)[None, None], float("-inf"))
            masks[key] = mask
        group = blk.heads // kvh
        scale = self.spec.softmax_scale * hd ** 0.5
        if scale != 1.0:
            q = q * scale
        qg = q.reshape(1, kvh, group * S, hd)
        o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=masks[key].repeat(1, 1, group, 1))
        return o.reshape(1, blk.heads, S, hd)

    def forward(self, ids: torch.Tensor, causal_mask: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(self.hidden(ids, causal_mask), self.param(self.head_name))

    # ------------------------------------------------------------------ training support

    def linears(self) -> list[Linear]:
        return [lin for blk in self.blocks for lin in blk.lin.values()]

    def write_back(self, model: Model) -> None:
        """Copy the trained float tensors (everything but the frozen embedding / head) into ``model``."""
        for n, k in self.index.items():
            p = getattr(self, f"w{k}")
            if p.requires_grad:
                model.tensors[n] = p.detach().numpy().astype(np.float32).copy()


def collect_input_grams(model: Model, sequences: list[list[int]], progress=None,
                        effective: bool = False) -> dict[str, torch.Tensor]:
    """Mean ``x x^T`` (float64) of every linear's input over the calibration tokens, keyed by :func:`layout.input_key`."""
    set_threads()
    net = DecoderNet(model, effective=effective).eval()
    acc: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    seen: set[tuple[str, int]] = set()

    def hook(name: str, x: torch.Tensor) -> None:
        key = L.input_key(name)
        if (key, id(x)) in seen:  # q/k/v read the very same tensor: count it once
            return
        seen.add((key, id(x)))
        x = x.detach().reshape(-1, x.shape[-1]).double()
        acc[key] = acc.get(key, 0) + x.T @ x
        counts[key] = counts.get(key, 0) + x.shape[0]

    for lin in net.linears():
        lin.input_hook = hook
    with torch.inference_mode():
        for k, seq in enumerate(sequences):
            seen.clear()
            net(torch.tensor([seq], dtype=torch.long))
            if progress:
                progress("calibration forward", k + 1, len(sequences))
    return {k: v / counts[k] for k, v in acc.items()}


class TorchSession:
    """Scores a model (as its passes left it) like a runtime session does, for quality after each pass."""

    runtime = "torch"

    def __init__(self, model: Model, tokenize: Callable[[str], list[int]], effective: bool = True):
        set_threads()
        self.net = DecoderNet(model, effective=effective).eval()
        self.tokenize = tokenize

    def logits(self, ids: list[int]) -> np.ndarray:
        with torch.inference_mode():
            return self.net(torch.tensor([list(ids)], dtype=torch.long))[0].float().numpy()
