"""Load benchmark of `edgekit serve` against `llama_cpp.server` on the same int4 GGUF, over loopback.

N streamed chat requests (default 1,000) at concurrency C (default 16), each asking for a short reply
(greedy, max_tokens 32) to one of a rotating set of prompts. Per server: errors, p50 / p99 time to first
token (request sent to first content delta), aggregate completion tokens/s over the run, the server's
peak RSS and whether its RSS stays flat after warm-up (growth over the second half of the run, sampled
every 0.25 s). The servers run one after the other on this machine, each with every core.

Prints a table and writes benchmarks/results/serve.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
PROMPTS = [
    "What is the capital of France?", "Give me three tips for sleeping better.", "Explain what a prime number is.",
    "Write a haiku about autumn.", "How do I boil an egg?", "Name two planets in the solar system.",
    "What does a compiler do?", "Suggest a name for a grey cat.", "Why is the sky blue?", "Translate 'thank you' to Spanish.",
    "What is 12 times 12?", "Describe a rainbow in one sentence.", "List three fruits that are red.",
    "What is photosynthesis?", "Tell me a fun fact about octopuses.", "How many days are in a leap year?",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(proc: subprocess.Popen, port: int, path: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path)
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise SystemExit("server did not start")


def _one(conn_box: list, port: int, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed chat request on this thread's keep-alive connection: ttft, tokens, ok."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    try:
        if conn_box[0] is None:
            conn_box[0] = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        conn = conn_box[0]
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            resp.read()
            return {"ok": False, "error": f"HTTP {resp.status}"}
        ttft, tokens, deltas, done = None, None, 0, False
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                done = True
                break
            ev = json.loads(data)
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
            for ch in ev.get("choices") or []:
                if (ch.get("delta") or {}).get("content"):
                    deltas += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
        resp.read()
        if not done:
            return {"ok": False, "error": "stream ended without [DONE]"}
        return {"ok": True, "ttft_s": ttft if ttft is not None else time.perf_counter() - t0,
                "tokens": tokens if tokens is not None else deltas, "total_s": time.perf_counter() - t0}
    except (OSError, http.client.HTTPException, ValueError) as exc:
        conn_box[0] = None
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def load_test(name: str, cmd: list[str], port: int, model: str, ready_path: str, n: int, concurrency: int,
              max_tokens: int) -> dict:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_ready(proc, port, ready_path)
        ps = psutil.Process(proc.pid)
        samples: list[tuple[float, int, int]] = []  # (time, requests done, rss)
        done = [0]
        lock = threading.Lock()
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                try:
                    rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
                except psutil.Error:
                    break
                samples.append((time.perf_counter(), done[0], rss))
                time.sleep(0.25)

        local = threading.local()

        def task(i: int) -> dict:
            if not hasattr(local, "box"):
                local.box = [None]
            r = _one(local.box, port, model, PROMPTS[i % len(PROMPTS)], max_tokens)
            with lock:
                done[0] += 1
            return r

        warm = [_one([None], port, model, PROMPTS[0], max_tokens) for _ in range(3)]
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as ex:
            results = list(ex.map(task, range(n)))
        wall = time.perf_counter() - t0
        stop.set()
        sampler.join()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    ok = [r for r in results if r["ok"]]
    ttft = sorted(r["ttft_s"] for r in ok)
    # RSS after warm-up: compare the second half of the run with the sample at its start
    half = [s for s in samples if s[1] >= n // 2]
    mid = half[0][2] if half else None
    growth = (max(s[2] for s in half) - mid) / mid if half else None
    errors = [r["error"] for r in results if not r["ok"]] + [r["error"] for r in warm if not r["ok"]]
    return {
        "server": name, "requests": n, "concurrency": concurrency, "max_tokens": max_tokens,
        "errors": len(errors), "error_examples": sorted(set(errors))[:5],
        "ttft_p50_ms": 1000 * statistics.median(ttft) if ttft else None,
        "ttft_p99_ms": 1000 * ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] if ttft else None,
        "completion_tokens": sum(r["tokens"] for r in ok), "wall_s": wall,
        "aggregate_tok_s": sum(r["tokens"] for r in ok) / wall,
        "requests_s": len(ok) / wall,
        "peak_rss_mb": max(s[2] for s in samples) / 1e6 if samples else None,
        "rss_mid_mb": mid / 1e6 if mid else None,
        "rss_growth_second_half_pct": 100 * growth if growth is not None else None,
        "command": " ".join(cmd[1:] if cmd[0] == sys.executable else cmd),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/bench-serve")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--parallel", default="1,2", help="edgekit serve --parallel values to measure")
    ap.add_argument("--skip-llama-server", action="store_true")
    args = ap.parse_args()

    from edgekit.pipeline import ConvertRequest, convert
    from edgekit.runtimes.llamacpp import default_threads

    art = Path(args.out) / "int4"
    if not (art / "manifest.json").exists():
        convert(ConvertRequest(None, "gguf", "int4", art, force=True))
    gguf = art / "model.gguf"
    edgekit_bin = str(Path(sys.executable).parent / "edgekit")
    runs = []
    for par in [int(p) for p in args.parallel.split(",") if p]:
        port = _free_port()
        cmd = [edgekit_bin, "serve", str(art), "--port", str(port), "--parallel", str(par), "--queue", str(args.concurrency * 2),
               "--n-ctx", "2048"]
        runs.append(load_test(f"edgekit serve --parallel {par}", cmd, port, art.name, "/health", args.requests,
                              args.concurrency, args.max_tokens))
    if not args.skip_llama_server:
        port = _free_port()
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port), "--n_ctx", "2048",
               "--n_threads", str(default_threads()), "--n_threads_batch", str(default_threads()), "--verbose", "False",
               # its default aborts the running stream whenever another request arrives
               "--interrupt_requests", "False"]
        runs.append(load_test("llama_cpp.server", cmd, port, str(gguf), "/v1/models", args.requests, args.concurrency,
                              args.max_tokens))

    t = Table(title=f"{args.requests} streamed chat requests at concurrency {args.concurrency}, max_tokens {args.max_tokens}, "
                    f"int4 GGUF of the embedded model, loopback")
    for col in ("server", "errors", "TTFT p50 ms", "TTFT p99 ms", "agg tok/s", "req/s", "peak RSS MB", "RSS growth 2nd half"):
        t.add_column(col, justify="right" if col != "server" else "left")
    for r in runs:
        f = lambda v, spec=".0f": "-" if v is None else format(v, spec)  # noqa: E731
        t.add_row(r["server"], str(r["errors"]), f(r["ttft_p50_ms"]), f(r["ttft_p99_ms"]), f(r["aggregate_tok_s"], ".1f"),
                  f(r["requests_s"], ".2f"), f(r["peak_rss_mb"]), f(r["rss_growth_second_half_pct"], "+.1f") + "%")
    Console(width=150).print(t)
    out = HERE / "results" / "serve.json"
    out.write_text(json.dumps({"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "threads": default_threads(),
                               "runs": runs}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
