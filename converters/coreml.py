"""Core ML exporter: an ML program (.mlpackage) decoder with a stateful KV cache and edgekit's own weights.

Every decoder architecture (Llama, Mistral, Qwen2, Qwen3, Gemma 3, Phi-3) goes the same way, because
the module traced is :class:`~edgekit.architectures.torch_decoder.DecoderNet`, edgekit's one torch
decoder, in its stateful mode. Steps:

1. ``torch.jit.trace`` of ``DecoderNet(model, cache_len=ctx)`` (float32 weights, fp16 cache buffers;
   see :mod:`edgekit.converters.coreml_torch` for the contract) and ``coremltools.convert`` to an ML
   program for iOS 18 / macOS 15 (the first target with states and block-wise compression), compute
   precision fp16, with the inputs, states and output that contract names.
2. The pass in :mod:`edgekit.converters.coreml_weights`, at the end of the conversion's pipeline,
   replaces every tensor by the encoding's integers and fp16 scales (int4 / int8 block-wise
   shift-scale, ternary as a 2-bit lookup table, fp16 as is; norms and biases fp16).
3. Validation that runs on any OS: the saved package is read back (spec + MIL program), the inputs /
   states / output are the ones :mod:`edgekit.runtimes.coreml` uses, the program has the expected
   structure (one attention op per layer, every state updated by every layer, one linear per matrix,
   each tensor's const used by the ops its role needs), every tensor is stored as the recipe says,
   and its numbers equal edgekit's bit for bit; otherwise :class:`ValidationError` and nothing is
   written. Logits need Core ML's runtime, which exists only on macOS.

``tokenizer.json`` and ``coreml_config.json`` (architecture, shapes, per-layer widths and windows,
special tokens, chat template, what each tensor is stored as, and the bytes per storage type the
predictor needs) sit next to the package.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.architectures import layout as L
from edgekit.contracts import Capabilities, Exporter
from edgekit.formats import coreml as fmt
from edgekit.errors import EdgekitError, ValidationError
from edgekit.model import BlockQuant, Model

DEFAULT_CONTEXT = 2048  # KV-cache length; the state is allocated at this size on the device
DEPLOYMENT_TARGET = "iOS18"
INPUTS = ("inputIds", "causalMask")
OUTPUTS = ("logits",)
STATES = ("keyCache", "valueCache")  # as DecoderNet names its cache buffers
# config version 2 (formats/coreml.py): any architecture ("architecture", "layer_windows"); the interface is version 1's


def _quiet_coremltools():
    """Import coremltools without its version warnings (torch 2.13 is newer than it was tested with)."""
    import logging

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("coremltools").setLevel(logging.ERROR)
        try:
            import coremltools as ct
        except ImportError:
            from edgekit.errors import MissingDependencyError

            raise MissingDependencyError("the Core ML exporter needs coremltools", "pip install coremltools==9.0") from None
    return ct


def _fix_int_op() -> None:
    """numpy >= 2.4 refuses ``int()`` of a one-element array, which coremltools 9.0's torch ``int`` op does
    on folded sizes; re-register that op with ``.item()`` (same semantics)."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch import ops as torch_ops
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY, register_torch_op

    if getattr(_fix_int_op, "done", False):
        return
    original = _TORCH_OPS_REGISTRY.get_func("int")

    def _int(context, node):
        inputs = torch_ops._get_inputs(context, node, expected=1)
        x = inputs[0]
        if x.can_be_folded_to_const():
            context.add(mb.const(val=int(np.asarray(x.val).reshape(-1)[0]), name=node.name), node.name)
            return
        original(context, node)

    register_torch_op(_int, torch_alias=["int"], override=True)
    _fix_int_op.done = True


def meta(tok: dict[str, Any], key: str, default: Any = None) -> Any:
    kv = tok.get(key)
    return kv["value"] if kv else default


def weight_bytes(model: Model) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """(bytes stored, bytes streamed per decoded token, matmul parameters), per storage kind."""
    from edgekit.converters.coreml_weights import storage_kind

    stored: dict[str, int] = {}
    streamed: dict[str, int] = {}
    params: dict[str, int] = {}
    s = model.spec
    for name in model.tensor_order():
        t = model.tensors[name]
        if t.ndim != 2:
            kind, n = "fp16", t.size * 2
        else:
            kind = storage_kind(model, name)
            enc = model.encoding(name)
            blocks = t.size // enc.block_size if isinstance(enc, BlockQuant) else 0
            n = {"int4": t.size // 2 + 2 * blocks, "int8": t.size + 2 * blocks, "lut2": t.size // 4 + 8 * blocks}.get(kind, 2 * t.size)
            params[kind] = params.get(kind, 0) + t.size
        stored[kind] = stored.get(kind, 0) + n
        # an untied input embedding is gathered (one row per token), not streamed
        if not (name == L.EMBED and not s.tie_word_embeddings):
            streamed[kind] = streamed.get(kind, 0) + n
    return stored, streamed, params


def runtime_config(model: Model, ctx: int, cache: tuple[int, ...]) -> dict[str, Any]:
    """``coreml_config.json``: what :mod:`edgekit.runtimes.coreml` and the predictor read (no architecture
    knowledge is needed to run the package: the program holds it all)."""
    from edgekit.converters.coreml_torch import weight_names
    from edgekit.converters.coreml_weights import storage_kind

    s = model.spec
    tok = model.tokenizer
    tokens = meta(tok, "tokenizer.ggml.tokens", [])
    types = meta(tok, "tokenizer.ggml.token_type", [])
    bos, eos = meta(tok, "tokenizer.ggml.bos_token_id"), meta(tok, "tokenizer.ggml.eos_token_id")
    stored, streamed, params = weight_bytes(model)
    return {
        "architecture": s.arch,
        "context": ctx, "cache_shape": list(cache), "num_layers": s.num_layers, "head_dim": s.head_dim,
        "vocab_size": s.vocab_size, "hidden_size": s.hidden_size, "num_heads": s.num_heads,
        "num_kv_heads": s.num_kv_heads, "max_position": s.max_position,
        "layer_widths": [model.layer_widths(i) for i in range(s.num_layers)],
        # keys each layer attends to (None: all); applied inside the program, the runtime's mask is causal
        "layer_windows": [s.window(i) for i in range(s.num_layers)],
        "tied_embeddings": s.tie_word_embeddings, "parameters": model.num_parameters(),
        "bos_token_id": bos, "eos_token_id": eos,
        "bos_token": tokens[bos] if bos is not None and bos < len(tokens) else "",
        "eos_token": tokens[eos] if eos is not None and eos < len(tokens) else "",
        "control_token_ids": [i for i, t in enumerate(types) if t == 3],
        "chat_template": meta(tok, "tokenizer.chat_template"),
        "inputs": list(INPUTS), "outputs": list(OUTPUTS), "states": list(STATES),
        "storage": {n: storage_kind(model, n) for n in weight_names(model)},
        "bytes_by_kind": stored, "streamed_bytes_by_kind": streamed, "params_by_kind": params,
    }


def convert_decoder(model: Model, ctx: int, package: Path) -> dict[str, Any]:
    """Trace, convert with the packing pass, save ``package``; returns what the packing found."""
    from edgekit.converters import coreml_torch as ctorch
    from edgekit.converters import coreml_weights as cw

    ct = _quiet_coremltools()
    _fix_int_op()
    traced = ctorch.trace(ctorch.stateful_net(model, ctx))
    shape = ctorch.cache_shape(model, ctx)
    q, t = ct.RangeDim(1, ctx), ct.RangeDim(1, ctx)
    with cw.packing(model, cw.by_param_name(ctorch.weight_names(model))) as job, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlmodel = ct.convert(
            traced,
            inputs=[ct.TensorType(name="inputIds", shape=(1, q), dtype=np.int32),
                    ct.TensorType(name="causalMask", shape=(1, 1, q, t), dtype=np.float16)],
            outputs=[ct.TensorType(name="logits", dtype=np.float16)],
            states=[ct.StateType(wrapped_type=ct.TensorType(shape=shape, dtype=np.float16), name=n) for n in ctorch.STATES],
            minimum_deployment_target=ct.target.iOS18, convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16, pass_pipeline=cw.pipeline(keep_names=True), skip_model_load=True)
    mlmodel.short_description = f"edgekit Core ML export of {model.name}"
    mlmodel.save(str(package))
    return {"found": job["found"], "cache_shape": shape}


def program_structure(prog) -> dict[str, int]:
    """Op counts of the main function (what the tests assert on)."""
    from edgekit.converters.coreml_weights import _ops

    counts: dict[str, int] = {}
    for op in _ops(prog):
        counts[op.op_type] = counts.get(op.op_type, 0) + 1
    return dict(sorted(counts.items()))


def interface(spec) -> dict[str, Any]:
    """Inputs, outputs and states as the package's spec declares them."""
    from coremltools.proto import FeatureTypes_pb2 as ft

    def arr(feature):
        which = feature.type.WhichOneof("Type")
        if which == "stateType":
            a = feature.type.stateType.arrayType
        elif which == "multiArrayType":
            a = feature.type.multiArrayType
        else:
            return {"type": which}
        return {"type": which, "dtype": ft.ArrayFeatureType.ArrayDataType.Name(a.dataType), "shape": list(a.shape),
                "ranges": [[r.lowerBound, r.upperBound] for r in a.shapeRange.sizeRanges]}

    d = spec.description
    return {"inputs": {f.name: arr(f) for f in d.input}, "outputs": {f.name: arr(f) for f in d.output},
            "states": {f.name: arr(f) for f in d.state}}


def check_interface(io: dict[str, Any], ctx: int, cache: tuple[int, ...]) -> list[str]:
    """What differs from the contract :mod:`edgekit.runtimes.coreml` relies on (empty when nothing)."""
    bad = []
    want_in = {"inputIds": "INT32", "causalMask": "FLOAT16"}
    for name, dtype in want_in.items():
        got = io["inputs"].get(name)
        if got is None or got["dtype"] != dtype:
            bad.append(f"input {name}: {got} (want {dtype})")
        elif [ctx] not in [[r[1]] for r in got["ranges"]]:
            bad.append(f"input {name}: ranges {got['ranges']} do not reach the context {ctx}")
    if set(io["outputs"]) != set(OUTPUTS):
        bad.append(f"outputs {sorted(io['outputs'])} (want {list(OUTPUTS)})")
    for name in STATES:
        got = io["states"].get(name)
        if got is None or got["dtype"] != "FLOAT16" or tuple(got["shape"]) != tuple(cache):
            bad.append(f"state {name}: {got} (want FLOAT16 {list(cache)})")
    return bad


# the ops a tensor's const may feed, by what the tensor is (a matrix feeds linear, the embedding gather)
_USERS = {"matrix": {"linear"}, "embedding": {"gather", "linear"}, "norm": {"mul"}, "bias": {"add"}}


def _role(model: Model, name: str) -> str:
    if name == L.EMBED:
        return "embedding"
    if model.tensors[name].ndim == 2:
        return "matrix"
    return "bias" if name.endswith(".bias") else "norm"


def identity_tensors(model: Model) -> list[str]:
    """1-D tensors that change nothing (norm multipliers all 1, biases all 0, in fp16): coremltools' no-op
    elimination removes the ``mul`` / ``add`` that uses them, so the package may hold no const for them."""
    from edgekit.converters.coreml_torch import weight_names

    out = []
    for n in weight_names(model):
        role = _role(model, n)
        if role in ("norm", "bias"):
            v = model.tensors[n].astype(np.float16)
            if np.all(v == (1 if role == "norm" else 0)):
                out.append(n)
    return out


def check_structure(prog, model: Model) -> list[str]:
    """What differs from the program the traced DecoderNet must give (empty when nothing): one fused
    attention op per layer, both states read and written by every layer, one ``linear`` per matrix
    use, and every tensor's const used (only) by the ops its role needs."""
    from edgekit.converters.coreml_torch import weight_names
    from edgekit.converters.coreml_weights import _ops, const_name

    s = model.spec
    counts = program_structure(prog)
    bad = []
    want = {"scaled_dot_product_attention": s.num_layers, "coreml_update_state": len(STATES) * s.num_layers,
            # the head is the embedding's const when tied; an untied embedding is only gathered
            "linear": len([n for n in model.linear_names() if n != L.EMBED]) + (L.output_head(s) == L.EMBED),
            "gather": None, "read_state": None}
    for op_type, n in want.items():
        got = counts.get(op_type, 0)
        if (n is None and got < 1) or (n is not None and got != n):
            bad.append(f"{got} {op_type} ops (want {n if n is not None else 'at least 1'})")
    by_name = {op.name: op for op in _ops(prog)}
    for n in weight_names(model):
        op = by_name.get(const_name(n))
        if op is None:
            continue  # the read-back names it
        users = {c.op_type for c in op.outputs[0].child_ops}
        allowed = _USERS[_role(model, n)]
        if not users or not users <= allowed:
            bad.append(f"{n}: used by {sorted(users) or 'nothing'} (want {sorted(allowed)})")
    return bad


def validate_package(package: Path, model: Model, ctx: int, cache: tuple[int, ...]) -> dict[str, Any]:
    """Read the saved package back and check it as far as Linux allows; raises ValidationError."""
    from edgekit.converters import coreml_weights as cw
    from edgekit.converters.coreml_torch import weight_names

    prog, spec = cw.load_program(package)
    io = interface(spec)
    bad_io = check_interface(io, ctx, cache)
    if bad_io:
        raise ValidationError(package.name, "inputs/outputs/states differing from the runtime's contract", len(bad_io), 0,
                              "; ".join(bad_io[:3]))
    # a no-op tensor may be gone with the op that used it: the program computes exactly edgekit's numbers
    # without it; every other tensor must be there, bit for bit
    identity = identity_tensors(model)
    present = cw.read_back(prog, identity)
    elided = [n for n in identity if n not in present]
    weights = cw.require_bit_exact(package.name, prog, model, [n for n in weight_names(model) if n not in elided])
    weights["elided_identity"] = elided
    bad_ops = check_structure(prog, model)
    if bad_ops:
        raise ValidationError(package.name, "program structure differing from the traced decoder's", len(bad_ops), 0,
                              "; ".join(bad_ops[:3]))
    return {"interface": io, "weights": weights, "op_counts": program_structure(prog),
            "spec_version": spec.specificationVersion}


class CoreMLExporter(Exporter):
    """Writes ``model.mlpackage`` (+ ``tokenizer.json``, ``coreml_config.json``) for Core ML: a stateful
    decoder, or a sentence encoder (:mod:`edgekit.converters.coreml_encoder`)."""

    name = "coreml"
    filename = fmt.MODEL_FILE
    runtime = "coreml"
    # pruned layers keep their own widths (every shape is read from the tensors); a factor pair is two linear ops
    capabilities = Capabilities(kinds=frozenset({"decoder", "encoder"}), bits=frozenset({2, 4, 8}), lowrank=True,
                                # 2-bit blocks are lookup tables here (4 fp16 entries per 32: 4 bits a weight)
                                mixed_bits=frozenset({4, 8}),
                                per_layer_widths=True)

    def __init__(self, context: int | None = None):
        self.context = context

    def supports(self, model) -> str | None:
        """None when this exporter can pack ``model``, otherwise the reason it cannot."""
        reason = super().supports(model)
        if reason or model.kind == "encoder":
            from edgekit.converters.coreml_encoder import unsupported as encoder_unsupported

            return reason or encoder_unsupported(model)
        from edgekit import architectures
        from edgekit.converters.coreml_weights import unsupported

        return architectures.of(model.spec).format_refusal(self.name, model.spec) or unsupported(model)

    def export(self, model, out_dir: Path) -> dict[str, Any]:
        from edgekit.tokenizer_convert import gguf_to_hf_tokenizer

        out_dir = Path(out_dir)
        reason = self.supports(model)
        if reason:
            raise EdgekitError(f"the coreml format cannot hold this recipe: {reason}", "choose another --format")
        if model.kind == "encoder":
            from edgekit.converters.coreml_encoder import export_encoder

            return export_encoder(model, out_dir)
        ctx = int(self.context or min(model.spec.max_position, DEFAULT_CONTEXT))
        package = out_dir / self.filename
        t0 = time.perf_counter()
        made = convert_decoder(model, ctx, package)
        t_convert = time.perf_counter() - t0
        t0 = time.perf_counter()
        checks = validate_package(package, model, ctx, made["cache_shape"])
        t_check = time.perf_counter() - t0
        gguf_to_hf_tokenizer(model.tokenizer).save(str(out_dir / fmt.TOKENIZER_FILE))
        config = runtime_config(model, ctx, made["cache_shape"])
        fmt.CONFIG.write(out_dir, config, "decoder")
        kinds: dict[str, int] = {}
        for kind in config["storage"].values():
            kinds[kind] = kinds.get(kind, 0) + 1
        return {"file": self.filename, "kind": "decoder", "files": [self.filename, fmt.TOKENIZER_FILE, fmt.CONFIG_FILE],
                "deployment_target": DEPLOYMENT_TARGET, "context": ctx, "tensor_types": kinds,
                "package_checks": checks, "timings_s": {"convert_s": t_convert, "read_back_s": t_check}}
