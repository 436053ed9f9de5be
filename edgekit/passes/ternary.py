"""Ternary weights {-1, 0, +1} x per-block scale (BitNet b1.58 absmean), with optional distillation recovery.

Each block of a row gets ``s = mean |w|`` (stored fp16) and ``q = clamp(round(w / s), -1, 1)``. The block
is 256 wide where the row length allows it (exactly GGUF's TQ2_0 block, so llama.cpp holds the
numbers at 2.06 bits/weight) and 64 otherwise; exporters that cannot hold a tensor's ternary block
layout fall back per tensor to a container that holds the same values exactly (listed in the manifest).

Post-training ternarization of a model trained in float breaks it (llama.cpp users meet this
silently); ``recover`` steps of distillation with a straight-through estimator (the forward pass
uses the ternary projection of the latent float weights, the gradient flows to the latent weights)
recover part of the loss. The embedding / tied output head stays Q8_0, as BitNet keeps it in high
precision.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgekit.model import BlockQuant, Model
from edgekit.passes import Pass, PassContext, is_output_head
from edgekit.passes.rtn import quantize_q8_0

BROKEN_KLD = 1.0  # mean KLD above which a ternary model is reported as broken


def block_size_for(cols: int) -> int:
    for b in (256, 64, 32):
        if cols % b == 0:
            return b
    raise ValueError(f"row length {cols} is not a multiple of 32")


def ternarize(w: np.ndarray, block: int | None = None) -> BlockQuant:
    rows, cols = w.shape
    block = block or block_size_for(cols)
    b = np.asarray(w, dtype=np.float32).reshape(rows, cols // block, block)
    s = np.abs(b).mean(-1).astype(np.float16)  # the scale as stored
    sf = s.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(sf > 0, np.clip(np.round(b / np.where(sf > 0, sf, 1)), -1, 1), 0)
    return BlockQuant(q.reshape(rows, cols).astype(np.int8), s, bits=2, block_size=block)


def ste(w):
    """The ternary projection for the forward pass, identity for the gradient (straight-through)."""
    import torch

    rows, cols = w.shape
    block = block_size_for(cols)
    b = w.reshape(rows, cols // block, block)
    s = b.abs().mean(-1, keepdim=True).half().float()  # the scale as it will be stored
    t = (torch.clamp(torch.round(b / s.clamp_min(1e-8)), -1, 1) * s).reshape(rows, cols)
    return w + (t - w).detach()


class TernaryPass(Pass):
    name = "ternary"
    description = "ternary {-1,0,+1} x absmean block scales (BitNet b1.58), optional distillation with a straight-through estimator; output head Q8_0"
    needs_calibration = False
    param_types = {"recover": int, "lr": float}
    param_ranges = {"recover": (0, 1_000_000, "[]"), "lr": (0.0, 1.0, "(]")}
    # post-training ternary wrecks an encoder trained in float; it is allowed to show a format holds it
    kinds = frozenset({"decoder", "encoder"})

    def warnings(self, record: dict[str, Any], quality: dict[str, Any]) -> list[str]:
        """A ternary model without (enough) recovery is usually broken: say so loudly."""
        kld = quality.get("kld_mean")
        if kld is None or kld <= BROKEN_KLD:
            return []
        how = "even with recovery" if record.get("recovery") else "without recovery"
        return [f"ternary {how}: mean KLD {kld:.2f} > {BROKEN_KLD} (perplexity {quality.get('ppl', float('nan')):.1f} "
                f"vs {quality.get('ref_ppl', float('nan')):.1f}): this model is broken; "
                + ("add --recover STEPS" if not record.get("recovery") else "recover longer")]

    def apply(self, model: Model, ctx: PassContext) -> dict[str, Any]:
        steps = int(self.params.get("recover", 0))
        names = [n for n in model.linear_names() if not is_output_head(model, n)]
        record: dict[str, Any] = {"pass": self.name, "tensors": len(names), "output_head": "q8_0",
                                  "scale": "absmean per block (fp16)"}
        if steps > 0:
            if getattr(model, "kind", "decoder") != "decoder":
                raise ValueError("ternary recovery distills a decoder's next-token distribution; encoders take it without --recover")
            from edgekit.passes.recovery import distill, recovery_windows, teacher_logprobs
            from edgekit.architectures.torch_decoder import DecoderNet

            if ctx.calibration_tokens is None:
                raise ValueError("ternary recovery needs calibration tokens")
            wins = recovery_windows(ctx.calibration_tokens())
            t_lp = teacher_logprobs(ctx.reference if ctx.reference is not None else model, wins, ctx.progress)
            net = DecoderNet(model, trainable=True)
            for lin in net.linears():
                lin.weight_fn = ste
            record["recovery"] = distill(net, t_lp, wins, steps, float(self.params.get("lr", 3e-4)), None, ctx.progress)
            record["recovery"]["estimator"] = "straight-through"
            net.write_back(model)
        blocks: dict[int, int] = {}
        for n in model.linear_names():
            if is_output_head(model, n):
                model.encodings[n] = quantize_q8_0(model.tensors[n])
                continue
            bq = ternarize(model.tensors[n])
            blocks[bq.block_size] = blocks.get(bq.block_size, 0) + 1
            model.encodings[n] = bq
        record["block_sizes"] = {str(k): v for k, v in sorted(blocks.items())}
        return record

