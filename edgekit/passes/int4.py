"""edgekit's data-aware 4-bit weight quantizer (``int4``).

Numbers land in the same container as Q4_0 (symmetric integers in [-8, 7], one fp16 scale per 32
weights) so any llama.cpp reads them, and ONNX / Core ML pack the very same integers. What differs
from round-to-nearest is how the numbers are chosen, driven by calibration text:

1. Activation statistics: the model (as earlier passes left it) runs over calibration tokens and, for
   every linear layer, accumulates the input Gram matrix H = sum x x^T (the GPTQ Hessian of the layer's
   squared error); see :func:`edgekit.architectures.torch_decoder.collect_input_grams`.
2. Scale search: each block's scale is chosen among a grid of candidates to minimise the
   activation-weighted error sum_i H_ii (w_i - d q_i)^2, not the unweighted max rule.
3. GPTQ error compensation: columns are quantized in order and each column's rounding error is
   spread over the not-yet-quantized columns through the Cholesky factor of H^-1, so the layer's
   output error (not the weight error) is minimised.

The output head (tied embedding) stays Q8_0 as in ``q4_0``, so the two recipes differ only in how
the 4-bit numbers are chosen. No library does GPTQ into a fixed Q4_0 grid with fp16-rounded scales
on CPU (NNCF and AutoGPTQ target their own formats), hence this module.
"""

from __future__ import annotations


import numpy as np

from edgekit.model import BlockCodebook, BlockQuant, Model
from edgekit.passes import Pass, PassContext, is_output_head
from edgekit.passes.rtn import quantize_q8_0

BLOCK = 32
QMIN, QMAX = -8, 7


def _scale_grid(n: int = 24) -> np.ndarray:
    return np.linspace(0.75, 1.08, n, dtype=np.float32)


def _value_range(grid) -> tuple[float, float]:
    return (grid.qmin, grid.qmax) if grid.levels is None else (grid.levels[0], grid.levels[-1])


def search_scales(w, importance, factors, grid=None):
    """Per-row fp16 scale for one block of columns minimising the importance-weighted error.

    Candidates are ``m * f`` with m = (value of largest magnitude) / (the grid's most negative value)
    (the Q4_0 rule, which puts the extreme on -8) or / (its most positive value), for each factor f.
    ``grid`` (an :class:`edgekit.qat.Grid`) defaults to int4's integers in [-8, 7].
    """
    import torch

    from edgekit.qat import GRIDS

    grid = grid or GRIDS["int4"]
    lo, hi = _value_range(grid)
    idx = w.abs().argmax(dim=1, keepdim=True)
    extreme = torch.gather(w, 1, idx)  # [rows, 1]
    base = torch.cat([extreme / lo, extreme / hi], dim=1)  # [rows, 2]
    cands = (base[:, :, None] * factors[None, None, :]).reshape(w.shape[0], -1)  # [rows, C]
    cands = cands.half().float()  # the scale is stored as fp16: search over what will be stored
    cands = torch.where(cands == 0, torch.full_like(cands, 1e-8), cands)
    q = grid.values(grid.codes(torch.clamp(w[:, None, :] / cands[:, :, None], lo, hi)))
    err = ((w[:, None, :] - q * cands[:, :, None]) ** 2 * importance[None, None, :]).sum(-1)
    best = err.argmin(dim=1, keepdim=True)
    return torch.gather(cands, 1, best)[:, 0]


def gptq_quantize(w: np.ndarray, hessian, block: int = BLOCK, damp: float = 0.01, lazy: int = 128, grid=None):
    """GPTQ with static per-block scales (chosen by :func:`search_scales` as each block is reached), into
    ``grid``'s values: a :class:`BlockQuant` for integer grids, a :class:`BlockCodebook` for a codebook."""
    import torch

    from edgekit.qat import GRIDS

    grid = grid or GRIDS["int4"]
    lo, hi = _value_range(grid)
    W = torch.from_numpy(np.array(w, dtype=np.float32))
    rows, cols = W.shape
    H = hessian.clone().double()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    importance = torch.diag(H).float().clamp_min(1e-12)
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()
    factors = torch.from_numpy(_scale_grid())

    Q = torch.zeros((rows, cols), dtype=torch.int8)
    S = torch.zeros((rows, cols // block), dtype=torch.float32)
    for b0 in range(0, cols, lazy):
        b1 = min(b0 + lazy, cols)
        W1 = W[:, b0:b1].clone()
        Err = torch.zeros_like(W1)
        Hinv1 = Hinv[b0:b1, b0:b1]
        d = None
        for j in range(b1 - b0):
            col = b0 + j
            if col % block == 0:
                d = search_scales(W1[:, j : j + block], importance[col : col + block], factors, grid)
                S[:, col // block] = d
            wcol = W1[:, j]
            q = grid.codes(torch.clamp(wcol / d, lo, hi))
            Q[:, col] = q.to(torch.int8)
            err = (wcol - grid.values(q) * d) / Hinv1[j, j]
            W1[:, j:] -= err[:, None] * Hinv1[j, j:][None, :]
            Err[:, j] = err
        W[:, b1:] -= Err @ Hinv[b0:b1, b1:]
    scales = S.numpy().astype(np.float16)
    if grid.levels is not None:
        return BlockCodebook(Q.numpy().astype(np.uint8), scales, np.array(grid.levels, dtype=np.int8), block, grid.name_codebook)
    return BlockQuant(Q.numpy(), scales, bits=grid.bits, block_size=block)


def layer_output_error(w: np.ndarray, bq: BlockQuant, hessian) -> float:
    """Relative output error tr(dW H dW^T) / tr(W H W^T) of a quantized layer on calibration inputs."""
    import torch

    Wt = torch.from_numpy(np.asarray(w, dtype=np.float64))
    dW = Wt - torch.from_numpy(bq.dequantize().astype(np.float64))
    H = hessian.double()
    return float(((dW @ H) * dW).sum() / ((Wt @ H) * Wt).sum())


def final_hidden_gram(model: Model, seqs: list[list[int]]):
    """Mean ``x x^T`` of the output head's input (the final norm's output) over ``seqs``."""
    import torch

    from edgekit.architectures.torch_decoder import DecoderNet, set_threads

    set_threads()
    net = DecoderNet(model).eval()
    acc, count = 0, 0
    with torch.inference_mode():
        for seq in seqs:
            x = net.hidden(torch.tensor([seq], dtype=torch.long))[0].double()
            acc, count = acc + x.T @ x, count + x.shape[0]
    return acc / max(1, count)


class Int4Pass(Pass):
    name = "int4"
    description = "data-aware 4-bit (GPTQ + activation-weighted scale search), Q4_0 container, output head Q8_0"
    needs_calibration = True
    kinds = frozenset({"decoder", "encoder"})
    tolerance = {"kld_mean": 0.6, "cosine_distance_mean": 0.03, "cosine_distance_worst": 0.15}
    param_types = {"damp": float, "head": str, "block": int}
    param_ranges = {"damp": (0.0, 1.0, "(]")}
    grid_name = "int4"  # the grid of edgekit.qat.GRIDS the numbers land on
    HEADS = ("q8_0", "int4")
    # one fp16 scale per block: 4.5, 4.25 or 4.125 bits per weight (32 is Q4_0; ONNX holds all three)
    BLOCKS = (32, 64, 128)

    @classmethod
    def params_problem(cls, params: dict) -> str | None:
        if params.get("head", "q8_0") not in cls.HEADS:
            return f"{cls.name}.head must be one of {', '.join(cls.HEADS)}, not {params['head']!r}"
        if params.get("block", BLOCK) not in cls.BLOCKS:
            return f"{cls.name}.block must be one of {', '.join(map(str, cls.BLOCKS))}, not {params['block']!r}"
        return None

    def block_size(self) -> int | None:
        return int(self.params["block"]) if "block" in self.params else None

    def apply(self, model: Model, ctx: PassContext) -> dict:
        from edgekit.passes.rtn import quantize_q4_0
        from edgekit.qat import GRIDS

        grid = GRIDS[self.grid_name]
        block = int(self.params.get("block", BLOCK))
        uneven = next((n for n in model.linear_names() if model.tensors[n].shape[1] % block), None)
        if uneven:  # before any calibration work
            from edgekit.errors import InputError

            raise InputError(f"{self.name} block {block} does not divide the {model.tensors[uneven].shape[1]} columns of {uneven}",
                             "choose a block size that divides every layer's input width (32 always does)")

        if ctx.calibration_tokens is None:
            raise ValueError("int4 needs calibration tokens")
        seqs = ctx.calibration_tokens()
        # input Gram matrices of every matrix, by weight name, from the model's own forward pass
        hessians = model.input_grams(seqs, ctx.progress)
        head = str(self.params.get("head", "q8_0"))
        if head == "int4":
            # the head reads the final norm's output: one more statistic, from a forward pass of its own
            hessians[model.output_head_name()] = final_hidden_gram(model, seqs)
        names = model.linear_names()
        gains = []
        for k, n in enumerate(names):
            w = model.tensors[n]
            if is_output_head(model, n) and head == "q8_0":
                model.encodings[n] = quantize_q8_0(w)
                continue
            if n not in hessians:
                # an untied input embedding is a lookup: no input statistics to compensate with
                model.encodings[n] = quantize_q4_0(w, block)
                continue
            H = hessians[n]
            bq = gptq_quantize(w, H, block=block, damp=float(self.params.get("damp", 0.01)), grid=grid)
            # keep a record of what the data-aware search bought over round-to-nearest, per layer
            gains.append(layer_output_error(w, quantize_q4_0(w, block), H) / max(layer_output_error(w, bq, H), 1e-30))
            model.encodings[n] = bq
            ctx.progress("GPTQ int4", k + 1, len(names))
        return {
            "pass": self.name,
            "tensors": len(names),
            "block_size": block,
            "output_head": head,
            "calibration_tokens": int(sum(len(s) for s in seqs)),
            "method": "gptq+weighted-scale-search",
            "damp": float(self.params.get("damp", 0.01)),
            "layer_error_ratio_rtn_over_int4_median": float(np.median(gains)) if gains else None,
        }
