"""Low-rank factorization of linear layers by truncated SVD, activation-aware (whitened) by default.

Plain SVD keeps the directions of largest weight energy, whatever the inputs. Activation-aware SVD
(as in SVD-LLM) factorizes ``W S`` where ``S S^T = E[x x^T]`` over calibration inputs, so the
truncation minimises the layer's *output* error on real activations; the factors are then
``B = U_r Sigma_r^1/2`` and ``A = Sigma_r^1/2 V_r^T S^-1`` (balanced, which keeps both factors'
ranges alike for quantization afterwards).

Ranks: ``rank`` is the fraction of the factorized layers' parameters to keep. Ranks move in steps of
32 (so the factors still tile into quantization blocks) and are handed out greedily to the layer
whose next step keeps the most of its (normalised) spectral energy per parameter, until the budget
is spent. A layer whose best rank would not save parameters stays dense.
"""

from __future__ import annotations

import heapq
from typing import Any

import numpy as np

from edgekit.architectures import layout as L
from edgekit.model import LOWRANK_A, LOWRANK_B, Model
from edgekit.passes import Pass, PassContext

STEP = 32
KINDS = L.LINEARS


def whitening(G: np.ndarray, damp: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """(S, S^-1) with S S^T = G (+ a small ridge so dead input dimensions do not blow up S^-1)."""
    G = np.asarray(G, dtype=np.float64)
    lam, Q = np.linalg.eigh(G + damp * np.mean(np.diag(G)) * np.eye(len(G)))
    lam = np.clip(lam, 1e-12 * lam.max(), None)
    return Q * np.sqrt(lam), (Q / np.sqrt(lam)).T


def factorize(W: np.ndarray, r: int, whiten: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(A [r, in], B [out, r]) with B @ A the best rank-r approximation of W (in the whitened norm if given)."""
    W = np.asarray(W, dtype=np.float64)
    U, sig, Vt = np.linalg.svd(W @ whiten[0] if whiten is not None else W, full_matrices=False)
    return _factors(U, sig, Vt, r, whiten[1] if whiten is not None else None)


def _factors(U, sig, Vt, r, S_inv):
    root = np.sqrt(sig[:r])
    B = U[:, :r] * root
    A = root[:, None] * Vt[:r]
    if S_inv is not None:
        A = A @ S_inv
    return A.astype(np.float32), B.astype(np.float32)


def allocate(spectra: dict[str, np.ndarray], shapes: dict[str, tuple[int, int]], fraction: float) -> dict[str, int]:
    """Rank per layer (0 = stays dense) for a budget of ``fraction`` of the layers' parameters."""
    budget = fraction * sum(o * i for o, i in shapes.values())
    ranks = {n: STEP for n in spectra}
    cap = {n: (o * i // (o + i)) // STEP * STEP for n, (o, i) in shapes.items()}
    spent = sum(STEP * sum(shapes[n]) for n in spectra)
    energy = {n: s ** 2 / max((s ** 2).sum(), 1e-30) for n, s in spectra.items()}
    heap = []

    def push(n: str) -> None:
        r = ranks[n]
        if r + STEP <= cap[n]:
            gain = float(energy[n][r : r + STEP].sum()) / (STEP * sum(shapes[n]))
            heapq.heappush(heap, (-gain, n))

    for n in spectra:
        push(n)
    while heap:
        _, n = heapq.heappop(heap)
        cost = STEP * sum(shapes[n])
        if spent + cost > budget:
            continue
        ranks[n] += STEP
        spent += cost
        push(n)
    return ranks


class LowRankPass(Pass):
    name = "lowrank"
    description = "truncated SVD of linear layers (activation-aware by default) to a parameter budget"
    needs_calibration = True
    structural = True
    order = 20  # factorizes what pruning left
    param_types = {"rank": float, "method": str}
    param_ranges = {"rank": (0.0, 1.0, "()")}

    def apply(self, model: Model, ctx: PassContext) -> dict[str, Any]:
        from edgekit.architectures.layout import input_key
        from edgekit.architectures.torch_decoder import collect_input_grams

        fraction = float(self.params.get("rank", 0.5))
        method = str(self.params.get("method", "whitened"))
        if method not in ("whitened", "plain"):
            raise ValueError(f"lowrank method must be 'whitened' or 'plain', not {method!r}")
        if not 0 < fraction < 1:
            raise ValueError("rank must be a fraction of parameters in (0, 1)")
        names = [L.linear(i, k) + ".weight" for i in range(model.spec.num_layers) for k in KINDS
                 if L.linear(i, k) + ".weight" in model.tensors]
        whiten: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if method == "whitened":
            grams = collect_input_grams(model, ctx.calibration_tokens(), ctx.progress)
            for key, G in grams.items():
                whiten[key] = whitening(G.numpy())
            del grams
        svds, spectra, shapes = {}, {}, {}
        for k, n in enumerate(names):
            W = model.tensors[n].astype(np.float64)
            S, S_inv = whiten.get(input_key(n), (None, None))
            U, sig, Vt = np.linalg.svd(W @ S if S is not None else W, full_matrices=False)
            svds[n] = (U, sig, Vt, S_inv)
            spectra[n], shapes[n] = sig, W.shape
            ctx.progress("SVD", k + 1, len(names))
        ranks = allocate(spectra, shapes, fraction)
        before = sum(o * i for o, i in shapes.values())
        after, kept, dense = 0, {}, 0
        for n in names:
            o, i = shapes[n]
            r = ranks[n]
            if r * (o + i) >= o * i:
                after += o * i
                dense += 1
                continue
            U, sig, Vt, S_inv = svds.pop(n)
            A, B = _factors(U, sig, Vt, r, S_inv)
            base = n[: -len(".weight")]
            del model.tensors[n]
            model.encodings.pop(n, None)
            model.tensors[base + LOWRANK_A] = A
            model.tensors[base + LOWRANK_B] = B
            after += r * (o + i)
            kept[n] = float((sig[:r] ** 2).sum() / (sig ** 2).sum())
        return {"pass": self.name, "rank": fraction, "method": method, "layers": len(names),
                "factorized": len(kept), "kept_dense": dense,
                "parameters_of_layers_before": int(before), "parameters_of_layers_after": int(after),
                "kept_fraction": after / before,
                "ranks": {n[len("layers."):-len(".weight")]: ranks[n] for n in names},
                "energy_kept_mean": float(np.mean(list(kept.values()))) if kept else None}
