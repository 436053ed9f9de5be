"""Predictor facts of a Core ML package, from the ``coreml_config.json`` its exporter writes beside it.

Nothing is run (Core ML exists only on Apple systems): the exporter records bytes streamed and
parameters per storage kind, the cache shape and layer widths when it builds the package.
"""

from __future__ import annotations


from pathlib import Path

from edgekit.cache import tree_bytes
from edgekit.errors import InputError

COREML_KV_BYTES_PER_VALUE = 2  # the stateful program keeps fp16 key and value buffers


def coreml_facts(package: str | Path):
    from edgekit.formats.coreml import CONFIG
    from edgekit.targets.facts import ArtifactFacts

    package = Path(package)
    kind = CONFIG.peek_kind(package)
    if kind == "encoder":
        raise InputError(f"cannot predict for {package.name}: a Core ML encoder package records no weight table",
                         "predict from the ONNX export of the same encoder")
    cfg = CONFIG.read(package, kind)
    try:
        n_layers, _, kvh, _, hd = cfg["cache_shape"]
        return ArtifactFacts(
            format="coreml", runtime="coreml", size_bytes=tree_bytes(package), parameters=int(cfg["parameters"]),
            bytes_by_type={k.upper(): int(v) for k, v in cfg["streamed_bytes_by_kind"].items()},
            params_by_type={k.upper(): int(v) for k, v in cfg["params_by_kind"].items()},
            kv_bytes_per_token=2 * n_layers * kvh * hd * COREML_KV_BYTES_PER_VALUE,
            attn_flops_per_token_per_ctx=4 * sum(w["heads"] for w in cfg["layer_widths"]) * hd,
            vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
            extra={"kind": "decoder", "num_layers": n_layers, "tied_embeddings": cfg["tied_embeddings"],
                   "context": cfg["context"], "architecture": cfg.get("architecture", "llama")},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"cannot predict for {package.name}: {CONFIG.file} lacks {exc}",
                         "re-export the model with `edgekit convert --format coreml`") from None



