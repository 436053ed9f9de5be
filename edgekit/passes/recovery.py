"""Short recovery by knowledge distillation from the uncompressed model, with the compression in the loop.

The student is a :class:`~edgekit.architectures.torch_decoder.DecoderNet` of the compressed model; the teacher's
log-probabilities over the calibration text are computed once (full vocabulary, float16). Each step
minimises KL(teacher || student) on one calibration window. ``before_step`` lets a pass put its
compression into the forward pass (fading pruned channels out, projecting weights to ternary with a
straight-through gradient), so the network learns around it rather than being corrected afterwards.

Sized for a 2-core CPU: a few hundred steps on 256-token windows, Adam on the linears and norms
(the embedding and tied head stay frozen: they hold a fifth of the parameters and are not what
pruning or ternary changes).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from edgekit.model import Model
from edgekit.architectures.torch_decoder import DecoderNet, set_threads

WINDOW = 256


def teacher_logprobs(teacher: Model, sequences: list[list[int]], progress=None) -> list[torch.Tensor]:
    set_threads()
    net = DecoderNet(teacher).eval()
    out = []
    with torch.inference_mode():
        for k, seq in enumerate(sequences):
            out.append(F.log_softmax(net(torch.tensor([seq], dtype=torch.long))[0], dim=-1).half())
            if progress:
                progress("teacher logits", k + 1, len(sequences))
    return out


def recovery_windows(sequences: list[list[int]], window: int = WINDOW) -> list[list[int]]:
    flat = [t for s in sequences for t in s]
    return [flat[i : i + window] for i in range(0, len(flat) - window + 1, window)]


def distill(student: DecoderNet, teacher_lp: list[torch.Tensor], windows: list[list[int]], steps: int,
            lr: float = 1e-4, before_step: Callable[[int], None] | None = None,
            progress: Callable[[str, int, int], None] | None = None, seed: int = 0) -> dict[str, Any]:
    """Train ``student`` in place for ``steps`` windows; returns the loss curve and settings."""
    set_threads()
    params = [p for n, p in student.named_parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(windows)) for _ in range(math.ceil(steps / len(windows)))])[:steps]
    warm = max(1, steps // 20)
    curve: list[float] = []
    t0 = time.perf_counter()
    student.train()
    for step in range(steps):
        if before_step is not None:
            before_step(step)
        for g in opt.param_groups:  # linear warm-up, cosine decay
            g["lr"] = lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / steps))
        k = int(order[step])
        ids = torch.tensor([windows[k]], dtype=torch.long)
        lp_s = F.log_softmax(student(ids)[0], dim=-1)
        lp_t = teacher_lp[k].float()
        loss = (lp_t.exp() * (lp_t - lp_s)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        curve.append(round(float(loss.detach()), 5))
        if progress:
            progress("recovery (distillation)", step + 1, steps)
    student.eval()
    return {"steps": steps, "lr": lr, "window_tokens": len(windows[0]) if windows else 0,
            "windows": len(windows), "loss_curve": curve, "seconds": round(time.perf_counter() - t0, 1),
            "loss_first10_mean": float(np.mean(curve[:10])) if curve else None,
            "loss_last10_mean": float(np.mean(curve[-10:])) if curve else None}

