"""The host's side of the agent protocol: push an artifact (only the blobs the device lacks, in resumable
chunks, each with its sha256), run a job, follow its progress. Standard library HTTP only, so the host
needs nothing extra to talk to a device."""

from __future__ import annotations

import hashlib
import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable

from edgekit.errors import EdgekitError, InputError

CHUNK = 8 << 20


class AgentError(EdgekitError):
    """The agent refused or failed a request; carries its status and error code."""

    def __init__(self, status: int, code: str | None, message: str, extra: dict | None = None):
        super().__init__(message, None)
        self.status, self.code, self.extra = status, code, extra or {}


def file_sha256(path: Path) -> str:
    from edgekit.cache import sha256_file

    return sha256_file(path)


def artifact_files(path: Path) -> tuple[Path, list[dict[str, Any]]]:
    """(directory, [{"path", "sha256", "bytes", "local"}]) of everything an artifact is made of: every file under
    its directory (a Core ML package's inner files included) or the one model file."""
    from edgekit.verify import digest

    p = Path(path)
    if p.is_file():
        return p.parent, [{"path": p.name, "sha256": digest(p), "bytes": p.stat().st_size, "local": p}]
    files = []
    for q in sorted(p.rglob("*")):
        if q.is_file() and not q.is_symlink():
            files.append({"path": q.relative_to(p).as_posix(), "sha256": digest(q), "bytes": q.stat().st_size, "local": q})
    return p, files


class AgentClient:
    def __init__(self, url: str, token: str | None, timeout: float = 60.0, cafile: str | None = None):
        """``cafile``: the certificate that signed the agent's (its own, when self-signed); default
        $EDGEKIT_AGENT_CA, else the system's trust store. Certificates are always verified."""
        import os

        url = url.rstrip("/")
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise InputError(f"{url} is not an agent URL", "pass http://HOST:PORT (or https://) of a running `edgekit agent`")
        self.url, self.token, self.timeout = url, token, timeout
        cafile = cafile or os.environ.get("EDGEKIT_AGENT_CA") or None
        try:
            self.context = ssl.create_default_context(cafile=cafile) if parsed.scheme == "https" else None
        except (OSError, ssl.SSLError) as exc:
            raise InputError(f"cannot read the agent's CA certificate {cafile} ({exc})", "set EDGEKIT_AGENT_CA to a PEM file") from None
        self.sent_bytes = 0
        self._max_chunk: int | None = None

    # ------------------------------------------------------------------ HTTP

    def request(self, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None,
                ok: tuple[int, ...] = (200, 202)) -> tuple[int, Any]:
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        h = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        if isinstance(body, (dict, list)):
            h["Content-Type"] = "application/json"
        h.update(headers or {})
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self.context) as r:
                raw = r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise InputError(f"cannot reach the agent at {self.url} ({reason})",
                             "start `edgekit agent` on the device and check the URL and port") from None
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = None
        if status not in ok:
            err = (payload or {}).get("error", {}) if isinstance(payload, dict) else {}
            msg = err.get("message") or f"HTTP {status}"
            extra = {k: v for k, v in err.items() if k not in ("message", "type", "param", "code")}
            hint = "pass the token the agent printed (--token, or `edgekit devices add`)" if status == 401 else None
            exc = AgentError(status, err.get("code"), f"the agent at {self.url} answered {status}: {msg}", extra)
            exc.hint = hint
            raise exc
        return status, payload

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/health")[1]

    def device(self) -> dict[str, Any]:
        return self.request("GET", "/v1/device")[1]

    def storage(self) -> dict[str, Any]:
        return self.request("GET", "/v1/storage")[1]

    def has_blob(self, digest: str) -> bool:
        status, _ = self.request("HEAD", f"/v1/blobs/{digest}", ok=(200, 404))
        return status == 200

    # ------------------------------------------------------------------ uploads

    def upload(self, path: Path, digest: str, chunk: int = CHUNK) -> int:
        """Send the file unless stored; resumes an upload in progress. Returns the bytes sent."""
        if self.has_blob(digest):
            return 0
        if self._max_chunk is None:
            self._max_chunk = int(self.storage().get("max_chunk_bytes") or CHUNK)
        chunk = max(1, min(chunk, self._max_chunk))
        total = Path(path).stat().st_size
        status, st = self.request("GET", f"/v1/uploads/{digest}", ok=(200, 404))
        offset = st["offset"] if status == 200 else 0
        sent = 0
        with open(path, "rb") as fh:
            while True:
                fh.seek(offset)
                data = fh.read(chunk)
                try:
                    _, r = self.request("PUT", f"/v1/blobs/{digest}?offset={offset}&total={total}", data,
                                        {"X-Chunk-Sha256": hashlib.sha256(data).hexdigest(),
                                         "Content-Type": "application/octet-stream"})
                except AgentError as exc:
                    if exc.status == 409 and "offset" in exc.extra:  # the agent knows better where we are
                        offset = int(exc.extra["offset"])
                        continue
                    raise
                sent += len(data)
                self.sent_bytes += len(data)
                offset = r["offset"]
                if r["complete"]:
                    return sent

    def upload_bytes(self, data: bytes, tmp_dir: Path) -> str:
        digest = hashlib.sha256(data).hexdigest()
        if not self.has_blob(digest):
            p = Path(tmp_dir) / digest
            p.write_bytes(data)
            self.upload(p, digest)
        return digest

    def push_artifact(self, path: Path, progress: Callable[[str, int, int], None] = lambda d, a, b: None) -> dict[str, Any]:
        """Push an artifact (directory or model file); returns {"artifact", "sent_bytes", "skipped_bytes", "files"}."""
        _, files = artifact_files(path)
        total = sum(f["bytes"] for f in files)
        sent = skipped = 0
        for f in files:
            n = self.upload(f["local"], f["sha256"])
            sent += n
            skipped += f["bytes"] - n if n == 0 else 0
            progress("pushing the artifact", sent + skipped, total)
        _, r = self.request("POST", "/v1/artifacts",
                            {"files": [{k: f[k] for k in ("path", "sha256", "bytes")} for f in files]})
        return {"artifact": r["artifact"], "sent_bytes": sent, "skipped_bytes": skipped, "files": len(files)}

    # ------------------------------------------------------------------ jobs

    def submit(self, spec: dict[str, Any]) -> str:
        return self.request("POST", "/v1/jobs", spec)[1]["id"]

    def job(self, job_id: str, since: int = 0) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_id}?since={since}")[1]

    def wait(self, job_id: str, progress: Callable[[str, int, int], None] = lambda d, a, b: None,
             poll_s: float = 0.5) -> dict[str, Any]:
        seen = 0
        while True:
            st = self.job(job_id, seen)
            for ev in st["events"]:
                progress(f"device: {ev.get('stage', '')}", int(ev.get("done", 0)), int(ev.get("total", 1)))
            seen = st["n_events"]
            if st["state"] in ("done", "failed", "timeout", "memory", "cancelled"):
                return st
            time.sleep(poll_s)

    def run(self, spec: dict[str, Any], progress=lambda d, a, b: None) -> dict[str, Any]:
        """Submit and wait; the job's result, or one error line naming what happened on the device."""
        job_id = self.submit(spec)
        st = self.wait(job_id, progress)
        if st["state"] != "done":
            raise InputError(f"the job on {self.url} ended {st['state']}: {st['error']}",
                             "see the agent's log for details" if st["state"] == "failed" else None)
        return st["result"]
