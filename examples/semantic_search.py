"""Semantic search over a text file with an exported sentence encoder: no torch, no vector database.

    edgekit convert minilm -f onnx -q int8 -o out/minilm-int8
    python examples/semantic_search.py out/minilm-int8 notes.txt "how do I reset my password"
    python examples/semantic_search.py out/minilm-int8 notes.txt "billing" --top-k 3

Every non-empty line of the file is one document. Documents and query are embedded by the same
encoder; the lines whose vectors point closest to the query's (cosine similarity, 1.0 = same
direction) are printed best first with their scores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

import edgekit


def read_documents(path: str) -> list[tuple[int, str]]:
    """(line number, text) of every non-empty line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise edgekit.EdgekitError(f"cannot read {path} ({type(exc).__name__})",
                                   "pass a UTF-8 text file, one document a line") from None
    docs = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not docs:
        raise edgekit.EdgekitError(f"{path} has no non-empty lines", "put one document on each line")
    return docs


def unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1, so a dot product is the cosine. edgekit's encoders already return unit
    vectors when exported with normalization (the default); normalizing again is cheap and makes the
    scores cosines for any encoder."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def search(encoder, docs: list[str], query: str, top_k: int) -> list[tuple[int, float]]:
    """(index into docs, cosine) of the ``top_k`` best matches, best first."""
    doc_vecs = unit(encoder.embed(docs))  # float32 [n_docs, dim]; batched and length-sorted inside
    query_vec = unit(encoder.embed([query]))[0]
    scores = doc_vecs @ query_vec
    best = np.argsort(-scores, kind="stable")[:top_k]
    return [(int(i), float(scores[i])) for i in best]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Rank the lines of a text file by meaning against a query.")
    ap.add_argument("artifact", help="a sentence-encoder artifact (e.g. `edgekit convert minilm -f onnx -q int8`)")
    ap.add_argument("docs", help="a text file: one document per line")
    ap.add_argument("query", help="what to look for")
    ap.add_argument("--top-k", type=int, default=5, help="how many lines to print (default 5)")
    args = ap.parse_args(argv)
    if args.top_k < 1:
        ap.error("--top-k must be at least 1")

    try:
        docs = read_documents(args.docs)
        with edgekit.load(args.artifact) as encoder:
            if not hasattr(encoder, "embed"):
                raise edgekit.EdgekitError(f"{args.artifact} is a text generator, not a sentence encoder",
                                           "pass an encoder artifact, e.g. one from `edgekit convert minilm -f onnx`")
            hits = search(encoder, [text for _, text in docs], args.query, args.top_k)
    except edgekit.EdgekitError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return 2

    print(f"top {len(hits)} of {len(docs)} lines for {args.query!r}:")
    for rank, (i, score) in enumerate(hits, 1):
        line_no, text = docs[i]
        print(f"{rank:>3}  {score:7.4f}  line {line_no}: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
