"""Core ML export of BERT sentence encoders (all-MiniLM-L6-v2): the pooled, normalized embedding.

The module converted is :func:`edgekit.encoder.SentenceEncoder` (transformers' ``BertModel`` +
sentence-transformers pooling + L2 normalization), the same one the float reference and the ONNX
exporter use. It goes through ``torch.export`` (``run_decompositions({})``): coremltools' TorchScript
route fails on BERT under numpy 2.4. Inputs ``input_ids`` / ``attention_mask`` int32 ``[B, S]``
(B in 1..64, S in 1..max_length), output ``sentence_embedding`` ``[B, hidden]``; ML program for iOS 18.

Weights: the MIL pass of :mod:`edgekit.converters.coreml_weights` replaces the word embedding and the
36 layer matrices by the encodings' own integers and fp16 scales (found by value: ``torch.export``
renames parameters), and the saved package is read back and compared bit for bit, as for decoders.
Core ML's runtime exists only on macOS, so the cosine check against the reference runs only there;
the manifest says so.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import ValidationError
from edgekit.formats import coreml as fmt

INPUTS = ("input_ids", "attention_mask")
OUTPUT = "sentence_embedding"
MAX_BATCH = 64


def weight_names(model) -> list[str]:
    """The word embedding and the layer matrices: what the packing pass replaces."""
    return model.linear_names()


def unsupported(model) -> str | None:
    """Why the Core ML encoder cannot hold ``model``'s encodings, or None."""
    from edgekit.converters import coreml_weights as cw
    from edgekit.model import Cast

    if all(isinstance(model.encoding(n), Cast) and model.encoding(n).dtype == "f32" for n in weight_names(model)):
        return "Core ML stores float weights as fp16: use --quant fp16 (or int8, int4, ternary)"
    return cw.unsupported(model, weight_names(model))


def convert_module(model, package: Path) -> dict[str, Any]:
    """torch.export the sentence encoder, convert it with the packing pass, save ``package``."""
    import torch

    from edgekit.converters import coreml_weights as cw
    from edgekit.converters.coreml import _quiet_coremltools
    from edgekit.encoder import SentenceEncoder

    ct = _quiet_coremltools()
    net = SentenceEncoder(model)
    S = model.max_length
    ids = torch.ones((2, 8), dtype=torch.int32)
    mask = torch.ones((2, 8), dtype=torch.int32)
    batch, seq = torch.export.Dim("batch", min=1, max=MAX_BATCH), torch.export.Dim("seq", min=2, max=S)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export(net, (ids, mask), dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                                                          "attention_mask": {0: batch, 1: seq}})
        exported = exported.run_decompositions({})
    names = weight_names(model)
    with cw.packing(model, cw.by_value(model, names)) as job, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlmodel = ct.convert(
            exported,
            inputs=[ct.TensorType(name=n, shape=(ct.RangeDim(1, MAX_BATCH), ct.RangeDim(2, S)), dtype=np.int32)
                    for n in INPUTS],
            outputs=[ct.TensorType(name=OUTPUT, dtype=np.float32)],
            minimum_deployment_target=ct.target.iOS18, convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16, pass_pipeline=cw.pipeline(), skip_model_load=True)
    mlmodel.short_description = f"edgekit Core ML export of the {model.name} sentence encoder"
    mlmodel.save(str(package))
    return {"found": job["found"]}


def validate_package(package: Path, model) -> dict[str, Any]:
    """Interface and weights read back from the saved package; raises ValidationError."""
    from edgekit.converters import coreml_weights as cw
    from edgekit.converters.coreml import interface, program_structure

    prog, spec = cw.load_program(package)
    io = interface(spec)
    bad = [f"input {n}" for n in INPUTS if io["inputs"].get(n, {}).get("dtype") != "INT32"]
    if list(io["outputs"]) != [OUTPUT]:
        bad.append(f"outputs {list(io['outputs'])}")
    if bad:
        raise ValidationError(package.name, "inputs/outputs differing from the runtime's contract", len(bad), 0, "; ".join(bad))
    names = weight_names(model)
    return {"interface": io, "weights": cw.require_bit_exact(package.name, prog, model, names),
            "op_counts": program_structure(prog), "spec_version": spec.specificationVersion}


def export_encoder(model, out_dir: Path) -> dict[str, Any]:
    """Write ``model.mlpackage`` + ``tokenizer.json`` + ``coreml_config.json`` for an encoder; the package
    is read back and its weights compared bit for bit (Core ML's runtime exists only on macOS)."""
    from edgekit.converters import coreml_weights as cw

    out_dir = Path(out_dir)
    package = out_dir / fmt.MODEL_FILE
    t0 = time.perf_counter()
    convert_module(model, package)
    t_convert = time.perf_counter() - t0
    t0 = time.perf_counter()
    checks = validate_package(package, model)
    t_check = time.perf_counter() - t0
    (out_dir / fmt.TOKENIZER_FILE).write_text(model.tokenizer_json)
    storage = {n: cw.storage_kind(model, n) for n in weight_names(model)}
    fmt.CONFIG.write(out_dir, {"inputs": list(INPUTS), "output": OUTPUT, "dim": model.hidden_size,
                               "max_length": model.max_length, "max_batch": MAX_BATCH, "pooling": model.pooling,
                               "normalize": model.normalize, "name": model.name, "storage": storage}, "encoder")
    kinds: dict[str, int] = {}
    for k in storage.values():
        kinds[k] = kinds.get(k, 0) + 1
    return {"file": fmt.MODEL_FILE, "kind": "encoder", "files": [fmt.MODEL_FILE, fmt.TOKENIZER_FILE, fmt.CONFIG_FILE],
            "deployment_target": "iOS18", "tensor_types": kinds, "package_checks": checks,
            "timings_s": {"convert_s": t_convert, "read_back_s": t_check}}
