"""The Core ML artifact: what edgekit's Core ML exporter writes and the Core ML runtime reads.

An artifact directory holds ``model.mlpackage``, ``tokenizer.json`` and ``coreml_config.json``. A
decoder (``edgekit-coreml-decoder``) is a stateful program with in-place fp16 KV buffers; an encoder
(``edgekit-coreml-encoder``) takes ``input_ids`` / ``attention_mask`` padded to fixed lengths.
"""

from __future__ import annotations

from pathlib import Path

from edgekit.formats.config import ConfigSchema

MODEL_FILE = "model.mlpackage"
TOKENIZER_FILE = "tokenizer.json"
CONFIG = ConfigSchema("coreml_config.json", {"decoder": "edgekit-coreml-decoder", "encoder": "edgekit-coreml-encoder"},
                      {"decoder": (1, 2), "encoder": (1,)})
CONFIG_FILE = CONFIG.file


def artifact_kind(model_file: Path) -> str:
    return CONFIG.peek_kind(model_file)
