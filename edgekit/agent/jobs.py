"""One job at a time, each in a child process with a wall-clock timeout and a memory limit.

Jobs wait in a bounded FIFO queue. The runner thread starts ``python -m edgekit.agent.worker`` in its
own process group, reads its JSON lines (progress events, then the result), and kills the whole group
when the job runs past its timeout, when the group's resident memory passes the limit, or when the
host cancels it. Finished jobs are kept (in memory and as JSON in the storage directory).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from edgekit.agent.store import BlobStore, StoreError

POLL_S = 0.2
FINISHED = ("done", "failed", "timeout", "memory", "cancelled")


@dataclass
class Job:
    id: str
    spec: dict[str, Any]
    state: str = "queued"
    events: list[dict[str, Any]] = field(default_factory=list)
    result: dict[str, Any] | None = None
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    peak_rss_bytes: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)

    def public(self, since: int = 0) -> dict[str, Any]:
        return {"id": self.id, "state": self.state, "events": self.events[since:], "n_events": len(self.events),
                "result": self.result, "error": self.error, "created": self.created, "started": self.started,
                "finished": self.finished, "peak_rss_bytes": self.peak_rss_bytes, "spec": self.spec}


class JobRunner:
    def __init__(self, store: BlobStore, max_queue: int = 8, max_memory_bytes: int | None = None,
                 max_timeout_s: float = 6 * 3600):
        import psutil

        self.store, self.max_queue = store, max_queue
        self.max_memory = max_memory_bytes or int(psutil.virtual_memory().total * 0.9)
        self.max_timeout_s = max_timeout_s
        self.jobs: dict[str, Job] = {}
        self.pending: queue.Queue[Job] = queue.Queue()
        self.lock = threading.Lock()
        self.results = store.root / "jobs"
        self.results.mkdir(exist_ok=True)
        self._thread = threading.Thread(target=self._loop, name="edgekit-agent-jobs", daemon=True)
        self._thread.start()

    def submit(self, spec: dict[str, Any]) -> Job:
        self.store.artifact_dir(spec["artifact"])  # 404 now, not when the job's turn comes
        for key in ("text_blob",):
            if spec.get(key) and self.store.has(spec[key]) is None:
                raise StoreError(409, "blobs_missing", f"{key} {spec[key]} is not stored: upload it first", missing=[spec[key]])
        if spec.get("quality") and self.store.has(spec["quality"]["blob"]) is None:
            raise StoreError(409, "blobs_missing", "the quality inputs are not stored: upload them first",
                             missing=[spec["quality"]["blob"]])
        if spec["timeout_s"] > self.max_timeout_s:
            raise StoreError(400, "timeout_too_long", f"this agent runs a job for at most {self.max_timeout_s:g} s")
        if spec.get("max_memory_bytes") and spec["max_memory_bytes"] > self.max_memory:
            raise StoreError(400, "memory_too_large", f"this agent gives a job at most {self.max_memory} bytes")
        with self.lock:
            waiting = sum(1 for j in self.jobs.values() if j.state == "queued")
            if waiting >= self.max_queue:
                raise StoreError(429, "queue_full", f"{waiting} jobs are already waiting on this device; try again later")
            job = Job(uuid.uuid4().hex, spec)
            self.jobs[job.id] = job
            self.store.pins[spec["artifact"]] += 1
        self.pending.put(job)
        return job

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            saved = self.results / f"{job_id}.json" if job_id.isalnum() and len(job_id) == 32 else None
            if saved is not None and saved.exists():  # finished before this agent restarted
                data = json.loads(saved.read_text())
                job = Job(data["id"], data["spec"], data["state"], data["events"], data["result"], data["error"],
                          data["created"], data["started"], data["finished"], data["peak_rss_bytes"])
                return job
            raise StoreError(404, "job_not_found", f"no job {job_id[:64]} on this agent")
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        job.cancel.set()
        return job

    def running(self) -> int:
        return sum(1 for j in self.jobs.values() if j.state == "running")

    # ------------------------------------------------------------------ the runner thread

    def _loop(self) -> None:
        while True:
            job = self.pending.get()
            try:
                if job.cancel.is_set():
                    self._finish(job, "cancelled", error="cancelled before it started")
                else:
                    self._run(job)
            except Exception as exc:  # noqa: BLE001 - the runner must outlive any one job
                self._finish(job, "failed", error=f"the agent could not run the job: {type(exc).__name__}: {exc}"[:400])

    def _run(self, job: Job) -> None:
        import psutil

        limit = min(job.spec.get("max_memory_bytes") or self.max_memory, self.max_memory)
        payload = {"artifact_dir": str(self.store.artifact_dir(job.spec["artifact"])), "spec": job.spec,
                   "storage": str(self.store.root)}
        job.state, job.started = "running", time.time()
        log = open(self.store.root / "jobs" / f"{job.id}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "edgekit.agent.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=log, start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        proc.stdin.write(json.dumps(payload).encode())
        proc.stdin.close()
        final: dict[str, Any] = {}

        def read():
            for raw in proc.stdout:
                try:
                    msg = json.loads(raw)
                except ValueError:
                    continue
                if msg.get("event") == "progress":
                    job.events.append({k: msg[k] for k in ("stage", "done", "total") if k in msg} | {"t": time.time()})
                elif msg.get("event") in ("result", "error"):
                    final.update(msg)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        deadline = job.started + job.spec["timeout_s"]
        outcome = None
        try:
            root = psutil.Process(proc.pid)
            while proc.poll() is None:
                try:
                    rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                except psutil.Error:
                    rss = 0
                job.peak_rss_bytes = max(job.peak_rss_bytes, rss)
                if time.time() > deadline:
                    outcome = ("timeout", f"the job ran past its timeout of {job.spec['timeout_s']:g} s and was stopped")
                elif rss > limit:
                    outcome = ("memory", f"the job used {rss} bytes, over its limit of {limit} bytes, and was stopped")
                elif job.cancel.is_set():
                    outcome = ("cancelled", "cancelled by the host")
                if outcome:
                    _kill_group(proc)
                    break
                time.sleep(POLL_S)
        finally:
            proc.wait()
            reader.join(timeout=5)
            log.close()
        if outcome:
            self._finish(job, outcome[0], error=outcome[1])
        elif final.get("event") == "result":
            self._finish(job, "done", result=final["result"])
        else:
            err = final.get("error") or f"the job's process exited with status {proc.returncode} without a result"
            self._finish(job, "failed", error=err)

    def _finish(self, job: Job, state: str, result: dict | None = None, error: str | None = None) -> None:
        from edgekit.atomic import write_atomic

        job.state, job.result, job.error, job.finished = state, result, error, time.time()
        with self.lock:
            self.store.pins[job.spec["artifact"]] -= 1
        data = job.public()
        write_atomic(self.results / f"{job.id}.json", json.dumps(data))


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
