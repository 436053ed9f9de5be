"""Calibration data that generalises: text the float model writes itself, mixed with a human text.

Every data-driven pass (GPTQ, pruning saliency and recovery, low-rank whitening, ternary recovery,
QAT) fits what it sees. One text of one kind (the shipped calibration text is Python documentation)
makes them fit that kind: measured on other English prose the fit is much worse than in-domain.
Samples of the float model itself, drawn with temperature from short prompts on unrelated topics,
cover what the model actually predicts without downloading a dataset (the data-free calibration
of LLM-QAT and of GPTQ's "random tokens vs generated" ablations). They are seeded, and cached by source
hash, prompts and settings, so a conversion is repeatable and pays the generation once.

The prompts are generic openings chosen before any evaluation; they must never be taken from, or
tuned on, an evaluation text.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable

from edgekit.cache import cache_dir

# Openings on unrelated topics and registers (narrative, news, science, instructions, dialogue,
# letters, reviews, history, code, lists): the model continues each in its own words.
PROMPTS = (
    "Once upon a time, in a small village by the sea,",
    "The city council announced on Tuesday that",
    "Photosynthesis is the process by which",
    "To bake a simple loaf of bread, you will need",
    "\"Where were you last night?\" she asked.",
    "Dear Mr. Thompson,\n\nI am writing to",
    "The Roman Empire reached its greatest extent",
    "In mathematics, a prime number is",
    "def fibonacci(n):\n",
    "Here are five tips for staying productive while working from home:\n1.",
    "The main advantage of electric cars over petrol cars is",
    "Yesterday I finally visited the museum, and",
    "Climate change affects agriculture in several ways.",
    "The human heart has four chambers:",
    "Q: What is the capital of Australia?\nA:",
    "Review: I bought this blender last month and",
    "The committee shall meet at least twice a year to",
    "Machine learning models learn patterns from data by",
    "It was a cold winter morning when the train",
    "The stock market fell sharply today after",
    "Water boils at 100 degrees Celsius at sea level because",
    "My favourite childhood memory is",
    "Step 1: Remove the cover by unscrewing",
    "The theory of evolution by natural selection",
    "Ladies and gentlemen, thank you for coming tonight.",
    "In the year 1848, revolutions swept across Europe",
    "A good night's sleep is important because",
    "The spacecraft entered orbit around Mars and",
    "SELECT name, age FROM users WHERE",
    "The old lighthouse keeper had never seen",
    "According to the latest survey, most people",
    "Chapter 1\n\nThe rain had not stopped for three days.",
)


DEFAULT_TOKENS = 12288
ENV_VAR = "EDGEKIT_CALIB_GENERATED"


def default_tokens() -> int:
    """Generated calibration tokens when a conversion does not say: ``$EDGEKIT_CALIB_GENERATED`` or 12,288."""
    import os

    try:
        return max(0, int(os.environ.get(ENV_VAR, DEFAULT_TOKENS)))
    except ValueError:
        from edgekit.errors import InputError

        raise InputError(f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not a whole number of tokens", "unset it or give a number") from None


@dataclass(frozen=True)
class GenerationSettings:
    samples: int = 32
    new_tokens: int = 128
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0

    def key(self, source_sha: str) -> str:
        blob = json.dumps({"src": source_sha, "prompts": PROMPTS, **self.__dict__}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]


def settings_for(tokens: int) -> GenerationSettings:
    """Settings that write about ``tokens`` tokens: 128-token samples, as many as needed."""
    per = GenerationSettings.new_tokens
    return GenerationSettings(samples=max(1, -(-tokens // per)))


def generated_sequences(source, settings: GenerationSettings, progress: Callable[[str, int, int], None] | None = None
                        ) -> list[list[int]]:
    """Token ids of prompt + sampled continuation, one sequence per sample, from the float model of ``source``."""
    path = cache_dir("calibration") / f"{settings.key(source.sha256)}.json"
    if path.exists():
        try:
            return [list(map(int, s)) for s in json.loads(path.read_text())["sequences"]]
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            pass  # a damaged cache entry is regenerated
    sample = _llamacpp_sampler if source.gguf_file is not None else _transformers_sampler
    prompts = [PROMPTS[k % len(PROMPTS)] for k in range(settings.samples)]
    seqs = sample(source, prompts, settings, progress)
    from edgekit.atomic import write_atomic

    write_atomic(path, json.dumps({"settings": settings.__dict__, "sequences": seqs}))
    return seqs


def _llamacpp_sampler(source, prompts: list[str], s: GenerationSettings, progress) -> list[list[int]]:
    """A GGUF source is its own float model: llama.cpp samples from exactly the reference weights."""
    from edgekit.runtimes.llamacpp import LlamaCppSession

    out = []
    with LlamaCppSession(source.gguf_file, n_ctx=512) as session:
        for k, prompt in enumerate(prompts):
            ids = session.tokenize(prompt)
            out.append(ids + list(session.stream_tokens(ids, s.new_tokens, temperature=s.temperature, top_p=s.top_p,
                                                        seed=s.seed + k, ignore_eos=True)))
            if progress:
                progress("calibration text (float model samples)", k + 1, len(prompts))
    return out


def _transformers_sampler(source, prompts: list[str], s: GenerationSettings, progress) -> list[list[int]]:
    """A Hugging Face directory samples through transformers' own class of the architecture, all
    prompts in one left-padded batch."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgekit.kinds import source_tokenizer

    tokenize = source_tokenizer(source)
    model = AutoModelForCausalLM.from_pretrained(str(source.path), torch_dtype=torch.float32).eval()
    ids = [tokenize(p) or [0] for p in prompts]
    width = max(map(len, ids))
    batch = torch.tensor([[0] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    torch.manual_seed(s.seed)
    with torch.inference_mode():
        out = model.generate(batch, attention_mask=mask, do_sample=True, temperature=s.temperature, top_p=s.top_p,
                             top_k=40, max_new_tokens=s.new_tokens, min_new_tokens=s.new_tokens, pad_token_id=0)
    if progress:
        progress("calibration text (float model samples)", len(prompts), len(prompts))
    return [x + [int(t) for t in row[width:].tolist()] for x, row in zip(ids, out)]


def mix(human: list[list[int]], generated: list[list[int]]) -> list[list[int]]:
    """Interleave the two sources so that any prefix of the list (a pass that takes fewer windows) holds both."""
    out: list[list[int]] = []
    for k in range(max(len(human), len(generated))):
        if k < len(human):
            out.append(human[k])
        if k < len(generated):
            out.append(generated[k])
    return out


def describe(human_label: str, human: list[list[int]], generated: list[list[int]], settings: GenerationSettings | None
             ) -> dict[str, Any]:
    info: dict[str, Any] = {"text": human_label, "tokens": sum(map(len, human)) + sum(map(len, generated)),
                            "text_tokens": sum(map(len, human))}
    if settings is not None and generated:
        info["generated"] = {"tokens": sum(map(len, generated)), "samples": len(generated), "prompts": len(PROMPTS),
                             **settings.__dict__}
    return info
