"""The float Llama decoder as a torch module with a stateful KV cache, for conversion to Core ML.

Why not reuse transformers' ``LlamaForCausalLM``: compressed models have per-layer widths (structured
pruning) and factor pairs (low-rank) it cannot hold, and its cache classes do not trace into a graph
with in-place state updates. This module writes the decoder out (RMSNorm, rotate-half RoPE,
grouped-query attention without repeating K/V, SiLU MLP) with every width read from the tensors, the
way :mod:`edgekit.torch_llama` does for scoring.

Conversion contract (what :mod:`edgekit.runtimes.coreml` relies on), as in Apple's stateful-LLM
recipe:

- inputs ``inputIds`` int32 ``[1, S]`` and ``causalMask`` fp16 ``[1, 1, S, P + S]`` (0 where a key is
  visible, -inf where not); ``P`` (tokens already in the cache) is read from the two shapes;
- states ``keyCache`` / ``valueCache`` fp16 ``[L, 1, max_kv_heads, ctx, head_dim]``, written in place by
  slice assignment (layers with fewer KV heads use the first rows);
- output ``logits`` ``[1, S, vocab]``.

Every weight is a parameter named ``w<k>`` (``k`` its index in :func:`weight_names`) and used once
through ``F.linear`` (``[out, in]``, Core ML's ``linear`` layout) or ``F.embedding``, so the MIL pass
in :mod:`edgekit.converters.coreml_weights` finds each Hugging Face tensor's const by name and puts
the pass's own integers in its place. A tied output head is the embedding's parameter used twice.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from edgekit.model import Model

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
STATES = ("keyCache", "valueCache")


def weight_names(model: Model) -> list[str]:
    """The 2-D tensors the module holds as parameters, in a fixed order (index = parameter ``w<k>``)."""
    return model.linear_names()


def _param(a: np.ndarray) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.from_numpy(np.array(a, dtype=np.float32)), requires_grad=False)


def cache_shape(model: Model, ctx: int) -> tuple[int, ...]:
    s = model.spec
    kvh = max(model.layer_widths(i)["kv_heads"] for i in range(s.num_layers))
    return (s.num_layers, 1, kvh, ctx, s.head_dim)


class StatefulDecoder(torch.nn.Module):
    def __init__(self, model: Model, ctx: int):
        super().__init__()
        s = model.spec
        self.spec = s
        self.names = weight_names(model)
        self.index = {n: k for k, n in enumerate(self.names)}
        for n, k in self.index.items():
            self.register_parameter(f"w{k}", _param(model.tensors[n]))
        self.norms = torch.nn.ParameterDict()
        for i in range(s.num_layers):
            for n in ("input_layernorm", "post_attention_layernorm"):
                self.norms[f"l{i}_{n}"] = _param(model.tensors[f"model.layers.{i}.{n}.weight"])
        self.norms["final"] = _param(model.tensors["model.norm.weight"])
        # each linear: the parameter names it multiplies by, in order (two for a low-rank pair)
        self.plan: list[dict[str, list[str]]] = []
        self.widths = [model.layer_widths(i) for i in range(s.num_layers)]
        for i in range(s.num_layers):
            layer = {}
            for lin in LINEARS:
                base = f"model.layers.{i}.{lin}"
                factors = model.lowrank_factors(base)
                layer[lin] = [f"w{self.index[n]}" for n in (factors or (base + ".weight",))]
            self.plan.append(layer)
        self.embed_name = f"w{self.index['model.embed_tokens.weight']}"
        self.head_name = f"w{self.index[s.output_head_name()]}"
        # RoPE tables for every position: sliced at [P, P + S) at run time
        inv = 1.0 / (s.rope_theta ** (torch.arange(0, s.head_dim, 2, dtype=torch.int64).float() / s.head_dim))
        freqs = torch.arange(ctx, dtype=torch.float32)[:, None] * inv[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("rope_cos", emb.cos(), persistent=False)
        self.register_buffer("rope_sin", emb.sin(), persistent=False)
        shape = cache_shape(model, ctx)
        for name in STATES:
            self.register_buffer(name, torch.zeros(shape, dtype=torch.float16))

    def _linear(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        for n in names:
            x = F.linear(x, getattr(self, n))
        return x

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return w * (x * torch.rsqrt(var + self.spec.rms_norm_eps))

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = self.spec.head_dim // 2
        return x * cos + torch.cat((-x[..., h:], x[..., :h]), dim=-1) * sin

    def forward(self, input_ids: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        s = self.spec
        hd = s.head_dim
        S = input_ids.shape[1]
        end = causal_mask.shape[-1]
        past = end - S
        x = F.embedding(input_ids, getattr(self, self.embed_name))
        cos, sin = self.rope_cos[past:end][None, None], self.rope_sin[past:end][None, None]
        mask = causal_mask.float()  # [1, 1, S, T]
        for i, (lin, w) in enumerate(zip(self.plan, self.widths)):
            nh, kvh = w["heads"], w["kv_heads"]
            group = nh // kvh
            h = self._norm(x, self.norms[f"l{i}_input_layernorm"])
            q = self._linear(h, lin["self_attn.q_proj"]).view(1, S, nh, hd).transpose(1, 2)
            k = self._linear(h, lin["self_attn.k_proj"]).view(1, S, kvh, hd).transpose(1, 2)
            v = self._linear(h, lin["self_attn.v_proj"]).view(1, S, kvh, hd).transpose(1, 2)
            q = self._rope(q, cos, sin)
            k = self._rope(k, cos, sin)
            self.keyCache[i, :, :kvh, past:end, :] = k.half()
            self.valueCache[i, :, :kvh, past:end, :] = v.half()
            keys = self.keyCache[i, :, :kvh, :end, :].float()
            values = self.valueCache[i, :, :kvh, :end, :].float()
            # the query heads sharing a KV head are consecutive: fold them into the query axis,
            # [1, kvh, group * S, hd] against [1, kvh, T, hd], so K/V are never repeated (Core ML would
            # tile them for a broadcast); no explicit scale keeps Core ML's fused attention op
            qg = q.reshape(1, kvh, group * S, hd)
            o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask.repeat(1, 1, group, 1))
            o = o.reshape(1, nh, S, hd).transpose(1, 2).reshape(1, S, nh * hd)
            x = x + self._linear(o, lin["self_attn.o_proj"])
            h = self._norm(x, self.norms[f"l{i}_post_attention_layernorm"])
            a = F.silu(self._linear(h, lin["mlp.gate_proj"])) * self._linear(h, lin["mlp.up_proj"])
            x = x + self._linear(a, lin["mlp.down_proj"])
        return F.linear(self._norm(x, self.norms["final"]), getattr(self, self.head_name))


def causal_mask(past: int, n: int) -> np.ndarray:
    """fp16 ``[1, 1, n, past + n]``: query i sees keys j <= past + i."""
    q = np.arange(n)[:, None] + past
    k = np.arange(past + n)[None, :]
    return np.where(k > q, -np.inf, 0.0).astype(np.float16)[None, None]


def reference_logits(model: Model, ids: list[int], ctx: int) -> np.ndarray:
    """Run the module in torch (float32 weights, fp16 cache) on ``ids`` in one call: what the package computes."""
    net = StatefulDecoder(model, ctx).eval()
    with torch.inference_mode():
        out = net(torch.tensor([ids], dtype=torch.int32), torch.from_numpy(causal_mask(0, len(ids))))
    return out[0].float().numpy()
