"""What depends on a model's kind in the conversion pipeline: calibration data, the quality metric,
and the export-time check. Looked up once, from the architecture's kind (decoder or encoder).

- Decoders: calibration windows of the source tokenizer's ids; quality is perplexity, KL divergence
  and top-1 agreement of next-token distributions against the float reference; the artifact must
  tokenize exactly like the source.
- Encoders: calibration sentences (one unpadded text per forward pass); quality is the cosine between
  the artifact's sentence embeddings and the float reference's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from edgekit.errors import EdgekitError, InputError, ValidationError
from edgekit.harness.quality import EvalConfig, read_text

# after structural passes: |KLD(artifact) - KLD(torch, same numbers)| <= ABS + REL * KLD(torch)
CONSISTENCY_ABS, CONSISTENCY_REL = 0.03, 0.15
# an encoder artifact against the same compressed encoder computed in torch (cosine distance)
ENCODER_CONSISTENCY = {"cosine_distance_mean": 1e-3, "cosine_distance_worst": 1e-2}


@dataclass
class Texts:
    """The evaluation and calibration texts of one conversion, read once."""

    eval_text: str | None
    calib_text: str | None
    calib_tokens: int = 4096
    eval_tokens: int = 4096
    # tokens of text the float model writes itself, mixed into the calibration set (0: the text alone)
    calib_generated: int = field(default_factory=lambda: _default_generated())
    calibration_info: dict[str, Any] = field(default_factory=dict)


def _default_generated() -> int:
    from edgekit.calibration import default_tokens

    return default_tokens()


class DecoderKind:
    name = "decoder"

    def __init__(self, source, texts: Texts):
        self.source, self.texts = source, texts
        self.tokenize = source_tokenizer(source)
        self.eval_body, self.eval_label = read_text(texts.eval_text, "eval")

    def calibration(self, reference, progress=None) -> list[list[int]]:
        """Windows of the calibration text (the user's, or the shipped one) interleaved with samples
        the float model writes itself (:mod:`edgekit.calibration`)."""
        from edgekit import calibration as cal

        body, label = read_text(self.texts.calib_text, "calibration")
        ids = self.tokenize(body)[: self.texts.calib_tokens]
        ctx = 512
        seqs = [ids[i : i + ctx] for i in range(0, len(ids), ctx) if len(ids[i : i + ctx]) >= 32]
        settings = cal.settings_for(self.texts.calib_generated) if self.texts.calib_generated > 0 else None
        generated = cal.generated_sequences(self.source, settings, progress) if settings else []
        self.texts.calibration_info.update(cal.describe(label, seqs, generated, settings))
        return cal.mix(seqs, generated)

    def torch_quality(self, model, reference, progress) -> dict[str, Any]:
        """Quality of ``model`` as the passes left it (dequantized weights), computed in torch."""
        from edgekit.architectures.torch_decoder import TorchSession
        from edgekit.evaluate import measure_quality

        q = measure_quality(TorchSession(model, self.tokenize), reference, self.source.sha256, self.eval_body,
                            self.eval_label, EvalConfig(max_tokens=self.texts.eval_tokens), progress)
        return {k: q[k] for k in ("ppl", "ref_ppl", "kld_mean", "kld_p99", "top1_agreement") if k in q}

    def check_session(self, session, artifact: str) -> None:
        """The artifact must tokenize exactly like its source, or every quality figure would be meaningless."""
        got, want = session.tokenize(self.eval_body), self.tokenize(self.eval_body)
        if got != want:
            first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise ValidationError(artifact, "tokenization of the evaluation text: first differing token at", first, 0,
                                  f"{len(got)} tokens vs {len(want)} from the source tokenizer")

    def quality(self, session, reference, progress) -> dict[str, Any]:
        from edgekit.evaluate import measure_quality

        return measure_quality(session, reference, self.source.sha256, self.eval_body, self.eval_label,
                               EvalConfig(max_tokens=self.texts.eval_tokens), progress)

    def validate(self, quality: dict[str, Any], tolerance: dict[str, float], artifact: str,
                 expected: dict[str, Any] | None = None) -> dict[str, Any]:
        """The artifact must compute what the passes decided.

        A storage pass alone: the artifact against the float reference under the pass's tolerance.
        After pruning / low-rank / ternary the model is meant to differ from the reference, so the
        artifact's KLD must instead match the KLD of the same compressed model computed in torch
        (``expected``): a packing error shows up as a gap between the two.
        """
        if expected is not None:
            gap = abs(quality["kld_mean"] - expected["kld_mean"])
            tol = CONSISTENCY_ABS + CONSISTENCY_REL * expected["kld_mean"]
            if gap > tol:
                raise ValidationError(artifact, "logits: |mean KLD of the artifact - mean KLD of the compressed model in torch|",
                                      gap, tol, f"artifact {quality['kld_mean']:.4f} vs torch {expected['kld_mean']:.4f}")
            return {"passed": True, "criterion": "consistency with the compressed model computed in torch",
                    "kld_gap": gap, "tolerance": {"kld_gap": tol}}
        tol = {"kld_mean": tolerance["kld_mean"]}
        if quality["kld_mean"] > tol["kld_mean"]:
            raise ValidationError(artifact, "logits: mean KL divergence from the reference", quality["kld_mean"], tol["kld_mean"],
                                  f"p99 {quality['kld_p99']:.3g}, top-1 agreement {quality['top1_agreement']:.1%}")
        return {"passed": True, "tolerance": tol}


class EncoderKind:
    name = "encoder"

    def __init__(self, source, texts: Texts):
        from edgekit.harness.embedding import read_sentences

        self.source, self.texts = source, texts
        self.sentences, self.eval_label = read_sentences(texts.eval_text)

    def calibration_texts(self, limit: int = 256) -> list[str]:
        """Sentence-sized pieces of the calibration text (default: the shipped one, disjoint from the eval set)."""
        text, label = read_text(self.texts.calib_text, "calibration")
        pieces = [" ".join(p.split()) for p in re.split(r"(?<=[.!?])\s+|\n\s*\n", text)]
        texts = [p for p in pieces if 20 <= len(p) <= 600][:limit]
        self.texts.calibration_info.update({"text": label, "sentences": len(texts)})
        return texts

    def calibration(self, reference, progress=None) -> list[list[int]]:
        return reference.calibration_sequences(self.calibration_texts())

    def torch_quality(self, model, reference, progress) -> dict[str, Any]:
        """Embedding cosine of ``model`` as the passes left it, computed in torch, against the float reference."""
        from edgekit.encoder import EncoderReference
        from edgekit.harness.embedding import compare, reference_embeddings

        got = EncoderReference(model, effective=True).embed(self.sentences)
        return compare(got, reference_embeddings(reference, self.source.sha256, self.sentences, progress), self.eval_label)

    def check_session(self, session, artifact: str) -> None:
        if not hasattr(session, "embed"):
            raise ValidationError(artifact, "the artifact opens as a decoder, not an encoder", 1, 0, "re-export it")

    def quality(self, session, reference, progress) -> dict[str, Any]:
        from edgekit.harness.embedding import measure_quality

        return measure_quality(session, reference, self.source.sha256, self.sentences, self.eval_label, progress)

    def validate(self, quality: dict[str, Any], tolerance: dict[str, float], artifact: str,
                 expected: dict[str, Any] | None = None) -> dict[str, Any]:
        """Cosine distance (1 - cos) from the float reference, mean and worst sentence, within the pass's
        tolerance; where the pass declares none (ternary), the artifact must match the same compressed
        encoder computed in torch."""
        if expected is not None or "cosine_distance_mean" not in tolerance:
            if expected is None:
                raise EdgekitError("this recipe declares no encoder tolerance and was not measured in torch",
                                   "report this as a bug")
            gap_mean = abs(quality["cosine_mean"] - expected["cosine_mean"])
            gap_worst = abs(quality["cosine_min"] - expected["cosine_min"])
            tol = ENCODER_CONSISTENCY
            for gap, key in ((gap_mean, "cosine_distance_mean"), (gap_worst, "cosine_distance_worst")):
                if gap > tol[key]:
                    raise ValidationError(artifact, f"embedding cosine: |artifact - compressed model in torch| ({key})",
                                          gap, tol[key], f"artifact {quality['cosine_mean']:.4f} vs torch {expected['cosine_mean']:.4f}")
            return {"passed": True, "criterion": "consistency with the compressed model computed in torch",
                    "cosine_gap": gap_mean, "tolerance": dict(tol)}
        mean_d, worst_d = 1.0 - quality["cosine_mean"], 1.0 - quality["cosine_min"]
        tol = {k: tolerance[k] for k in ("cosine_distance_mean", "cosine_distance_worst")}
        if mean_d > tol["cosine_distance_mean"]:
            raise ValidationError(artifact, "sentence_embedding: mean cosine distance (1 - cos) from the float reference",
                                  mean_d, tol["cosine_distance_mean"],
                                  f"cosine mean {quality['cosine_mean']:.4f} over {quality['sentences']} sentences")
        if worst_d > tol["cosine_distance_worst"]:
            raise ValidationError(artifact, "sentence_embedding: worst cosine distance (1 - cos) from the float reference",
                                  worst_d, tol["cosine_distance_worst"],
                                  f"cosine min {quality['cosine_min']:.4f}, sentence #{quality['worst_index']}")
        return {"passed": True, "tolerance": tol}


KINDS: dict[str, Callable[..., Any]] = {"decoder": DecoderKind, "encoder": EncoderKind}


def source_tokenizer(source) -> Callable[[str], list[int]]:
    """A decoder source's own tokenizer, for calibration text and for checking the artifact's tokenizer."""
    if source.gguf_file is not None:
        from edgekit.runtimes.llamacpp import LlamaCppSession

        return LlamaCppSession(source.gguf_file, vocab_only=True).tokenize
    from tokenizers import Tokenizer

    try:
        if (source.path / "tokenizer.json").exists():
            tok = Tokenizer.from_file(str(source.path / "tokenizer.json"))
        else:  # only a SentencePiece tokenizer.model: transformers builds the fast tokenizer from it
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(source.path), use_fast=True).backend_tokenizer
    except Exception as exc:  # tokenizers reports what is wrong with the file, as a plain Exception
        why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise InputError(f"the tokenizer of {source.path} cannot be read ({why})", "re-save it with transformers") from None
    return lambda text: tok.encode(text, add_special_tokens=False).ids
