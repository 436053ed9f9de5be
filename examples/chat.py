"""An interactive chat in the terminal over an exported artifact: no torch, no server.

    python examples/chat.py out/smollm2-int4
    python examples/chat.py out/smollm2-int4 --temperature 0.7 --max-tokens 256 --system "Answer briefly."
    printf 'Hello!\\nTell me more.\\n/quit\\n' | python examples/chat.py out/smollm2-int4   # scripted

The conversation is kept as OpenAI-style messages ({"role": ..., "content": ...}) and rendered
each turn with the artifact's own chat template, so the model sees exactly the format it was
trained on. Type /reset to start over, /quit (or end the input) to leave. When the history no
longer fits the model's context, the oldest turns are dropped.
"""

from __future__ import annotations

import argparse
import sys
import time

import edgekit

HELP = "commands: /reset clears the conversation, /quit leaves"


def prompt_ids(session, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the whole conversation, rendered by the artifact's chat template.

    ``special=True``: the template's control tokens (e.g. ``<|im_start|>``) are read as the single
    tokens they are, not as plain text."""
    return session.tokenize(session.chat_prompt(messages), special=True)


def fit_history(session, messages: list[dict[str, str]], max_tokens: int) -> tuple[list[int], int]:
    """Drop the oldest exchanges until the prompt plus the reply fits the context.

    System messages are kept; the newest user message always stays. Returns (prompt ids, number of
    messages dropped); raises when even the newest message alone does not fit."""
    dropped = 0
    while True:
        ids = prompt_ids(session, messages)
        if len(ids) + max_tokens <= session.n_ctx:
            return ids, dropped
        # the oldest non-system message, unless it is the one we are answering
        oldest = next((i for i, m in enumerate(messages[:-1]) if m["role"] != "system"), None)
        if oldest is None:
            raise edgekit.EdgekitError(
                f"the message is {len(ids)} tokens; with --max-tokens {max_tokens} it exceeds the context of {session.n_ctx}",
                "send a shorter message, lower --max-tokens or raise --n-ctx")
        # drop a whole exchange (a user message and the reply to it): templates expect turns to alternate
        end = oldest + 1
        if messages[oldest]["role"] == "user" and end < len(messages) - 1 and messages[end]["role"] == "assistant":
            end += 1
        del messages[oldest:end]
        dropped += end - oldest


def reply(session, ids: list[int], max_tokens: int, temperature: float) -> tuple[str, int, float]:
    """Stream the assistant's answer to the terminal; returns (text, tokens, seconds)."""
    count = 0

    def counted(tokens):
        nonlocal count
        for tok in tokens:
            count += 1
            yield tok

    t0 = time.perf_counter()
    pieces = []
    # decode_stream turns token ids into text incrementally: a token can end mid UTF-8 character
    for piece in session.decode_stream(counted(session.stream_tokens(ids, max_tokens, temperature))):
        print(piece, end="", flush=True)
        pieces.append(piece)
    print()
    return "".join(pieces), count, time.perf_counter() - t0


def chat(session, args: argparse.Namespace) -> None:
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    while True:
        try:
            line = input("you> ")
        except EOFError:  # end of piped input, or Ctrl-D
            print()
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return
        if text == "/reset":
            messages = list(system)
            print("(conversation cleared)")
            continue
        if text.startswith("/"):
            print(f"(unknown command {text.split()[0]}; {HELP})")
            continue

        messages.append({"role": "user", "content": text})
        try:
            ids, dropped = fit_history(session, messages, args.max_tokens)
        except edgekit.EdgekitError as exc:
            messages.pop()  # forget the message that cannot be answered, keep chatting
            print(f"error: {exc.one_line()}", file=sys.stderr)
            continue
        if dropped:
            print(f"(trimmed {dropped} old message{'s' * (dropped != 1)} to fit the context of {session.n_ctx} tokens)",
                  file=sys.stderr)
        print("assistant> ", end="", flush=True)
        answer, n, secs = reply(session, ids, args.max_tokens, args.temperature)
        messages.append({"role": "assistant", "content": answer})
        if args.stats:
            print(f"[prompt {len(ids)} tokens, reply {n} tokens, {n / max(secs, 1e-9):.1f} tok/s]", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Chat with an exported model in the terminal.", epilog=HELP)
    ap.add_argument("artifact", help="artifact directory written by `edgekit convert`, or a model file")
    ap.add_argument("--max-tokens", type=int, default=256, help="longest reply, in tokens (default 256)")
    ap.add_argument("--temperature", type=float, default=0.7, help="0 answers greedily (default 0.7)")
    ap.add_argument("--system", help="a system message that starts (and survives) every conversation")
    ap.add_argument("--n-ctx", type=int, help="context length to open the model with (default: the runtime's)")
    ap.add_argument("--stats", action="store_true", help="print prompt size and speed after each reply (to stderr)")
    args = ap.parse_args(argv)
    if args.max_tokens < 1:
        ap.error("--max-tokens must be at least 1")

    options = {"n_ctx": args.n_ctx} if args.n_ctx else {}
    try:
        with edgekit.load(args.artifact, **options) as session:
            if getattr(session, "kind", "decoder") == "encoder":
                raise edgekit.EdgekitError(f"{args.artifact} is a sentence encoder: it does not chat",
                                           "pass a decoder artifact (see examples/semantic_search.py for encoders)")
            if sys.stdin.isatty():
                print(f"chatting with {args.artifact} ({session.runtime}, context {session.n_ctx}); {HELP}")
            chat(session, args)
    except edgekit.EdgekitError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print()
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
