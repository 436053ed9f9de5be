"""Quantization-aware training: the quantizer in the forward pass, straight-through gradients behind it.

Two stages after EfficientQAT (Chen et al., 2024), both on calibration windows:

1. **Block-wise** (Block-AP): each decoder layer in turn trains its latent weights, norms and per-block
   step sizes so that the quantized layer, fed what the already-quantized layers before it produce,
   reproduces the float layer's outputs on the float model's own inputs (mean squared error). Cheap:
   one layer's activations at a time, and errors of earlier layers are compensated by later ones.
2. **End-to-end** (E2E-QP): the integers are frozen and only step sizes (and norms) train, on the KL
   divergence between the float model's next-token distributions and the quantized model's.

A :class:`Grid` is the set of values a block may hold (uniform integers, or a fixed non-uniform
codebook such as GGUF's IQ4_NL). Everything trains against what will be stored: scales are rounded to
fp16 in the forward pass (straight-through), so the trained numbers *are* the exported numbers.

No library trains into llama.cpp's fixed block grids with fp16 scales (EfficientQAT, LLM-QAT and
torchao target their own kernels and group layouts); this module does, on CPU or CUDA.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

# GGUF's IQ4_NL codebook (ggml-common.h kvalues_iq4nl): 4-bit indices into these, times an fp16 scale
IQ4_NL_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@dataclass(frozen=True)
class Grid:
    """What one block of weights may hold: ``scale * level`` for level in ``levels`` (or in [qmin, qmax])."""

    name: str
    bits: int
    qmin: int
    qmax: int
    block: int | None = 32  # None: the widest of 256 / 64 / 32 that divides the row (ternary, as TQ2_0)
    levels: tuple[int, ...] | None = None  # a non-uniform codebook; None = every integer in [qmin, qmax]
    name_codebook: str = ""  # the codebook's name in :class:`edgekit.model.BlockCodebook` ("iq4_nl")

    def block_for(self, cols: int) -> int:
        if self.block is not None:
            return self.block
        for b in (256, 64, 32):
            if cols % b == 0:
                return b
        raise ValueError(f"row length {cols} is not a multiple of 32")

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest representable code of ``x`` (weights divided by their scale): integers, or codebook indices."""
        if self.levels is None:
            return torch.clamp(torch.round(x), self.qmin, self.qmax)
        lv = torch.tensor(self.levels, dtype=x.dtype, device=x.device)
        # midpoints between sorted levels: bucketize is the nearest level
        return torch.bucketize(x, (lv[1:] + lv[:-1]) / 2)

    def values(self, codes: torch.Tensor) -> torch.Tensor:
        if self.levels is None:
            return codes
        return torch.tensor(self.levels, dtype=torch.float32, device=codes.device)[codes.long()]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Forward: the nearest grid value; backward: identity inside the grid's range, zero outside (LSQ)."""
        lo, hi = (self.qmin, self.qmax) if self.levels is None else (self.levels[0], self.levels[-1])
        xc = torch.clamp(x, lo, hi)
        # value + (x - x): exactly the grid value forward (x + (v - x) may be an ulp off), x's gradient
        return self.values(self.codes(xc.detach())) + (xc - xc.detach())


GRIDS = {
    "int4": Grid("int4", 4, -8, 7),  # Q4_0 semantics
    "int8": Grid("int8", 8, -127, 127),  # Q8_0 semantics
    "int2": Grid("int2", 2, -2, 1),
    "ternary": Grid("ternary", 2, -1, 1, block=None),
    "nl4": Grid("nl4", 4, 0, 15, levels=IQ4_NL_LEVELS, name_codebook="iq4_nl"),
}


def _half_ste(s: torch.Tensor) -> torch.Tensor:
    """Rounded to fp16 (as stored) in the forward pass, identity for the gradient; never exactly zero."""
    s = torch.where(s.abs() < 1e-8, torch.full_like(s, 1e-8), s)
    return s.detach().half().float() + (s - s.detach())


def int8_activations(block: int = 32) -> Callable[[torch.Tensor], torch.Tensor]:
    """The runtimes' integer activations, straight-through: llama.cpp multiplies its 4-bit blocks with the
    input rounded to int8 per block of 32 along the row (Q8_0: scale = max |x| / 127, kept in fp16; Q8_K's
    blocks of 256 for ternary), and ONNX Runtime's MatMulNBits at accuracy level 4 does the same per block.
    Training through it makes the learnt scales fit the arithmetic that will run."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if shape[-1] % block:
            return x
        xb = x.reshape(*shape[:-1], shape[-1] // block, block)
        d = xb.detach().abs().amax(-1, keepdim=True) / 127.0
        inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
        q = torch.round(xb.detach() * inv) * d.half().float()
        return (q + (xb - xb.detach())).reshape(shape)

    return fn


class FakeQuant:
    """A :class:`~edgekit.architectures.torch_decoder.Linear` ``weight_fn``: ``w -> scale * grid(w / scale)`` per block.

    With ``codes`` given the integers are frozen and only the scale trains (stage 2).
    """

    def __init__(self, grid: Grid, scales: torch.Tensor, codes: torch.Tensor | None = None):
        self.grid = grid
        self.scale = torch.nn.Parameter(scales.detach().float().clone())
        self.codes = codes

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        rows, cols = w.shape
        nb = self.scale.shape[1]
        s = _half_ste(self.scale)[:, :, None]
        if self.codes is not None:
            v = self.grid.values(self.codes)
        else:
            v = self.grid.project(w.reshape(rows, nb, cols // nb) / s)
        return (v * s).reshape(rows, cols)

    def freeze(self, w: torch.Tensor) -> None:
        """Fix the integers at what the latent weight rounds to now."""
        with torch.no_grad():
            rows, cols = w.shape
            nb = self.scale.shape[1]
            s = _half_ste(self.scale)[:, :, None]
            lo, hi = (self.grid.qmin, self.grid.qmax) if self.grid.levels is None else (self.grid.levels[0], self.grid.levels[-1])
            self.codes = self.grid.codes(torch.clamp(w.reshape(rows, nb, cols // nb) / s, lo, hi))

    def stored(self, w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(codes as int8 [rows, cols], scales as fp16 [rows, blocks]): what the exporters pack."""
        if self.codes is None:
            self.freeze(w)
        rows, cols = w.shape
        return (self.codes.reshape(rows, cols).to(torch.int8).cpu().numpy(),
                self.scale.detach().half().cpu().numpy())


# ---------------------------------------------------------------------------- data


def split_validation(wins: list[list[int]], fraction: float = 0.125, seed: int = 0) -> tuple[list, list]:
    """(train, held-in validation): a few windows of the same calibration set kept out of training."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(wins))
    n_val = max(1, int(round(len(wins) * fraction))) if len(wins) > 1 else 0
    val = sorted(order[:n_val].tolist())
    return [wins[i] for i in sorted(order[n_val:].tolist())], [wins[i] for i in val]


def _cosine_lr(base: float, step: int, steps: int) -> float:
    warm = max(1, steps // 20)
    return base * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))


# ---------------------------------------------------------------------------- stage 1


def blockwise(net, teacher, quants: dict[str, FakeQuant], train: list[list[int]], val: list[list[int]], epochs: float,
              lr_weights: float, lr_scales: float, batch: int, device: torch.device,
              progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Block-AP over every layer of ``net`` (a DecoderNet whose linears carry ``quants``; ``teacher``
    is the float model's, whose layers give the targets).

    Each layer keeps its trained state only if it lowers the held-in validation error of that layer;
    otherwise it returns to where it started (its post-training quantization).
    """
    t0 = time.perf_counter()
    with torch.no_grad():
        ids_t = torch.tensor(train, dtype=torch.long, device=device)
        ids_v = torch.tensor(val, dtype=torch.long, device=device)
        x_fp = teacher.embed(torch.cat([ids_t, ids_v]))
    x_q = x_fp.clone()
    n_t = len(train)
    tables = net.rope_tables(0, x_fp.shape[1])
    per_layer = []
    steps_per_epoch = max(1, math.ceil(n_t / batch))
    steps = max(1, int(round(epochs * steps_per_epoch)))
    gen = torch.Generator().manual_seed(0)
    for li, blk in enumerate(net.blocks):
        names = net.block_params(blk)
        lin_names = {n for lin in blk.lin.values() for n in lin.names}
        with torch.no_grad():  # the float layer's outputs on the float inputs: the target
            tblk = teacher.blocks[li]
            y_fp = torch.cat([teacher.block_forward(tblk, x_fp[i : i + batch], tables, {})
                              for i in range(0, len(x_fp), batch)])
            for lin in blk.lin.values():
                lin.weight_fns = {n: quants[n] for n in lin.names if n in quants}
        weights = [net.param(n) for n in names]
        scales = [quants[n].scale for n in names if n in quants]
        start = [p.detach().clone() for p in weights + scales]

        def val_error(blk=blk, x_q=x_q, y_fp=y_fp) -> float:
            with torch.no_grad():
                return float(F.mse_loss(net.block_forward(blk, x_q[n_t:], tables, {}), y_fp[n_t:]))

        for p in weights + scales:
            p.requires_grad_(True)
        before = val_error()
        opt = torch.optim.AdamW([{"params": weights, "lr": lr_weights, "base": lr_weights},
                                 {"params": scales, "lr": lr_scales, "base": lr_scales}], weight_decay=0.0)
        for step in range(steps):
            if step % steps_per_epoch == 0:
                order = torch.randperm(n_t, generator=gen)
            idx = order[(step % steps_per_epoch) * batch : (step % steps_per_epoch + 1) * batch].to(device)
            for g in opt.param_groups:
                g["lr"] = _cosine_lr(g["base"], step, steps)
            loss = F.mse_loss(net.block_forward(blk, x_q[idx], tables, {}), y_fp[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        after = val_error()
        kept = after < before
        if not kept:
            with torch.no_grad():
                for p, s in zip(weights + scales, start):
                    p.copy_(s)
        for p in weights + scales:
            p.requires_grad_(False)
        for n in lin_names & set(quants):
            quants[n].freeze(net.param(n))
        with torch.no_grad():
            x_q = torch.cat([net.block_forward(blk, x_q[i : i + batch], tables, {}) for i in range(0, len(x_q), batch)])
        x_fp = y_fp
        per_layer.append({"layer": li, "val_mse_before": before, "val_mse_after": min(before, after), "kept": kept})
        if progress:
            progress("QAT block-wise", li + 1, len(net.blocks))
    gain = [p["val_mse_before"] / max(p["val_mse_after"], 1e-30) for p in per_layer]
    return {"steps_per_layer": steps, "epochs": epochs, "tokens": n_t * len(train[0]) if train else 0,
            "lr_weights": lr_weights, "lr_scales": lr_scales, "batch": batch,
            "layers_kept": int(sum(p["kept"] for p in per_layer)), "layers": len(per_layer),
            "val_mse_ratio_median": float(np.median(gain)) if gain else None,
            "seconds": round(time.perf_counter() - t0, 1)}


# ---------------------------------------------------------------------------- stage 2


def teacher_logprobs(teacher_net, wins: list[list[int]], device, batch: int = 4) -> torch.Tensor:
    with torch.inference_mode():
        out = [F.log_softmax(teacher_net(torch.tensor(wins[i : i + batch], device=device)), dim=-1).half()
               for i in range(0, len(wins), batch)]
    return torch.cat(out)


def kld(student_logits: torch.Tensor, teacher_lp: torch.Tensor) -> torch.Tensor:
    lp_s = F.log_softmax(student_logits.float(), dim=-1)
    lp_t = teacher_lp.float()
    return (lp_t.exp() * (lp_t - lp_s)).sum(-1).mean()


def end_to_end(net, quants: dict[str, FakeQuant], train: list[list[int]], val: list[list[int]],
               t_train: torch.Tensor, t_val: torch.Tensor, steps: int, lr: float, batch: int, device,
               train_norms: bool = True, lr_weights: float = 0.0,
               progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """E2E-QP: frozen integers, step sizes (and norms) trained on KL(float || quantized); keeps the best
    held-in validation checkpoint (the start counts). With ``lr_weights`` > 0 the latent weights train
    too (straight-through), so integers may flip where the model's output asks for it."""
    t0 = time.perf_counter()
    for q in quants.values():
        if q.codes is None:
            raise RuntimeError("freeze the integers before end-to-end training")
    scales = [q.scale for q in quants.values()]
    norms = [p for n, p in ((n, net.param(n)) for n in net.names) if p.ndim == 1] if train_norms else []
    weights = [net.param(n) for n in quants] if lr_weights > 0 else []
    frozen = {n: q.codes.clone() for n, q in quants.items()} if weights else {}
    if weights:
        for q in quants.values():
            q.codes = None  # the latent weights decide the integers again
    params = scales + norms + weights
    for p in params:
        p.requires_grad_(True)
    ids_t = torch.tensor(train, dtype=torch.long, device=device)

    def val_kld() -> float:
        with torch.no_grad():
            tot = 0.0
            for i in range(0, len(val), batch):
                ids = torch.tensor(val[i : i + batch], dtype=torch.long, device=device)
                tot += float(kld(net(ids), t_val[i : i + batch])) * len(ids)
            return tot / max(1, len(val))

    best = val_kld()
    first = best
    best_state = [p.detach().clone() for p in params]
    groups = [{"params": scales + norms, "base": lr}] + ([{"params": weights, "base": lr_weights}] if weights else [])
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    n = len(train)
    evals = max(1, steps // 4)
    curve = []
    for step in range(steps):
        if step % max(1, n // batch) == 0:
            order = torch.randperm(n, generator=gen)
        k = step % max(1, n // batch)
        idx = order[k * batch : (k + 1) * batch]
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(g["base"], step, steps)
        loss = kld(net(ids_t[idx.to(device)]), t_train[idx.to(device)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append(round(float(loss.detach()), 5))
        if (step + 1) % evals == 0 or step + 1 == steps:
            v = val_kld()
            if v < best:
                best, best_state = v, [p.detach().clone() for p in params]
        if progress:
            progress("QAT end-to-end", step + 1, steps)
    with torch.no_grad():
        for p, s in zip(params, best_state):
            p.copy_(s)
    for p in params:
        p.requires_grad_(False)
    flipped = None
    if weights:
        for n, q in quants.items():
            q.freeze(net.param(n))
        flipped = float(sum(int((quants[n].codes != frozen[n]).sum()) for n in quants)
                        / max(1, sum(frozen[n].numel() for n in quants)))
    return {"steps": steps, "lr": lr, "lr_weights": lr_weights, "integers_changed": flipped, "batch": batch,
            "train_norms": train_norms,
            "val_kld_before": first, "val_kld_after": best,
            "loss_first10_mean": float(np.mean(curve[:10])) if curve else None,
            "loss_last10_mean": float(np.mean(curve[-10:])) if curve else None,
            "seconds": round(time.perf_counter() - t0, 1)}
