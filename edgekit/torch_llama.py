"""A trainable torch Llama built from an edgekit :class:`~edgekit.model.Model`, whatever the passes did to it.

transformers' ``LlamaForCausalLM`` (used for the float reference) needs one width for every layer
and one matrix per linear. Compression passes break both: structured pruning leaves layers with
different MLP widths and head counts, low-rank factorization puts two matrices where one was. This
module reads every width from the tensors themselves, so the same code computes calibration
statistics, quality after each pass, and distillation (recovery) for any compressed model.

Two hooks make recovery "compression-aware":

- ``mlp_mask`` / ``head_mask`` (per layer, 1 = keep) scale MLP channels and attention heads inside the
  forward pass, so pruning can fade channels out while the rest of the network learns to compensate;
- ``weight_fn`` on a :class:`Linear` maps the float weight to what the forward pass uses (e.g. a
  ternary projection with a straight-through gradient).

Numerics follow transformers' float32 order of operations (a test checks logits against it at 1e-4).
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from edgekit.model import LOWRANK_A, LOWRANK_B, Model


def torch_threads() -> int:
    """Threads for torch work: every core this process may use, or ``EDGEKIT_TORCH_THREADS``.

    On a machine other processes keep busy, fewer threads than cores is much faster: torch's threads
    spin waiting for a core another process holds (1 thread ran 3-30x faster than 2 on a loaded 2-core VM).
    """
    env = os.environ.get("EDGEKIT_TORCH_THREADS")
    if env:
        return max(1, int(env))
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def set_threads() -> None:
    torch.set_num_threads(torch_threads())


def _param(a: np.ndarray, trainable: bool) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.from_numpy(np.array(a, dtype=np.float32)), requires_grad=trainable)


class Linear(torch.nn.Module):
    """``y = x @ W^T`` with W dense ``[out, in]``, or two factors ``y = (x @ A^T) @ B^T``."""

    def __init__(self, model: Model, base: str, effective: bool, trainable: bool):
        super().__init__()
        self.base = base
        get = model.effective_weight if effective else (lambda n: model.tensors[n])
        factors = model.lowrank_factors(base)
        self.names = list(factors) if factors else [base + ".weight"]
        self.weights = torch.nn.ParameterList([_param(get(n), trainable) for n in self.names])
        self.weight_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.input_hook: Callable[[str, torch.Tensor], None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name, w in zip(self.names, self.weights):
            if self.input_hook is not None:
                self.input_hook(name, x)
            x = F.linear(x, self.weight_fn(w) if self.weight_fn is not None else w)
        return x

    @property
    def out_features(self) -> int:
        return int(self.weights[-1].shape[0])


class Block(torch.nn.Module):
    def __init__(self, model: Model, i: int, effective: bool, trainable: bool):
        super().__init__()
        p = f"model.layers.{i}."
        lin = {k: Linear(model, p + v, effective, trainable) for k, v in (
            ("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"), ("o", "self_attn.o_proj"),
            ("gate", "mlp.gate_proj"), ("up", "mlp.up_proj"), ("down", "mlp.down_proj"))}
        self.lin = torch.nn.ModuleDict(lin)
        self.input_layernorm = _param(model.tensors[p + "input_layernorm.weight"], trainable)
        self.post_attention_layernorm = _param(model.tensors[p + "post_attention_layernorm.weight"], trainable)
        hd = model.spec.head_dim
        self.head_dim = hd
        self.heads = lin["q"].out_features // hd
        self.kv_heads = lin["k"].out_features // hd
        self.mlp_mask: torch.Tensor | None = None  # [intermediate]
        self.head_mask: torch.Tensor | None = None  # [heads]


class LlamaNet(torch.nn.Module):
    """Causal LM over ``[batch, seq]`` token ids, no KV cache (scoring and training only)."""

    def __init__(self, model: Model, effective: bool = False, trainable: bool = False):
        super().__init__()
        s = model.spec
        self.spec = s
        get = model.effective_weight if effective else (lambda n: model.tensors[n])
        self.embed = _param(get("model.embed_tokens.weight"), False)  # embedding / tied head stay frozen
        self.head = None if s.tie_word_embeddings else _param(get("lm_head.weight"), False)
        self.final_norm = _param(model.tensors["model.norm.weight"], trainable)
        self.blocks = torch.nn.ModuleList([Block(model, i, effective, trainable) for i in range(s.num_layers)])
        inv = 1.0 / (s.rope_theta ** (torch.arange(0, s.head_dim, 2, dtype=torch.int64).float() / s.head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return w * (x * torch.rsqrt(var + self.spec.rms_norm_eps))

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        B, S = ids.shape
        x = F.embedding(ids, self.embed)
        pos = torch.arange(S, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        h2 = self.spec.head_dim // 2
        for blk in self.blocks:
            h = self._norm(x, blk.input_layernorm)
            q = blk.lin["q"](h).view(B, S, blk.heads, blk.head_dim).transpose(1, 2)
            k = blk.lin["k"](h).view(B, S, blk.kv_heads, blk.head_dim).transpose(1, 2)
            v = blk.lin["v"](h).view(B, S, blk.kv_heads, blk.head_dim).transpose(1, 2)
            q = q * cos + torch.cat((-q[..., h2:], q[..., :h2]), dim=-1) * sin
            k = k * cos + torch.cat((-k[..., h2:], k[..., :h2]), dim=-1) * sin
            group = blk.heads // blk.kv_heads
            if group > 1:
                k = k.repeat_interleave(group, dim=1)
                v = v.repeat_interleave(group, dim=1)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, heads, S, hd]
            if blk.head_mask is not None:
                o = o * blk.head_mask[None, :, None, None]
            x = x + blk.lin["o"](o.transpose(1, 2).reshape(B, S, -1))
            h = self._norm(x, blk.post_attention_layernorm)
            a = F.silu(blk.lin["gate"](h)) * blk.lin["up"](h)
            if blk.mlp_mask is not None:
                a = a * blk.mlp_mask
            x = x + blk.lin["down"](a)
        return self._norm(x, self.final_norm)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        head = self.embed if self.head is None else self.head
        return F.linear(self.hidden(ids), head)

    def linears(self) -> list[Linear]:
        return [lin for blk in self.blocks for lin in blk.lin.values()]

    def write_back(self, model: Model) -> None:
        """Copy the (trained) float weights into ``model.tensors`` (norms and linears; the embedding is frozen)."""
        for lin in self.linears():
            for name, w in zip(lin.names, lin.weights):
                model.tensors[name] = w.detach().numpy().astype(np.float32).copy()
        for i, blk in enumerate(self.blocks):
            p = f"model.layers.{i}."
            model.tensors[p + "input_layernorm.weight"] = blk.input_layernorm.detach().numpy().copy()
            model.tensors[p + "post_attention_layernorm.weight"] = blk.post_attention_layernorm.detach().numpy().copy()
        model.tensors["model.norm.weight"] = self.final_norm.detach().numpy().copy()


def input_key(name: str) -> str:
    """Linears that read the same input share one input statistic: q/k/v (and A factors), gate/up."""
    if name.endswith(LOWRANK_B):
        return name  # its input is the factor A's output: its own statistic
    base = name[: -len(LOWRANK_A)] if name.endswith(LOWRANK_A) else name[: -len(".weight")]
    layer = base.split(".self_attn.")[0].split(".mlp.")[0]
    kind = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
            "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_down"}[base.rsplit(".", 1)[1]]
    return f"{layer}.{kind}"


def collect_input_grams(model: Model, sequences: list[list[int]], progress=None,
                        effective: bool = False) -> dict[str, torch.Tensor]:
    """Mean ``x x^T`` (float64) of every linear's input over the calibration tokens, keyed by :func:`input_key`."""
    set_threads()
    net = LlamaNet(model, effective=effective).eval()
    acc: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    seen: set[tuple[str, int]] = set()

    def hook(name: str, x: torch.Tensor) -> None:
        key = input_key(name)
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
        self.net = LlamaNet(model, effective=effective).eval()
        self.tokenize = tokenize

    def logits(self, ids: list[int]) -> np.ndarray:
        with torch.inference_mode():
            return self.net(torch.tensor([list(ids)], dtype=torch.long))[0].float().numpy()
