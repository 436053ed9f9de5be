"""``qat``: quantization-aware training into the same containers as the post-training passes.

A storage pass (it comes last in a recipe, after pruning or low-rank). ``grid`` picks the numbers:

- ``int4`` (default): Q4_0 semantics (integers in [-8, 7], fp16 scale per 32), starting from ``int4``'s GPTQ;
- ``nl4``: GGUF's IQ4_NL codebook (GGUF only), starting from ``nl4``'s GPTQ;
- ``int8``: Q8_0 semantics; ``int2``: integers in [-2, 1] per 32 (ONNX 2-bit MatMulNBits; GGUF holds
  them in Q4_0 blocks);
- ``ternary``: {-1, 0, +1} x absmean block scales as the ``ternary`` pass (TQ2_0 where rows allow),
  starting from the float weights (ternary post-training numbers are too far off to start from).

Then :func:`edgekit.qat.blockwise` (every layer's weights, norms and step sizes against the float
layer's outputs) and :func:`edgekit.qat.end_to_end` (step sizes and norms on the KL divergence to the
float model), each keeping its state only where the held-in validation windows say it helped. The
integers and fp16 scales it ends with are what every exporter packs, so the files stay stock. The
output head / tied embedding stays Q8_0 (as in ``int4`` and ``ternary``) and is frozen at those
numbers during training, so what trains is what the artifact computes.

Runs on CUDA when torch sees a GPU (bf16 autocast is not used: the fp16 rounding of scales is part
of the forward pass and bf16 would blur it; a GPU's speed comes from larger batches instead).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from edgekit.model import BlockQuant, Model
from edgekit.passes import Pass, PassContext, is_output_head

# Defaults sized for the embedded 135M model to finish within ~15 minutes on a 2-core CPU. Measured there
# (out-of-domain KLD in torch): a second block-wise epoch bought nothing (0.1403 vs 0.1399 after the stage)
# and a 6x block-wise rate neither; end-to-end steps are what pay, at a rate of 2-3e-5 (1e-4 diverged), so
# the budget goes to 200 of them.
DEFAULTS: dict[str, Any] = {"grid": "int4", "window": 256, "epochs": 1.0, "e2e_steps": 200, "lr_weights": 5e-5,
                            "lr_scales": 5e-4, "lr_e2e": 3e-5, "batch": 4, "act8": False,
                            "lr_e2e_weights": 0.0}
# ternary moves far from its start: more block-wise training, a higher rate
TERNARY_DEFAULTS: dict[str, Any] = {"epochs": 8.0, "lr_weights": 1e-4, "lr_scales": 1e-3, "e2e_steps": 200, "lr_e2e": 1e-4}
GRID_NAMES = ("int4", "nl4", "int8", "int2", "ternary")


class QATPass(Pass):
    name = "qat"
    description = ("quantization-aware training: block-wise (weights + step sizes vs the float layer), then end-to-end "
                   "step sizes on KL to the float model; grid int4 (Q4_0) / nl4 (IQ4_NL) / int8 / int2 / ternary")
    needs_calibration = True
    trains = True
    kinds = frozenset({"decoder"})
    param_types = {"grid": str, "window": int, "epochs": float, "e2e_steps": int, "lr_weights": float,
                   "lr_scales": float, "lr_e2e": float, "batch": int, "tokens": int,
                   "act8": bool, "lr_e2e_weights": float, "damp": float}
    param_ranges = {"window": (16, 8192, "[]"), "epochs": (0.0, 1000.0, "[]"), "e2e_steps": (0, 1_000_000, "[]"),
                    "lr_weights": (0.0, 1.0, "[]"), "lr_scales": (0.0, 1.0, "[]"), "lr_e2e": (0.0, 1.0, "[]"),
                    "lr_e2e_weights": (0.0, 1.0, "[]"), "damp": (0.0, 1.0, "(]"),
                    "batch": (1, 4096, "[]"), "tokens": (256, 100_000_000, "[]")}

    def __init__(self, **params: Any):
        super().__init__(**params)
        grid = params.get("grid", DEFAULTS["grid"])
        if grid not in GRID_NAMES:
            from edgekit.errors import InputError

            raise InputError(f"qat grid '{grid}' is not one of {', '.join(GRID_NAMES)}", "pick one with --qat-grid")

    def setting(self, key: str) -> Any:
        grid = self.params.get("grid", DEFAULTS["grid"])
        if key in self.params:
            return self.params[key]
        if grid == "ternary" and key in TERNARY_DEFAULTS:
            return TERNARY_DEFAULTS[key]
        return DEFAULTS.get(key)

    def grid_codebook(self) -> str | None:
        from edgekit.qat import GRIDS

        return GRIDS[self.params.get("grid", "int4")].name_codebook or None

    def warnings(self, record: dict[str, Any], quality: dict[str, Any]) -> list[str]:
        from edgekit.passes.ternary import BROKEN_KLD

        kld = quality.get("kld_mean")
        if record.get("grid") in ("ternary", "int2") and kld is not None and kld > BROKEN_KLD:
            return [f"{record['grid']} after QAT: mean KLD {kld:.2f} > {BROKEN_KLD} (perplexity "
                    f"{quality.get('ppl', float('nan')):.1f} vs {quality.get('ref_ppl', float('nan')):.1f}): this model "
                    "is broken; train longer (tokens, epochs, e2e_steps)"]
        return []

    def apply(self, model: Model, ctx: PassContext) -> dict[str, Any]:
        import torch

        from edgekit import qat
        from edgekit.architectures.torch_decoder import DecoderNet, set_threads

        grid_name = self.setting("grid")
        if ctx.calibration_tokens is None:
            raise ValueError("qat needs calibration tokens")
        grid = qat.GRIDS[grid_name]
        set_threads()
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        t0 = time.perf_counter()
        seqs = ctx.calibration_tokens()
        init = self._post_training(model, ctx, grid_name)
        window = int(self.setting("window"))
        from edgekit.passes.recovery import recovery_windows

        wins = recovery_windows(seqs, window)
        if self.setting("tokens"):
            wins = wins[: max(2, int(self.setting("tokens")) // window)]
        if len(wins) < 2:
            raise ValueError(f"qat needs at least {2 * window} calibration tokens; it has {sum(map(len, seqs))}")
        train, val = qat.split_validation(wins)

        teacher_model = ctx.reference if ctx.reference is not None else model
        teacher = DecoderNet(teacher_model).eval().to(device)
        student = DecoderNet(model).to(device)  # the model as earlier (structural) passes left it
        if self.setting("act8"):
            act = qat.int8_activations(256 if grid_name == "ternary" else 32)
            for blk in student.blocks:
                for lin in blk.lin.values():
                    lin.input_fn = act
        quants: dict[str, qat.FakeQuant] = {}
        latent_float = grid_name == "ternary"
        with torch.no_grad():
            for n in model.linear_names():
                enc = init.get(n)
                if enc is None or is_output_head(model, n) or not hasattr(enc, "scales"):
                    if enc is not None and hasattr(enc, "dequantize"):  # frozen at its stored numbers
                        student.param(n).copy_(torch.from_numpy(enc.dequantize()))
                    continue
                if not latent_float:  # QAT starts where post-training quantization ended
                    student.param(n).copy_(torch.from_numpy(enc.dequantize()))
                quants[n] = qat.FakeQuant(grid, torch.from_numpy(enc.scales.astype(np.float32)).to(device))
        batch = int(self.setting("batch")) * (4 if device.type == "cuda" else 1)
        record: dict[str, Any] = {"pass": self.name, "grid": grid_name, "device": device.type, "window_tokens": window,
                                  "train_windows": len(train), "validation_windows": len(val),
                                  "init": "float weights, absmean scales" if latent_float else "post-training (GPTQ) numbers",
                                  "output_head": "q8_0 (frozen)",
                                  "activations": "int8 blocks (as the runtimes)" if self.setting("act8") else "float"}
        record["blockwise"] = qat.blockwise(student, teacher, quants, train, val, float(self.setting("epochs")),
                                            float(self.setting("lr_weights")), float(self.setting("lr_scales")), batch,
                                            device, ctx.progress)
        steps = int(self.setting("e2e_steps"))
        if steps > 0:
            t_train = qat.teacher_logprobs(teacher, train, device)
            t_val = qat.teacher_logprobs(teacher, val, device)
            del teacher
            for blk in student.blocks:
                for lin in blk.lin.values():
                    lin.weight_fns = {n: quants[n] for n in lin.names if n in quants}
            record["end_to_end"] = qat.end_to_end(student, quants, train, val, t_train, t_val, steps,
                                                  float(self.setting("lr_e2e")), max(1, batch // 4), device,
                                                  lr_weights=float(self.setting("lr_e2e_weights")),
                                                  progress=ctx.progress)
        self._store(model, student, quants, init, grid)
        record["seconds_training"] = round(time.perf_counter() - t0, 1)
        record["tensors"] = len(quants)
        return record

    def _post_training(self, model: Model, ctx: PassContext, grid_name: str) -> dict[str, Any]:
        """The post-training numbers QAT starts from (a scratch copy: ``model`` is written only at the end)."""
        import copy

        scratch = copy.copy(model)
        scratch.tensors, scratch.encodings = dict(model.tensors), dict(model.encodings)
        if grid_name in ("int4", "nl4", "int2"):
            from edgekit.passes.int4 import Int4Pass

            p = Int4Pass(**({"damp": self.params["damp"]} if "damp" in self.params else {}))
            p.grid_name = grid_name
            p.apply(scratch, ctx)
        elif grid_name == "int8":
            from edgekit.passes.rtn import Q8_0Pass

            Q8_0Pass().apply(scratch, ctx)
        else:
            from edgekit.passes.ternary import TernaryPass

            TernaryPass().apply(scratch, ctx)
        return scratch.encodings

    def _store(self, model: Model, net, quants, init, grid) -> None:
        from edgekit.model import BlockCodebook

        for n in model.linear_names():
            if n not in quants:
                model.encodings[n] = init[n]
                continue
            q, s = quants[n].stored(net.param(n))
            if grid.levels is not None:
                model.encodings[n] = BlockCodebook(q.astype(np.uint8), s, np.array(grid.levels, dtype=np.int8),
                                                   grid.block_for(q.shape[1]), grid.name_codebook)
            else:
                model.encodings[n] = BlockQuant(q, s, bits=grid.bits, block_size=grid.block_for(q.shape[1]))
            # the float tensor becomes the trained latent weight (what a later pass or report would see)
            model.tensors[n] = net.param(n).detach().float().cpu().numpy().copy()
        for n in net.names:
            p = net.param(n)
            if p.ndim == 1:  # norms (and biases) trained in place
                model.tensors[n] = p.detach().float().cpu().numpy().copy()
