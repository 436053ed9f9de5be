"""The ONNX artifact: what edgekit's ONNX exporter writes and ONNX Runtime sessions read.

An artifact directory holds ``model.onnx`` (+ ``model.onnx.data`` above the protobuf limit),
``tokenizer.json`` and ``onnx_config.json``. The config's ``format`` says the kind:

- ``edgekit-onnx-decoder`` version 2: inputs ``input_ids [1, S] int64, seqlens_k [1] int32,
  total_sequence_length [] int32, num_logits [] int64`` and ``past_{key,value}_{i}``; outputs
  ``logits`` and ``present_{key,value}_{i}`` (GroupQueryAttention updates a shared cache buffer).
- ``edgekit-onnx-encoder`` version 1: inputs ``input_ids``, ``attention_mask`` ([B, S] int64);
  output ``sentence_embedding`` [B, dim].
"""

from __future__ import annotations

from pathlib import Path

from edgekit.formats.config import ConfigSchema

MODEL_FILE = "model.onnx"
EXTERNAL_DATA = MODEL_FILE + ".data"
TOKENIZER_FILE = "tokenizer.json"
CONFIG = ConfigSchema("onnx_config.json", {"decoder": "edgekit-onnx-decoder", "encoder": "edgekit-onnx-encoder"},
                      {"decoder": (2,), "encoder": (1,)})
CONFIG_FILE = CONFIG.file
# protobuf cannot hold 2 GB; leave room for the graph itself
INLINE_LIMIT = 1_800_000_000

DECODER_INPUTS = ("input_ids", "seqlens_k", "total_sequence_length", "num_logits")
ENCODER_INPUTS = ("input_ids", "attention_mask")
ENCODER_OUTPUT = "sentence_embedding"


def cache_names(num_layers: int, prefix: str) -> list[str]:
    """``past_key_0, past_value_0, ...`` (prefix "past") or the ``present_*`` outputs."""
    return [f"{prefix}_{kv}_{i}" for i in range(num_layers) for kv in ("key", "value")]


def artifact_kind(model_file: Path) -> str:
    return CONFIG.peek_kind(model_file)
