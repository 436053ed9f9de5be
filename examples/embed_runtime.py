"""Embedding an exported artifact in an app: no torch, one import.

    python examples/embed_runtime.py out/smollm2-int4 "Write a haiku about the sea."
"""

import sys

import edgekit


def main() -> None:
    artifact, prompt = sys.argv[1], " ".join(sys.argv[2:]) or "Hello!"
    with edgekit.load(artifact) as model:
        # stream the reply through the model's own chat template
        for piece in model.generate(prompt, max_tokens=96, stream=True, chat=True):
            print(piece, end="", flush=True)
        print()
        # raw next-token scores, e.g. for ranking or constrained decoding
        ids = model.tokenize("The capital of France is")
        scores = model.logits(ids)[-1]
        print("most likely next token:", repr(model.detokenize([int(scores.argmax())])))


if __name__ == "__main__":
    main()
