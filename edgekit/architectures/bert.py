"""BERT-family sentence encoders (all-MiniLM-L6-v2 and any ``model_type: bert`` directory).

Kind "encoder": quality is embedding cosine, not next-token statistics. Their reading, torch reference,
quantization and ONNX / Core ML graphs live in :mod:`edgekit.encoder` and the encoder exporters.
"""

from __future__ import annotations

from edgekit.architectures.base import Architecture


class Bert(Architecture):
    name = "bert"
    kind = "encoder"
    hf_model_types = ("bert",)
    hf_class = "BertModel"
    description = "BERT sentence encoders (mean / CLS pooling), ONNX and Core ML only"

    def format_refusal(self, fmt: str, spec) -> str | None:
        if fmt == "gguf":
            return "sentence encoders export to onnx or coreml"
        return None


ARCHITECTURE = Bert()
