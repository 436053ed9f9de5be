"""One served model: N sessions over the same weights, each driven by its own worker thread, fed from one
bounded first-in-first-out queue (fair: requests start in arrival order; full: the caller answers 429).

Sessions are not thread-safe, so each belongs to exactly one worker; the event loop only tokenizes and
renders chat templates (read-only use of the vocabulary). Workers hand results back to the loop with
``call_soon_threadsafe``; a cancelled job (its client went away) is skipped or stops between tokens.
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError
from edgekit.serve.metrics import ServerMetrics
from edgekit.serve.stops import StopMatcher


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


class Job:
    """One request's work; ``events`` receives ("delta", text), ("done", finish_reason, usage),
    ("embeddings", array, tokens) or ("error", message)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, kind: str, **payload: Any):
        self.loop, self.kind, self.payload = loop, kind, payload
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.arrived = time.monotonic()

    def emit(self, *event: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down
            self.cancelled.set()


class QueueFull(EdgekitError):
    def __init__(self, model: str, retry_after: int):
        super().__init__(f"{model}: every session is busy and the queue is full", f"retry in {retry_after} s")
        self.retry_after = retry_after


class ModelPool:
    def __init__(self, name: str, path: Path, kind: str, sessions: list, queue_limit: int, metrics: ServerMetrics,
                 manifest: dict | None = None):
        self.name, self.path, self.kind, self.sessions = name, path, kind, sessions
        self.manifest = manifest or {}
        self.queue_limit = queue_limit
        self.metrics = metrics
        self.created = int(path.stat().st_mtime) if path.exists() else int(time.time())
        self._q: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._busy = 0
        self._mean_s = 1.0  # running mean of a job's duration, for Retry-After
        self._workers = [threading.Thread(target=self._work, args=(s,), name=f"edgekit-{name}-{i}", daemon=True)
                         for i, s in enumerate(sessions)]
        for w in self._workers:
            w.start()

    @property
    def session(self):
        """The session the event loop tokenizes with (read-only use)."""
        return self.sessions[0]

    @property
    def n_ctx(self) -> int | None:
        return getattr(self.session, "n_ctx", None)

    def submit(self, job: Job) -> None:
        with self._lock:
            # room: one job per idle session plus ``queue_limit`` waiting
            if self._waiting + self._busy >= len(self.sessions) + self.queue_limit:
                wait = self._mean_s * (self._waiting + 1) / max(1, len(self.sessions))
                raise QueueFull(self.name, max(1, math.ceil(wait)))
            self._waiting += 1
            self.metrics.queue_depth.labels(self.name).set(self._waiting)
        self._q.put(job)

    def close(self) -> None:
        for _ in self._workers:
            self._q.put(None)
        for w in self._workers:
            w.join(timeout=30)
        for s in {id(s): s for s in self.sessions}.values():
            s.close()

    # ------------------------------------------------------------------ worker threads

    def _work(self, session) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            with self._lock:
                self._waiting -= 1
                self.metrics.queue_depth.labels(self.name).set(self._waiting)
                if job.cancelled.is_set():
                    continue
                self._busy += 1
            started = time.monotonic()
            self.metrics.running.labels(self.name).inc()
            try:
                if job.kind == "embed":
                    self._embed(session, job)
                else:
                    self._generate(session, job)
            except EdgekitError as exc:
                job.emit("error", exc.one_line())
            except Exception as exc:  # a runtime failure answers this request; the worker lives on
                job.emit("error", f"the {session.runtime} runtime failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            finally:
                with self._lock:
                    self._busy -= 1
                self.metrics.running.labels(self.name).dec()
                self._mean_s = 0.8 * self._mean_s + 0.2 * (time.monotonic() - started)

    def _generate(self, session, job: Job) -> None:
        ids: list[int] = job.payload["prompt_ids"]
        s: Sampling = job.payload["sampling"]
        stops = StopMatcher(s.stop)
        count = 0
        first = None

        def tokens():
            nonlocal count, first
            for tok in session.stream_tokens(ids, s.max_tokens, s.temperature, top_p=s.top_p, seed=s.seed):
                if job.cancelled.is_set():
                    return
                count += 1
                if first is None:
                    first = time.monotonic()
                    self.metrics.ttft.labels(self.name).observe(first - job.arrived)
                yield tok

        pieces = session.decode_stream(tokens())
        try:
            for piece in pieces:
                out = stops.feed(piece)
                if out:
                    job.emit("delta", out)
                if stops.stopped:
                    break
        finally:
            pieces.close()  # stops the runtime's generator too
        tail = stops.flush()
        if tail:
            job.emit("delta", tail)
        if job.cancelled.is_set():
            self.metrics.cancelled.labels(self.name).inc()
        finish = "stop" if stops.stopped or count < s.max_tokens else "length"
        if first is not None and count > 1:
            self.metrics.tok_s.labels(self.name).observe((count - 1) / max(1e-9, time.monotonic() - first))
        self.metrics.tokens.labels(self.name, "prompt").inc(len(ids))
        self.metrics.tokens.labels(self.name, "completion").inc(count)
        job.emit("done", finish, {"prompt_tokens": len(ids), "completion_tokens": count, "total_tokens": len(ids) + count})

    def _embed(self, session, job: Job) -> None:
        texts: list[str] = job.payload["texts"]
        vectors = session.embed(texts)
        n_tokens = sum(len(session.tokenize(t)) for t in texts)
        self.metrics.tokens.labels(self.name, "prompt").inc(n_tokens)
        job.emit("embeddings", vectors, n_tokens)
