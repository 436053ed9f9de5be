"""Structured pruning of MLP channels and attention heads, chosen by saliency, with pruning-aware recovery.

Saliency is activation-weighted: a unit's importance is the energy it adds to the residual stream on
calibration text, computed exactly from input second moments (no gradients needed):

- MLP channel j of a layer: E[a_j^2] * ||W_down[:, j]||^2, with a = silu(gate(x)) * up(x);
- attention head h: tr(W_o[:, h] G_hh W_o[:, h]^T), with G the second moment of o_proj's input.

Heads are removed inside each grouped-query group, the same number from every group, so the
model stays a valid GQA model (every key/value head keeps ``heads/kv_heads`` query heads). MLP
widths are the same in every layer by default; ``uniform=false`` ranks all channels globally so
widths differ per layer (formats that can express it only; it measured worse on SmolLM2, see
``apply``). Every width stays a multiple of 32 so block quantizers still tile the rows.

Recovery (``recover`` steps, see :mod:`edgekit.passes.recovery`) is pruning-aware: the channels
and heads chosen for removal are faded out linearly over the first half of the steps by masks inside
the forward pass while the network distils from the unpruned model; only then are they cut. The
result is a smaller dense model (fewer parameters and bytes) every exporter handles.

``compensate=true`` keeps each layer's cut count but picks the MLP channels by optimal brain surgeon on the
down projection and re-solves its kept columns by least squares (:func:`obs_mlp_cut`), cutting before
recovery; measured on SmolLM2 it helps without recovery and is neutral after 100 recovery steps (README).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from edgekit.architectures import layout as L
from edgekit.model import Model
from edgekit.passes import Pass, PassContext

ALIGN = 32  # widths stay multiples of the quantizers' block size
MIN_KEEP = 0.25  # never cut a layer's MLP below a quarter of its width


def mlp_scores(model: Model, grams: dict) -> list[np.ndarray]:
    out = []
    for i in range(model.spec.num_layers):
        energy = np.diag(grams[L.input_key(L.linear(i, L.DOWN))].numpy())
        down = model.tensors[L.linear(i, L.DOWN) + ".weight"]
        out.append(energy * (down.astype(np.float64) ** 2).sum(0))
    return out


def head_scores(model: Model, grams: dict) -> list[np.ndarray]:
    hd = model.spec.head_dim
    out = []
    for i in range(model.spec.num_layers):
        G = grams[L.input_key(L.linear(i, L.O))].numpy()
        Wo = model.tensors[L.linear(i, L.O) + ".weight"].astype(np.float64)
        heads = Wo.shape[1] // hd
        s = [np.trace(Wo[:, h * hd:(h + 1) * hd] @ G[h * hd:(h + 1) * hd, h * hd:(h + 1) * hd] @ Wo[:, h * hd:(h + 1) * hd].T)
             for h in range(heads)]
        out.append(np.array(s))
    return out


def obs_mlp_cut(down: np.ndarray, gram: np.ndarray, cut: int, damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Channels to remove from one MLP and the down projection that best makes up for them.

    Optimal brain surgeon over whole input columns of the down projection (ZipLM / SlimGPT): with
    H the second moment of its input, removing channel j costs ||W[:, j]||^2 / [H^-1]_jj in output
    energy once the other columns are re-solved by least squares; the cheapest goes first, and W and
    H^-1 are updated in closed form. The returned weight (the kept columns only) is the least-squares
    fit of the full layer's output from the kept channels on the calibration data.
    """
    W = down.astype(np.float64).copy()
    H = gram.astype(np.float64).copy()
    H[np.diag_indices_from(H)] += damp * float(np.mean(np.diag(H))) + 1e-12
    Hinv = np.linalg.inv(H)
    alive = np.ones(W.shape[1], bool)
    removed = []
    for _ in range(cut):
        d = np.diag(Hinv)
        cost = np.where(alive, (W ** 2).sum(0) / np.maximum(d, 1e-30), np.inf)
        j = int(np.argmin(cost))
        W -= np.outer(W[:, j], Hinv[j]) / Hinv[j, j]
        Hinv -= np.outer(Hinv[:, j], Hinv[j]) / Hinv[j, j]
        alive[j] = False
        removed.append(j)
    return np.sort(np.array(removed, np.int64)), W[:, alive].astype(down.dtype)


def _round(n: float) -> int:
    return int(ALIGN * round(n / ALIGN))


def choose_mlp(scores: list[np.ndarray], fraction: float, uniform: bool) -> list[np.ndarray]:
    """Indices of the channels to remove, per layer."""
    widths = [len(s) for s in scores]
    if uniform:
        cut = _round(fraction * widths[0])
        cut = min(cut, widths[0] - max(ALIGN, _round(MIN_KEEP * widths[0])))
        return [np.sort(np.argsort(s)[:cut]) for s in scores]
    # one global ranking of channel contributions; each layer's count rounded to the block size
    flat = np.concatenate(scores)
    total_cut = int(round(fraction * flat.size))
    thresh = np.sort(flat)[total_cut - 1] if total_cut else -np.inf
    cuts = []
    for s, w in zip(scores, widths):
        c = _round(float((s <= thresh).sum()))
        cuts.append(max(0, min(c, w - max(ALIGN, _round(MIN_KEEP * w)))))
    # rounding drifts from the budget: move whole blocks where the marginal channel is cheapest
    target = _round(fraction * flat.size / len(widths)) * len(widths)
    while sum(cuts) != target:
        if sum(cuts) < target:
            cand = [(np.sort(s)[c + ALIGN - 1] if c + ALIGN <= w - max(ALIGN, _round(MIN_KEEP * w)) else np.inf, i)
                    for i, (s, w, c) in enumerate(zip(scores, widths, cuts))]
            best = min(cand)
            if not np.isfinite(best[0]):
                break
            cuts[best[1]] += ALIGN
        else:
            cand = [(np.sort(s)[c - 1] if c >= ALIGN else -np.inf, i) for i, (s, c) in enumerate(zip(scores, cuts))]
            best = max(cand)
            cuts[best[1]] -= ALIGN
    return [np.sort(np.argsort(s)[:c]) for s, c in zip(scores, cuts)]


def choose_heads(scores: list[np.ndarray], kv_heads: int, fraction: float) -> list[np.ndarray]:
    """Query heads to remove per layer: the same number from every key/value group (lowest saliency)."""
    out = []
    for s in scores:
        group = len(s) // kv_heads
        cut = min(group - 1, int(round(fraction * group)))
        idx = []
        for g in range(kv_heads):
            members = np.arange(g * group, (g + 1) * group)
            idx += list(members[np.argsort(s[members])[:cut]])
        out.append(np.sort(np.array(idx, dtype=np.int64)))
    return out


def remove(model: Model, mlp_cut: list[np.ndarray], head_cut: list[np.ndarray]) -> None:
    """Physically drop the chosen rows/columns; update the spec when every layer has the same widths.

    A removed MLP channel takes its gate/up rows (and biases) and its down column; a removed query head
    takes its q rows (and bias) and its o columns. Key/value heads, and the per-head q/k norms (shared by
    all heads), stay.
    """
    hd = model.spec.head_dim
    t = model.tensors

    def rows(base: str, keep: np.ndarray) -> None:
        for suffix in (".weight", ".bias"):
            if base + suffix in t:
                t[base + suffix] = np.ascontiguousarray(t[base + suffix][keep])

    def cols(base: str, keep: np.ndarray) -> None:
        t[base + ".weight"] = np.ascontiguousarray(t[base + ".weight"][:, keep])

    for i in range(model.spec.num_layers):
        keep = np.setdiff1d(np.arange(t[L.linear(i, L.GATE) + ".weight"].shape[0]), mlp_cut[i])
        rows(L.linear(i, L.GATE), keep)
        rows(L.linear(i, L.UP), keep)
        cols(L.linear(i, L.DOWN), keep)
        heads = t[L.linear(i, L.Q) + ".weight"].shape[0] // hd
        keep_h = np.setdiff1d(np.arange(heads), head_cut[i])
        keep_c = np.concatenate([np.arange(h * hd, (h + 1) * hd) for h in keep_h])
        rows(L.linear(i, L.Q), keep_c)
        cols(L.linear(i, L.O), keep_c)
    widths = [model.layer_widths(i) for i in range(model.spec.num_layers)]
    model.spec = dataclasses.replace(model.spec, intermediate_size=max(w["intermediate"] for w in widths),
                                     num_heads=max(w["heads"] for w in widths))


class PrunePass(Pass):
    name = "prune"
    description = "structured pruning of MLP channels / attention heads by activation-weighted saliency, optional distillation recovery"
    needs_calibration = True
    structural = True
    order = 10  # pruning ranks channels of the full-width model
    param_types = {"mlp": float, "heads": float, "recover": int, "lr": float, "uniform": bool, "compensate": bool}
    param_ranges = {"mlp": (0.0, 1.0, "[)"), "heads": (0.0, 1.0, "[)"), "recover": (0, 1_000_000, "[]"), "lr": (0.0, 1.0, "(]")}

    @classmethod
    def params_problem(cls, params: dict[str, Any]) -> str | None:
        if not params.get("mlp") and not params.get("heads"):
            return "prune needs mlp and/or heads above 0 (the fractions of MLP channels / heads to remove)"
        return None

    def apply(self, model: Model, ctx: PassContext) -> dict[str, Any]:
        import torch

        from edgekit.passes.recovery import distill, recovery_windows, teacher_logprobs
        from edgekit.architectures.torch_decoder import DecoderNet, collect_input_grams

        mlp = float(self.params.get("mlp", 0.0))
        heads = float(self.params.get("heads", 0.0))
        steps = int(self.params.get("recover", 0))
        if not (0 <= mlp < 1 and 0 <= heads < 1) or mlp + heads == 0:
            raise ValueError("prune needs mlp and/or heads fractions in [0, 1)")
        # uniform by default: measured on SmolLM2, one global saliency ranking cut the early layers to a
        # quarter of their width and doubled the KLD of 25% pruning + recovery (0.49 vs 0.23 uniform)
        uniform = bool(self.params.get("uniform", True))
        if not uniform and not ctx.options.get("per_layer_widths", False):
            from edgekit.errors import EdgekitError

            raise EdgekitError("this format needs one MLP width for every layer", "drop --per-layer (uniform=false) or use --format onnx")
        seqs = ctx.calibration_tokens()
        grams = collect_input_grams(model, seqs, ctx.progress)
        params_before = model.num_parameters()
        mlp_cut = choose_mlp(mlp_scores(model, grams), mlp, uniform) if mlp else \
            [np.array([], np.int64)] * model.spec.num_layers
        head_cut = choose_heads(head_scores(model, grams), model.spec.num_kv_heads, heads) if heads else \
            [np.array([], np.int64)] * model.spec.num_layers
        record: dict[str, Any] = {"pass": self.name, "mlp": mlp, "heads": heads, "uniform": uniform,
                                  "saliency": "activation-weighted (E[a^2] * ||W_out column||^2)"}
        if mlp and self.params.get("compensate", False):
            # choose by OBS and re-solve each down projection from its kept channels, cut now; recovery then
            # trains the smaller model (nothing left to fade)
            downs = {}
            for i, c in enumerate(mlp_cut):
                name = L.linear(i, L.DOWN) + ".weight"
                mlp_cut[i], downs[i] = obs_mlp_cut(model.tensors[name], grams[L.input_key(L.linear(i, L.DOWN))].numpy(), len(c))
            remove(model, mlp_cut, [np.array([], np.int64)] * model.spec.num_layers)
            for i, w in downs.items():
                model.tensors[L.linear(i, L.DOWN) + ".weight"] = np.ascontiguousarray(w)
            mlp_cut = [np.array([], np.int64)] * model.spec.num_layers
            record["saliency"] = "optimal brain surgeon on the down projection, kept columns re-solved by least squares"
        del grams
        if steps > 0:
            teacher = ctx.reference if ctx.reference is not None else model
            wins = recovery_windows(seqs)
            t_lp = teacher_logprobs(teacher, wins, ctx.progress)
            net = DecoderNet(model, trainable=True)
            fade = max(1, steps // 2)
            mlp_masks, head_masks = [], []
            for blk, mc, hc in zip(net.blocks, mlp_cut, head_cut):
                mm = torch.ones(blk.lin["gate"].out_features)
                hm = torch.ones(blk.heads)
                blk.mlp_mask, blk.head_mask = mm, hm
                mlp_masks.append((mm, torch.from_numpy(mc)))
                head_masks.append((hm, torch.from_numpy(hc)))

            def before_step(step: int) -> None:  # pruning-aware: fade the removed units out, then train without them
                v = max(0.0, 1.0 - (step + 1) / fade)
                for m, idx in mlp_masks + head_masks:
                    m[idx] = v

            record["recovery"] = distill(net, t_lp, wins, steps, float(self.params.get("lr", 1e-4)), before_step,
                                         ctx.progress)
            record["recovery"]["fade_steps"] = fade
            net.write_back(model)
        remove(model, mlp_cut, head_cut)
        widths = [model.layer_widths(i) for i in range(model.spec.num_layers)]
        record.update({"parameters_before": params_before, "parameters_after": model.num_parameters(),
                       "mlp_widths": [w["intermediate"] for w in widths], "heads_per_layer": [w["heads"] for w in widths],
                       "calibration_tokens": int(sum(map(len, seqs)))})
        return record
