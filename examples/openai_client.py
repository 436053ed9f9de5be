"""Talk to `edgekit serve` with the official OpenAI Python client: the same code works against any
OpenAI-compatible endpoint.

    edgekit serve out/smollm2-int4 out/minilm-int8 --host 127.0.0.1 --port 8000 --api-key secret
    python examples/openai_client.py --base-url http://127.0.0.1:8000/v1 --api-key secret

It lists the served models, asks one chat completion, streams a second one as it is generated,
and, when a sentence encoder is served, embeds two sentences and compares them. The chat model is
``--model`` or the first decoder listed; the encoder is ``--embedding-model`` or the first encoder
listed (edgekit's model cards say each model's kind). Needs ``pip install openai``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

try:
    import openai
    from openai import OpenAI
except ImportError:  # keep the one-line error convention even before anything runs
    print("error: this example needs the openai package. Pip install openai.", file=sys.stderr)
    sys.exit(2)


def model_kind(model) -> str | None:
    """"decoder" / "encoder" from edgekit's model card (an extra "edgekit" field), None when the
    server does not say (another OpenAI-compatible server)."""
    extra = (getattr(model, "model_extra", None) or {}).get("edgekit")
    return extra.get("kind") if isinstance(extra, dict) else None


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)) or 1.0)


def run(client: OpenAI, args: argparse.Namespace) -> None:
    # 1. what is served
    models = list(client.models.list())
    print("models:")
    for m in models:
        print(f"  {m.id}  ({model_kind(m) or 'unknown kind'}, owned by {m.owned_by})")
    chat_model = args.model or next((m.id for m in models if model_kind(m) != "encoder" and m.id != args.embedding_model), None)
    embed_model = args.embedding_model or next((m.id for m in models if model_kind(m) == "encoder"), None)

    messages = [{"role": "user", "content": args.prompt}]
    if chat_model is None:
        print("no decoder is served: skipping the chat completions")
    else:
        # 2. one chat completion, answered in full
        done = client.chat.completions.create(model=chat_model, messages=messages, max_tokens=args.max_tokens,
                                              temperature=args.temperature)
        choice = done.choices[0]
        print(f"\nchat ({chat_model}):")
        print(f"  {choice.message.content!r}")
        if done.usage is not None:
            print(f"  finish_reason={choice.finish_reason} prompt_tokens={done.usage.prompt_tokens} "
                  f"completion_tokens={done.usage.completion_tokens}")

        # 3. the same request streamed: the text arrives in deltas as the model generates it
        print(f"\nstreamed chat ({chat_model}):")
        print("  ", end="", flush=True)
        deltas = 0
        stream = client.chat.completions.create(model=chat_model, messages=messages, max_tokens=args.max_tokens,
                                                temperature=args.temperature, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
                deltas += 1
        print(f"\n  ({deltas} deltas)")

    # 4. embeddings, when an encoder is served
    if embed_model is None:
        print("\nno sentence encoder is served: skipping embeddings")
        return
    texts = ["The cat sat on the mat.", "A cat was sitting on a rug."]
    resp = client.embeddings.create(model=embed_model, input=texts)
    vectors = [d.embedding for d in sorted(resp.data, key=lambda d: d.index)]
    print(f"\nembeddings ({embed_model}): {len(vectors)} vectors of {len(vectors[0])} dimensions")
    print(f"  cosine({texts[0]!r}, {texts[1]!r}) = {cosine(vectors[0], vectors[1]):.4f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Use an `edgekit serve` endpoint through the OpenAI Python client.")
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server's /v1 URL")
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "none"),
                    help="the key the server was started with (default $OPENAI_API_KEY; any text when it has none)")
    ap.add_argument("--model", help="the chat model (default: the first decoder served)")
    ap.add_argument("--embedding-model", help="the encoder to embed with (default: the first encoder served)")
    ap.add_argument("--prompt", default="Write one sentence about the sea.")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.0)
    args = ap.parse_args(argv)

    # max_retries=0: fail at once with the server's own message instead of retrying for seconds
    client = OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=120)
    try:
        run(client, args)
    except openai.APIStatusError as exc:  # the server answered with an error: 401, 404, 429, ...
        body = exc.body if isinstance(exc.body, dict) else {}
        detail = body.get("message") or (body.get("error") or {}).get("message") or exc.message
        print(f"error: {exc.status_code} from {args.base_url}: {' '.join(str(detail).split())}", file=sys.stderr)
        return 2
    except openai.APIConnectionError as exc:
        print(f"error: cannot reach {args.base_url} ({type(exc).__name__}). Start it with `edgekit serve ARTIFACT`.",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
