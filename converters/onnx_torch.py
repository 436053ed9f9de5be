"""The float Llama decoder as a small torch module with an explicit KV cache, traced to ONNX.

Why not wrap transformers' ``LlamaForCausalLM``: in transformers 4.57 the cache is a ``DynamicCache``
object (tuples of tensors are deprecated) and the causal mask comes from ``masking_utils``, whose
sdpa/vmap mask builders and cache-length bookkeeping do not trace into a graph with dynamic past
length under ``torch.onnx.export(dynamo=False)`` without the patches optimum carries. The decoder is
twenty lines of arithmetic, so this module writes it out with exactly transformers' float32 order of
operations (RMSNorm, rotate-half RoPE, grouped-query attention, SiLU MLP); a test checks its logits
against ``edgekit.reference.TorchReference`` (transformers) at 1e-4.

Every linear weight is a parameter stored transposed (``[in, out]``) and used as ``x @ W`` so each
becomes one ``MatMul`` whose second input is an initializer with a name we chose: the graph surgery
in :mod:`edgekit.converters.onnx` finds the MatMul of every Hugging Face tensor by that name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgekit.model import Model

LINEARS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def param_name(hf_name: str) -> str:
    """The initializer name the exported graph gives a Hugging Face tensor."""
    if hf_name == "model.embed_tokens.weight":
        return "embed"
    if hf_name in ("lm_head.weight", "lm_head"):
        return "lm_head"
    if hf_name == "model.norm.weight":
        return "final_norm"
    rest = hf_name[len("model.layers."):]
    idx, sub = rest.split(".", 1)
    for short, long in LINEARS.items():
        if sub == long + ".weight":
            return f"layers.{idx}.{short}"
    return f"layers.{idx}.{sub.split('.')[0]}"  # input_layernorm / post_attention_layernorm


def _t(a: np.ndarray) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)), requires_grad=False)


class _Layer(torch.nn.Module):
    def __init__(self, model: Model, i: int):
        super().__init__()
        p = f"model.layers.{i}."
        for short, long in LINEARS.items():
            setattr(self, short, _t(model.tensors[p + long + ".weight"].T))
        self.input_layernorm = _t(model.tensors[p + "input_layernorm.weight"])
        self.post_attention_layernorm = _t(model.tensors[p + "post_attention_layernorm.weight"])


class Decoder(torch.nn.Module):
    def __init__(self, model: Model):
        super().__init__()
        s = model.spec
        self.spec = s
        self.embed = _t(model.tensors["model.embed_tokens.weight"])
        # tied: a separate [hidden, vocab] copy so the head has its own MatMul initializer (the surgery
        # replaces it by the encoded head or by a Transpose of the embedding; it never stays in the file)
        head = model.tensors["model.embed_tokens.weight"] if s.tie_word_embeddings else model.tensors["lm_head.weight"]
        self.lm_head = _t(head.T)
        self.final_norm = _t(model.tensors["model.norm.weight"])
        self.layers = torch.nn.ModuleList([_Layer(model, i) for i in range(s.num_layers)])
        inv = 1.0 / (s.rope_theta ** (torch.arange(0, s.head_dim, 2, dtype=torch.int64).float() / s.head_dim))
        self.register_buffer("inv_freq", inv.float(), persistent=False)

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return w * (x * torch.rsqrt(var + self.spec.rms_norm_eps))

    def _rotate_half(self, x: torch.Tensor) -> torch.Tensor:
        h = self.spec.head_dim // 2  # a Python int: constant slices in the graph
        return torch.cat((-x[..., h:], x[..., :h]), dim=-1)

    def forward(self, input_ids, position_ids, *past):
        s = self.spec
        S = input_ids.shape[1]
        x = torch.nn.functional.embedding(input_ids, self.embed)  # [1, S, H]
        freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :]  # [1, S, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[:, None], emb.sin()[:, None]  # [1, 1, S, hd]
        P = past[0].shape[2]
        # key j is visible from query i iff j <= P + i
        qpos = torch.arange(S, dtype=torch.int64)[:, None] + P
        kpos = torch.arange(P + S, dtype=torch.int64)[None, :]
        mask = torch.where(kpos > qpos, float(torch.finfo(torch.float32).min), 0.0)
        group = s.num_heads // s.num_kv_heads
        scale = s.head_dim ** -0.5
        presents = []
        nh, kvh, hd = s.num_heads, s.num_kv_heads, s.head_dim
        for i, L in enumerate(self.layers):
            h = self._norm(x, L.input_layernorm)
            # reshapes use -1 for the sequence so the exported shapes are constants (no Shape/Gather chains)
            q = (h @ L.q).reshape(1, -1, nh, hd).transpose(1, 2)
            k = (h @ L.k).reshape(1, -1, kvh, hd).transpose(1, 2)
            v = (h @ L.v).reshape(1, -1, kvh, hd).transpose(1, 2)
            q = q * cos + self._rotate_half(q) * sin
            k = k * cos + self._rotate_half(k) * sin
            k = torch.cat((past[2 * i], k), dim=2)
            v = torch.cat((past[2 * i + 1], v), dim=2)
            presents += [k, v]
            # grouped-query attention without repeating K/V: the query heads sharing a KV head are
            # consecutive, so view q as [1, kvh, group, S, hd] against k/v [1, kvh, 1, T, hd]
            qg = q.reshape(1, kvh, group, -1, hd)
            att = (qg @ k[:, :, None].transpose(3, 4)) * scale + mask  # [1, kvh, group, S, T]
            att = torch.softmax(att, dim=-1)
            o = (att @ v[:, :, None]).reshape(1, nh, -1, hd).transpose(1, 2).reshape(1, -1, nh * hd)
            x = x + o @ L.o
            h = self._norm(x, L.post_attention_layernorm)
            x = x + (torch.nn.functional.silu(h @ L.gate) * (h @ L.up)) @ L.down
        logits = self._norm(x, self.final_norm) @ self.lm_head
        return (logits, *presents)


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    ins = ["input_ids", "position_ids"]
    outs = ["logits"]
    for i in range(num_layers):
        ins += [f"past_key_{i}", f"past_value_{i}"]
        outs += [f"present_key_{i}", f"present_value_{i}"]
    return ins, outs


def export_float_graph(model: Model, path: Path, opset: int = 18) -> None:
    """Trace the float decoder to ``path`` (weights inline; the caller rewrites the file)."""
    s = model.spec
    net = Decoder(model).eval()
    ins, outs = io_names(s.num_layers)
    S, P = 3, 2  # trace with a non-empty past so nothing specialises on P == 0
    args = [torch.zeros((1, S), dtype=torch.int64), torch.arange(P, P + S, dtype=torch.int64)[None]]
    args += [torch.zeros((1, s.num_kv_heads, P, s.head_dim)) for _ in range(2 * s.num_layers)]
    dyn = {"input_ids": {1: "seq"}, "position_ids": {1: "seq"}, "logits": {1: "seq"}}
    for i in range(s.num_layers):
        for kind in ("key", "value"):
            dyn[f"past_{kind}_{i}"] = {2: "past"}
            dyn[f"present_{kind}_{i}"] = {2: "total"}
    with torch.inference_mode():
        torch.onnx.export(net, tuple(args), str(path), input_names=ins, output_names=outs, dynamic_axes=dyn,
                          opset_version=opset, dynamo=False, do_constant_folding=True)
