"""``mixed``: per-tensor bit widths under a size budget (``--target-bpw X``), chosen by measured sensitivity.

A storage pass. Every 2-D weight (the linears and the tied embedding / output head) gets one of the
widths the target format stores (``Capabilities.mixed_bits``: GGUF 4 / 8, ONNX and Core ML 2 / 4 / 8;
fp16 everywhere) in one of the block sizes it holds (``Capabilities.blocks``: 32 everywhere, 64 and 128
in ONNX, so that a 4-bit tensor can also cost 4.25 or 4.125 bits per weight), so that the bits per weight
over those tensors stay within the budget and the estimated quality loss is smallest:

1. **Sensitivity** (HAWQ / SqueezeLLM style): the diagonal of the empirical Fisher information,
   ``F = mean over calibration windows of (d CE / d w)^2``, measured once with gradients of the model's
   own next-token loss. The loss a width costs a tensor is then ``0.5 * sum F * (w - w_b)^2`` with ``w_b``
   the tensor rounded to that width: comparable across tensors, which the layer-local errors GPTQ
   minimises are not.
2. **Allocation**: a multiple-choice knapsack, solved by dynamic programming over the bits spent above
   every tensor's smallest width (in ``resolution`` steps, each option's extra bits rounded up, so the
   budget always holds), then whatever the rounding left over is spent greedily on the upgrades with
   the best loss saved per bit. (A Lagrange multiplier alone misses widths off the convex hull of a
   tensor's loss-vs-bits curve, e.g. 4-bit in blocks of 64 between blocks of 32 and 128.)
3. **Numbers**: GPTQ (as ``int4``) on each tensor's chosen grid and block (2- and 4-bit), Q8_0 for 8 bits,
   fp16 for 16.

The output head never goes below 4 bits (a 2-bit vocabulary projection breaks every model tried).
The manifest records each tensor's width and block. No library does this allocation into llama.cpp / ONNX
block grids (HAWQ and llama.cpp's ``--tensor-type`` leave the choice to the user), hence this module.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from edgekit.model import BlockQuant, Cast, Model
from edgekit.passes import Pass, PassContext

BLOCK = 32
GRID_OF_BITS = {2: "int2", 4: "int4", 8: "int8"}
FLOAT_BITS = 16
FP16 = (FLOAT_BITS, 0)  # a width is (bits, block size); fp16 has no blocks


def storage_bpw(width: tuple[int, int]) -> float:
    """Bits per weight one width costs: ``bits`` plus an fp16 scale per block (fp16 itself: 16)."""
    bits, block = width
    return float(FLOAT_BITS) if bits == FLOAT_BITS else bits + 16 / block


def label(width: tuple[int, int]) -> str:
    """How the manifest names a width: ``int4/g64``, ``int8/g32``, ``fp16``."""
    return "fp16" if width[0] == FLOAT_BITS else f"int{width[0]}/g{width[1]}"


def candidate_widths(bits: tuple[int, ...], blocks: tuple[int, ...], is_head: bool) -> list[tuple[int, int]]:
    """The widths one tensor may take: every held integer width in every held block size (8-bit only in
    blocks of 32: a larger block saves under 3% of its bytes), and fp16; the output head at >= 4 bits."""
    out = [(b, bs) for b in bits for bs in blocks if (b != 8 or bs == BLOCK) and not (is_head and b < 4)]
    return out + [FP16]


def round_to(w: np.ndarray, width: tuple[int, int]) -> np.ndarray:
    """``w`` rounded to one width by the Q4_0 rule (see :func:`_rtn`): the cheap stand-in for the final
    numbers when estimating what a width costs."""
    if width[0] == FLOAT_BITS:
        return w.astype(np.float16).astype(np.float32)
    return _rtn(w, *width).dequantize()


def fisher_diagonal(model: Model, windows: list[list[int]], progress=None) -> dict[str, np.ndarray]:
    """Mean squared gradient of the next-token cross-entropy, per weight of every 2-D tensor."""
    import torch
    import torch.nn.functional as F

    from edgekit.architectures.torch_decoder import DecoderNet, set_threads

    set_threads()
    net = DecoderNet(model)
    names = model.linear_names()
    params = {n: net.param(n) for n in names}
    for p in params.values():
        p.requires_grad_(True)
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    for k, win in enumerate(windows):
        ids = torch.tensor([win], dtype=torch.long)
        logits = net(ids)[0, :-1]
        loss = F.cross_entropy(logits, ids[0, 1:])
        net.zero_grad(set_to_none=True)
        loss.backward()
        for n, p in params.items():
            acc[n] += p.grad.detach() ** 2
        if progress:
            progress("sensitivity (Fisher)", k + 1, len(windows))
    return {n: (a / max(1, len(windows))).numpy() for n, a in acc.items()}


def allocate(sizes: dict[str, int], costs: dict[str, dict[tuple[int, int], float]],
             budget_bits: float, resolution: int = 20000) -> dict[str, tuple[int, int]]:
    """Width per tensor minimising the summed cost with ``sum size * storage_bpw(width) <= budget_bits``.

    ``costs[name][width]`` is the estimated loss; widths missing for a tensor are not allowed for it.
    """
    names = list(costs)
    options = {n: sorted(costs[n], key=storage_bpw) for n in names}
    bits = {n: [sizes[n] * storage_bpw(w) for w in options[n]] for n in names}
    floor = sum(b[0] for b in bits.values())
    if floor > budget_bits * (1 + 1e-12):
        raise ValueError("budget below the smallest widths")
    spare = budget_bits - floor
    unit = spare / resolution if spare > 0 else 1.0
    # each option's bits above the tensor's smallest, in whole units rounded up (the budget always holds)
    steps = {n: [int(np.ceil((b - bits[n][0]) / unit - 1e-9)) if j else 0 for j, b in enumerate(bits[n])] for n in names}
    # best[c]: the least loss with c units spent above the smallest widths; pick[k][c]: tensor k's option there
    best = np.full(resolution + 1, np.inf)
    best[0] = 0.0
    picks = []
    for n in names:
        new = np.full_like(best, np.inf)
        pick = np.zeros(resolution + 1, dtype=np.int8)
        for j, w in enumerate(options[n]):
            step = steps[n][j]
            if step > resolution:
                continue
            cand = np.full_like(best, np.inf)
            cand[step:] = best[: resolution + 1 - step] + costs[n][w]
            better = cand < new
            new[better], pick[better] = cand[better], j
        best = new
        picks.append(pick)
    c = int(np.argmin(best))
    choice: dict[str, tuple[int, int]] = {}
    for k in range(len(names) - 1, -1, -1):
        n = names[k]
        j = int(picks[k][c])
        choice[n] = options[n][j]
        c -= steps[n][j]
    # spend what the rounding left on the best single upgrades (loss saved per extra bit) that still fit
    left = budget_bits - sum(sizes[n] * storage_bpw(w) for n, w in choice.items())
    while True:
        found = None
        for n, cost in costs.items():
            for w in cost:
                extra = sizes[n] * (storage_bpw(w) - storage_bpw(choice[n]))
                gain = cost[choice[n]] - cost[w]
                if 0 < extra <= left and gain > 0 and (found is None or gain / extra > found[0]):
                    found = (gain / extra, n, w, extra)
        if found is None:
            return {n: choice[n] for n in names}
        _, n, w, extra = found
        choice[n], left = w, left - extra


class MixedPass(Pass):
    name = "mixed"
    description = ("mixed precision under a size budget: per-tensor 2 / 4 / 8-bit blocks or fp16 in the block sizes "
                   "the format holds, chosen by Fisher sensitivity, GPTQ numbers")
    needs_calibration = True
    kinds = frozenset({"decoder"})
    tolerance = {"kld_mean": 1.0}
    param_types = {"bpw": float, "windows": int, "damp": float, "min_bits": int}
    param_ranges = {"bpw": (2.0, 16.0, "[]"), "windows": (1, 4096, "[]"), "damp": (0.0, 1.0, "(]"),
                    "min_bits": (2, 8, "[]")}

    @classmethod
    def params_problem(cls, params: dict[str, Any]) -> str | None:
        return None if "bpw" in params else "mixed needs bpw, the bits per weight budget (--target-bpw)"

    def apply(self, model: Model, ctx: PassContext) -> dict[str, Any]:
        from edgekit.errors import InputError
        from edgekit.passes.int4 import final_hidden_gram, gptq_quantize
        from edgekit.passes.recovery import recovery_windows
        from edgekit.passes.rtn import quantize_q8_0
        from edgekit.qat import GRIDS

        t0 = time.perf_counter()
        target = float(self.params["bpw"])
        held = tuple(sorted(b for b in set(ctx.options.get("mixed_bits", (4, 8))) & set(GRID_OF_BITS)
                            if b >= int(self.params.get("min_bits", 2))))
        names = model.linear_names()
        head = model.output_head_name()
        sizes = {n: int(model.tensors[n].size) for n in names}
        blocks = tuple(bs for bs in sorted(ctx.options.get("blocks", (BLOCK,)))
                       if all(model.tensors[n].shape[1] % bs == 0 for n in names))
        widths = {n: candidate_widths(held, blocks, n == head) for n in names}
        floor = sum(sizes[n] * min(map(storage_bpw, widths[n])) for n in names) / sum(sizes.values())
        if target < floor - 1e-9:
            fmt = ctx.options.get("format", "this format")
            raise InputError(f"--target-bpw {target:g} is below the smallest {fmt} can hold for this model "
                             f"({floor:.3f} bits per weight: {min(held)}-bit blocks of {max(blocks)}, the output head at 4)",
                             f"ask for at least {floor:.2f}" + ("" if 2 in held else ", or use --format onnx (2-bit blocks)"))
        if ctx.calibration_tokens is None:
            raise ValueError("mixed needs calibration tokens")
        seqs = ctx.calibration_tokens()
        wins = recovery_windows(seqs)[: int(self.params.get("windows", 16))]
        fisher = fisher_diagonal(model, wins, ctx.progress)
        costs = {n: {b: 0.5 * float((fisher[n] * (model.tensors[n] - round_to(model.tensors[n], b)) ** 2).sum())
                     for b in widths[n]} for n in names}
        del fisher
        choice = allocate(sizes, costs, target * sum(sizes.values()))
        t_alloc = time.perf_counter() - t0

        hessians = model.input_grams(seqs, ctx.progress)
        if choice[head][0] in (2, 4):
            hessians[head] = final_hidden_gram(model, seqs)
        damp = float(self.params.get("damp", 0.01))
        for k, n in enumerate(names):
            (b, bs), w = choice[n], model.tensors[n]
            if b == FLOAT_BITS:
                model.encodings[n] = Cast("f16")
            elif b == 8 or n not in hessians:
                model.encodings[n] = quantize_q8_0(w) if b == 8 else _rtn(w, b, bs)
            else:
                model.encodings[n] = gptq_quantize(w, hessians[n], block=bs, damp=damp, grid=GRIDS[GRID_OF_BITS[b]])
            ctx.progress("GPTQ (mixed widths)", k + 1, len(names))
        achieved = model.weights_bpw()
        counts = {label(wd): sum(1 for n in names if choice[n] == wd) for wd in sorted(set(choice.values()))}
        return {"pass": self.name, "target_bpw": target, "bpw": round(achieved, 4),
                "widths_held": [label(wd) for wd in candidate_widths(held, blocks, False)],
                "tensors_per_width": counts, "choices": {n: label(choice[n]) for n in names},
                "sensitivity": f"Fisher diagonal of the next-token loss on {len(wins)} calibration windows",
                "allocation_s": round(t_alloc, 1), "damp": damp}


def _rtn(w: np.ndarray, bits: int, block: int = BLOCK) -> BlockQuant:
    """Round-to-nearest into ``bits``-bit blocks, the extreme value on the most negative integer (Q4_0's
    rule); what a tensor without input statistics (an untied input embedding) gets."""
    lo = -(2 ** (bits - 1))
    rows, cols = w.shape
    b = w.reshape(rows, cols // block, block)
    ext = np.take_along_axis(b, np.abs(b).argmax(-1)[..., None], -1)
    d = (ext / lo).astype(np.float16)
    df = np.where(d.astype(np.float32) == 0, np.float32(1e-8), d.astype(np.float32))
    q = np.clip(np.round(b / df), lo, -lo - 1).astype(np.int8).reshape(rows, cols)
    return BlockQuant(q, d[..., 0], bits=bits, block_size=block)
