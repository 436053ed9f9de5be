"""Layer dropping: remove whole decoder layers that change the residual stream least, with distillation recovery.

A layer's importance is its block influence (ShortGPT, Men et al. 2024): one minus the mean cosine
similarity between the residual stream entering and leaving it on calibration text. Layers whose output
is nearly their input are removed; the rest are renumbered, so the result is an ordinary shallower model
of the same architecture that every exporter packs (per-layer facts such as sliding-window types move
with their layers). Scores are computed once on the full model (the ranking hardly changes when
recomputed after each removal, and one pass costs one forward).

Cheap drafts for speculative decoding are the main use: a model with a third of the layers reads about
half the bytes per token of a 135M model whose tied head stays, and recovery by distillation from the
full model (``recover`` steps, see :mod:`edgekit.passes.recovery`) trains it to agree with the target,
which is what the acceptance rate measures.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from edgekit.architectures import layout as L
from edgekit.model import Model
from edgekit.passes import Pass, PassContext


def block_influence(model: Model, sequences: list[list[int]], progress=None) -> np.ndarray:
    """Per layer, 1 - mean over tokens of cos(residual in, residual out) on ``sequences``."""
    import torch

    from edgekit.architectures.torch_decoder import DecoderNet, set_threads

    set_threads()
    net = DecoderNet(model).eval()
    total = np.zeros(model.spec.num_layers)
    count = 0
    with torch.inference_mode():
        for k, seq in enumerate(sequences):
            x = net.embed(torch.tensor([seq], dtype=torch.long))
            tables, masks = net.rope_tables(0, len(seq)), {}
            for i, blk in enumerate(net.blocks):
                y = net.block_forward(blk, x, tables, masks)
                total[i] += float(torch.nn.functional.cosine_similarity(x[0], y[0], dim=-1).sum())
                x = y
            count += len(seq)
            if progress:
                progress("block influence", k + 1, len(sequences))
    return 1.0 - total / max(1, count)


def choose_layers(influence: np.ndarray, drop: int) -> list[int]:
    """The ``drop`` least influential layers; the first and last layers are always kept (they map tokens into
    and out of the residual space and score high on every model measured, but a tiny random model may not)."""
    n = len(influence)
    candidates = [i for i in np.argsort(influence, kind="stable") if 0 < i < n - 1]
    return sorted(int(i) for i in candidates[:drop])


def remove_layers(model: Model, dropped: list[int]) -> None:
    """Delete ``dropped`` layers' tensors and encodings and renumber the rest; the spec follows."""
    spec = model.spec
    keep = [i for i in range(spec.num_layers) if i not in set(dropped)]
    renamed: dict[str, str] = {}
    for new, old in enumerate(keep):
        for name in list(model.tensors):
            if name.startswith(L.prefix(old)):
                renamed[name] = L.prefix(new) + name[len(L.prefix(old)):]
    tensors = {n: t for n, t in model.tensors.items() if not n.startswith("layers.") or n in renamed}
    model.tensors = {renamed.get(n, n): t for n, t in tensors.items()}
    model.encodings = {renamed.get(n, n): e for n, e in model.encodings.items()
                       if not n.startswith("layers.") or n in renamed}
    types = tuple(spec.layer_types[i] for i in keep) if spec.layer_types is not None else None
    model.spec = dataclasses.replace(spec, num_layers=len(keep), layer_types=types)


class DropLayersPass(Pass):
    name = "drop_layers"
    description = "remove whole decoder layers of least block influence (1 - cos(in, out)), optional distillation recovery"
    needs_calibration = True
    structural = True
    order = 5  # before channel pruning: which layers stay decides which channels are ranked
    param_types = {"fraction": float, "layers": int, "recover": int, "lr": float}
    param_ranges = {"fraction": (0.0, 1.0, "()"), "layers": (1, 10_000, "[]"), "recover": (0, 1_000_000, "[]"),
                    "lr": (0.0, 1.0, "(]")}

    @classmethod
    def params_problem(cls, params: dict[str, Any]) -> str | None:
        if ("fraction" in params) == ("layers" in params):
            return "drop_layers needs exactly one of fraction (of the layers) or layers (how many to remove)"
        return None

    def apply(self, model: Model, ctx: PassContext) -> dict[str, Any]:
        from edgekit.errors import EdgekitError

        n = model.spec.num_layers
        drop = int(self.params["layers"]) if "layers" in self.params else int(round(float(self.params["fraction"]) * n))
        if not 0 < drop <= n - 2:
            raise EdgekitError(f"drop_layers would remove {drop} of {n} layers",
                               f"remove between 1 and {n - 2} (the first and last layers stay)")
        seqs = ctx.calibration_tokens()
        influence = block_influence(model, seqs, ctx.progress)
        dropped = choose_layers(influence, drop)
        params_before = model.num_parameters()
        remove_layers(model, dropped)
        record: dict[str, Any] = {"pass": self.name, "dropped": dropped, "layers_before": n,
                                  "layers_after": model.spec.num_layers,
                                  "block_influence": [round(float(v), 5) for v in influence],
                                  "score": "block influence (1 - mean cos(residual in, residual out))"}
        steps = int(self.params.get("recover", 0))
        if steps > 0:
            from edgekit.architectures.torch_decoder import DecoderNet
            from edgekit.passes.recovery import distill, recovery_windows, teacher_logprobs

            teacher = ctx.reference if ctx.reference is not None else None
            wins = recovery_windows(seqs)
            if teacher is None or not wins:
                raise EdgekitError("drop_layers recovery needs the uncompressed model and calibration text",
                                   "set recover = 0, or give --calib-text of at least 256 tokens")
            t_lp = teacher_logprobs(teacher, wins, ctx.progress)
            net = DecoderNet(model, trainable=True)
            record["recovery"] = distill(net, t_lp, wins, steps, float(self.params.get("lr", 1e-4)), None, ctx.progress)
            net.write_back(model)
        record.update({"parameters_before": params_before, "parameters_after": model.num_parameters(),
                       "calibration_tokens": int(sum(map(len, seqs)))})
        return record
