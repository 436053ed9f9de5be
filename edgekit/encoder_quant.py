"""Compression recipes for encoders: the numbers (integers, fp16 scales) every encoder exporter packs.

The same quantizers as the decoder passes, applied to :class:`edgekit.encoder.EncoderModel`:

| recipe | transformer matrices | word embedding |
|---|---|---|
| ``fp32`` | float32 | float32 |
| ``fp16`` | fp16 | fp16 |
| ``int8`` | Q8_0 round-to-nearest (8-bit, blocks of 32) | Q8_0 |
| ``q4_0`` | Q4_0 round-to-nearest (4-bit, blocks of 32) | Q8_0 |
| ``int4`` | GPTQ into the Q4_0 grid, Hessians from calibration sentences | Q8_0 |

The word embedding (30522 x 384 in MiniLM, half of its weights) stays 8-bit in the 4-bit recipes: it is
read by a gather, not a matmul, so its bits cost memory but no compute. Measured on MiniLM (205 shipped
sentences): int4 with a 4-bit embedding is 15.0 MB at cosine mean 0.9797, with the 8-bit one 20.9 MB at
0.9808; the 0.97 bar leaves too little room to spend on 6 MB. Plain round-to-nearest 4-bit (``q4_0``)
scores 0.969, below the bar: hence GPTQ for ``int4``. Position and token-type embeddings, biases and
LayerNorms stay float32 (a few hundred thousand values).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from edgekit.encoder import EMBEDDING, EncoderModel
from edgekit.errors import UnknownPluginError
from edgekit.model import Cast
from edgekit.passes.rtn import BLOCK, quantize_q4_0, quantize_q8_0

QUANTS = ("fp32", "fp16", "int8", "int4", "q4_0")
ALIASES = {"f32": "fp32", "f16": "fp16", "q8_0": "int8"}
DESCRIPTIONS = {
    "fp32": "float32 weights (the reference, in ONNX)",
    "fp16": "fp16 weights",
    "int8": "8-bit round-to-nearest, blocks of 32 (Q8_0), embedding Q8_0",
    "q4_0": "4-bit round-to-nearest, blocks of 32 (Q4_0), embedding Q8_0",
    "int4": "data-aware 4-bit (GPTQ + activation-weighted scale search, Q4_0 grid), embedding Q8_0",
}


def canonical_quant(quant: str | None) -> str:
    """The recipe name for ``--quant`` (aliases f32/f16/q8_0 accepted); fails with the known names."""
    q = ALIASES.get(quant or "int8", quant or "int8")
    if q not in QUANTS:
        raise UnknownPluginError(f"no encoder recipe named '{quant}'", f"known: {', '.join(QUANTS)} (aliases f32, f16, q8_0)")
    return q


def collect_encoder_hessians(model: EncoderModel, texts: Sequence[str], progress=None) -> dict[str, Any]:
    """Input Gram matrices (mean of x x^T, float64) of every transformer matrix over ``texts``.

    One text per forward pass: a padded batch would add the padding positions' states, which no
    output depends on (pooling masks them), to the statistics.
    """
    import torch

    from edgekit.encoder import build_bert, encode_texts, text_tokenizer

    net = build_bert(model)
    tok = text_tokenizer(model.tokenizer_json, model.max_length)
    acc: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(key: str):
        def fn(_mod, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            acc[key] = acc.get(key, 0) + x.T @ x
            counts[key] = counts.get(key, 0) + x.shape[0]

        return fn

    handles = [mod.register_forward_pre_hook(hook(name + ".weight")) for name, mod in net.named_modules()
               if isinstance(mod, torch.nn.Linear) and name + ".weight" in model.tensors]
    with torch.inference_mode():
        for k, text in enumerate(texts):
            ids, mask = encode_texts(tok, [text])
            net(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
            if progress:
                progress("calibration forward", k + 1, len(texts))
    for h in handles:
        h.remove()
    return {k: v / counts[k] for k, v in acc.items()}


def quantize_encoder(model: EncoderModel, quant: str, calibration: Callable[[], list[str]] | None = None,
                     progress: Callable[[str, int, int], None] = lambda d, a, b: None) -> dict[str, Any]:
    """Set ``model.encodings`` for recipe ``quant``; returns the JSON-able record of what was done."""
    quant = canonical_quant(quant)
    names = model.linear_names()
    record: dict[str, Any] = {"pass": quant, "description": DESCRIPTIONS[quant], "tensors": len(names) + 1}
    if quant == "fp32":
        return record | {"tensors": 0}
    if quant == "fp16":
        for n in [*names, EMBEDDING]:
            model.encodings[n] = Cast("f16")
        return record
    model.encodings[EMBEDDING] = quantize_q8_0(model.tensors[EMBEDDING])
    record |= {"block_size": BLOCK, "embedding": "q8_0"}
    if quant == "int8":
        for n in names:
            model.encodings[n] = quantize_q8_0(model.tensors[n])
        # ORT's dynamic int8 (activations quantized at run time) ran faster on MiniLM but lost far more
        # cosine; benchmarks/bench_encoder.py measures both in every run
        return record | {"method": "weight-only (Q8_0 integers; activations stay float)",
                         "why": "the same numbers as GGUF q8_0; ORT dynamic int8 trades cosine for speed (see bench_encoder)"}
    if quant == "q4_0":
        for n in names:
            model.encodings[n] = quantize_q4_0(model.tensors[n])
        return record
    # int4: GPTQ with the decoders' int4 machinery, on the encoder's own activation statistics
    from edgekit.passes.int4 import gptq_quantize, layer_output_error

    if calibration is None:
        raise ValueError("int4 needs calibration sentences")
    from edgekit.encoder import torch_threads

    texts = calibration()
    gains = []
    # batch-1 forwards and GPTQ's per-column steps are tiny ops: one thread is 15-30x faster than two
    # on a busy 2-core machine (measured: 0.8 s vs 14.5 s GPTQ of a 384x1536 matrix)
    with torch_threads(1):
        hessians = collect_encoder_hessians(model, texts, progress)
        for k, n in enumerate(names):
            w, H = model.tensors[n], hessians[n]
            bq = gptq_quantize(w, H)
            gains.append(layer_output_error(w, quantize_q4_0(w), H) / max(layer_output_error(w, bq, H), 1e-30))
            model.encodings[n] = bq
            progress("GPTQ int4", k + 1, len(names))
    return record | {"method": "gptq+weighted-scale-search", "calibration_texts": len(texts),
                     "layer_error_ratio_rtn_over_int4_median": float(np.median(gains))}
