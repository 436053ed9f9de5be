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

import json
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgekit.errors import EdgekitError, ValidationError

CONFIG_FILE = "coreml_config.json"
TOKENIZER_FILE = "tokenizer.json"
FORMAT = "edgekit-coreml-encoder"
INPUTS = ("input_ids", "attention_mask")
OUTPUT = "sentence_embedding"
MAX_BATCH = 64
QUANTS = ("fp16", "int8", "int4", "q4_0", "ternary")


def weight_names(model) -> list[str]:
    from edgekit.encoder import EMBEDDING

    return [EMBEDDING, *model.linear_names()]


def quantize(model, quant: str, calibration: Callable[[], list[str]], progress) -> dict[str, Any]:
    """The encoder recipes of :mod:`edgekit.encoder_quant`, plus ternary (Core ML has an exact form for it).

    Ternary here is the decoders' absmean ternarization of every layer matrix with a Q8_0 embedding:
    post-training ternary wrecks an encoder trained in float; it exists to show the format holds it.
    """
    from edgekit.encoder import EMBEDDING
    from edgekit.encoder_quant import canonical_quant, quantize_encoder

    if quant in ("ternary", "tq"):
        from edgekit.passes.rtn import quantize_q8_0
        from edgekit.passes.ternary import ternarize

        model.encodings[EMBEDDING] = quantize_q8_0(model.tensors[EMBEDDING])
        blocks = {}
        for n in model.linear_names():
            bq = ternarize(model.tensors[n])
            blocks[bq.block_size] = blocks.get(bq.block_size, 0) + 1
            model.encodings[n] = bq
        return {"pass": "ternary", "tensors": len(model.linear_names()) + 1, "embedding": "q8_0",
                "block_sizes": {str(k): v for k, v in blocks.items()}, "scale": "absmean per block (fp16)"}
    q = canonical_quant(quant)
    if q == "fp32":
        raise EdgekitError("Core ML stores float weights as fp16", "use --quant fp16 (or int8, int4, ternary)")
    return quantize_encoder(model, q, calibration, progress)


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


class CoreMLEncoderExporter:
    """Writes ``model.mlpackage`` + ``tokenizer.json`` + ``coreml_config.json`` for an encoder."""

    name = "coreml"
    filename = "model.mlpackage"
    runtime = "coreml"

    def export(self, model, out_dir: Path) -> dict[str, Any]:
        from edgekit.converters import coreml_weights as cw

        out_dir = Path(out_dir)
        reason = cw.unsupported(model, weight_names(model))
        if reason:
            raise EdgekitError(f"the coreml format cannot hold this recipe: {reason}", "choose another --quant")
        package = out_dir / self.filename
        t0 = time.perf_counter()
        convert_module(model, package)
        t_convert = time.perf_counter() - t0
        t0 = time.perf_counter()
        checks = validate_package(package, model)
        t_check = time.perf_counter() - t0
        (out_dir / TOKENIZER_FILE).write_text(model.tokenizer_json)
        storage = {n: cw.storage_kind(model, n) for n in weight_names(model)}
        config = {"format": FORMAT, "version": 1, "kind": "encoder", "inputs": list(INPUTS), "output": OUTPUT,
                  "dim": model.hidden_size, "max_length": model.max_length, "max_batch": MAX_BATCH,
                  "pooling": model.pooling, "normalize": model.normalize, "name": model.name, "storage": storage}
        (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=1))
        kinds: dict[str, int] = {}
        for k in storage.values():
            kinds[k] = kinds.get(k, 0) + 1
        return {"file": self.filename, "kind": "encoder", "files": [self.filename, TOKENIZER_FILE, CONFIG_FILE],
                "deployment_target": "iOS18", "tensor_types": kinds, "package_checks": checks,
                "timings_s": {"convert_s": t_convert, "read_back_s": t_check}}


def convert_encoder(model: str, format: str = "coreml", quant: str | None = None, out: str | Path = "out",
                    force: bool = False, eval_text: str | None = None, calib_text: str | None = None,
                    progress: Callable[[str, int, int], None] = lambda d, a, b: None,
                    log: Callable[[str], None] = lambda s: None, **ignored: Any) -> dict[str, Any]:
    """Convert an encoder to Core ML and write ``out/`` atomically (package + manifest). Returns the manifest.

    On macOS the embeddings are compared with the float reference like the ONNX encoder's; elsewhere the
    manifest records why that check did not run (the weight read-back always runs).
    """
    from edgekit.atomic import atomic_output_dir, check_output_dir
    from edgekit.converters.coreml import tree_bytes
    from edgekit.converters.onnx_encoder import read_and_compress
    from edgekit.manifest import write_manifest
    from edgekit.runtimes.coreml import unavailable_reason

    out = Path(out)
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    check_output_dir(out, force)
    quant = quant or "int8"
    if quant not in QUANTS and quant not in ("f16", "q8_0"):
        raise EdgekitError(f"no Core ML encoder recipe named '{quant}'", f"known: {', '.join(QUANTS)}")
    if ignored.get("target"):
        raise EdgekitError("--target plans are for decoders only", "drop --target and choose --quant")
    source, reference, work, record, calib_info = read_and_compress(model, quant, calib_text, quantize, timings,
                                                                    progress, log)
    exporter = CoreMLEncoderExporter()
    with atomic_output_dir(out, force) as stage:
        t0 = time.perf_counter()
        log(f"writing {exporter.filename}")
        export_info = exporter.export(work, stage)
        timings["export_s"] = time.perf_counter() - t0
        why = unavailable_reason()
        quality, validation = None, {"passed": None, "why": why}
        if why is None:  # pragma: no cover - macOS only
            from edgekit.converters.onnx_encoder import validate
            from edgekit.harness.embedding import measure_quality, read_sentences
            from edgekit.runtimes.coreml import CoreMLEncoderSession

            sentences, label = read_sentences(eval_text)
            with CoreMLEncoderSession(stage / exporter.filename) as session:
                quality = measure_quality(session, reference, source.sha256, sentences, label, progress)
            validation = validate(record["pass"], quality, exporter.filename)
        timings["total_s"] = time.perf_counter() - t_all
        manifest = {
            "artifact": {"format": "coreml", "runtime": exporter.runtime, **export_info},
            "source": source.describe(),
            "model": reference.describe(),
            "recipe": {"quant": record["pass"], "passes": [record], "calibration": calib_info or None},
            "size_bytes": tree_bytes(stage),
            "bits_per_weight": 8 * tree_bytes(stage / exporter.filename) / max(1, reference.num_parameters()),
            "quality": quality,
            "validation": validation,
            "timings_s": timings,
        }
        write_manifest(stage, manifest)
    return manifest
