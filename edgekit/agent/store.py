"""The agent's storage: content-addressed blobs, resumable uploads that hash while they write, and
artifact directories assembled from blobs under the names the host's manifest gives them.

Layout under the storage directory::

    blobs/<sha256>            complete files, each verified against its name
    partial/<sha256>          an upload in progress (+ .total); resumable after a restart
    artifacts/<id>/...        an artifact: hard links to blobs under the manifest's file names
    artifacts/<id>.json       which blobs it is made of (for eviction)

The storage quota counts blobs and partial uploads; making room evicts the least recently used
blobs (and the artifacts made of them) that no queued or running job needs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DIGEST = re.compile(r"^[0-9a-f]{64}$")
ARTIFACT_ID = re.compile(r"^[0-9a-f]{32}$")
MAX_FILES = 20_000
MAX_PATH_PARTS = 16
MAX_MANIFEST_BYTES = 8 << 20
STALE_PARTIAL_S = 24 * 3600


class StoreError(Exception):
    """A refusal with its HTTP status, a machine-readable code and extra fields for the client."""

    def __init__(self, status: int, code: str, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


@dataclass
class _Upload:
    hasher: Any
    offset: int
    total: int


def check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not DIGEST.match(digest):
        raise StoreError(400, "invalid_digest", "a blob is named by its sha256: 64 lowercase hex digits")
    return digest


def safe_relpath(path: Any) -> str:
    """A relative POSIX path of plain names: nothing absolute, no '..' or '.', no backslashes or NULs."""
    ok = (isinstance(path, str) and 0 < len(path) <= 1024 and "\0" not in path and "\\" not in path
          and not path.startswith("/"))
    parts = path.split("/") if ok else []
    ok = ok and 0 < len(parts) <= MAX_PATH_PARTS and all(p and p not in (".", "..") and len(p) <= 255 for p in parts)
    if not ok:
        raise StoreError(400, "unsafe_path", f"the file name {str(path)[:200]!r} is not a plain relative path inside the artifact")
    return path


class BlobStore:
    def __init__(self, root: Path, quota_bytes: int, max_blob_bytes: int | None = None):
        self.root = Path(root)
        self.blobs, self.partial, self.artifacts = self.root / "blobs", self.root / "partial", self.root / "artifacts"
        for d in (self.blobs, self.partial, self.artifacts):
            d.mkdir(parents=True, exist_ok=True)
        for leftover in self.artifacts.glob(".tmp-*"):  # an assembly cut short by a crash
            shutil.rmtree(leftover, ignore_errors=True)
        self.quota = int(quota_bytes)
        self.max_blob = int(max_blob_bytes or quota_bytes)
        self.lock = threading.RLock()
        self.uploads: dict[str, _Upload] = {}
        self.pins: Counter[str] = Counter()  # artifact id -> jobs that need it
        self.bytes_received = 0  # chunk bytes accepted since start (what a second push must not send)

    # ------------------------------------------------------------------ blobs

    def blob_path(self, digest: str) -> Path:
        return self.blobs / check_digest(digest)

    def has(self, digest: str) -> int | None:
        """The blob's size when stored (and marks it used), else None."""
        p = self.blob_path(digest)
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            return None
        os.utime(p)
        return size

    def upload_status(self, digest: str) -> dict[str, int] | None:
        check_digest(digest)
        with self.lock:
            if self.has(digest) is not None:
                size = self.blob_path(digest).stat().st_size
                return {"offset": size, "total": size, "complete": True}
            up = self._resume(digest)
            return None if up is None else {"offset": up.offset, "total": up.total, "complete": False}

    def _resume(self, digest: str) -> _Upload | None:
        """The upload in progress: in memory, or rebuilt from its partial file after a restart."""
        if digest in self.uploads:
            return self.uploads[digest]
        part, total_file = self.partial / digest, self.partial / f"{digest}.total"
        if not (part.exists() and total_file.exists()):
            return None
        try:
            total = int(total_file.read_text())
        except ValueError:
            part.unlink(missing_ok=True)
            total_file.unlink(missing_ok=True)
            return None
        h = hashlib.sha256()
        with open(part, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        up = _Upload(h, part.stat().st_size, total)
        self.uploads[digest] = up
        return up

    def put_chunk(self, digest: str, offset: int, total: int, data: bytes, chunk_sha256: str | None) -> dict[str, Any]:
        """Append ``data`` at ``offset`` of the upload of ``digest`` (``total`` bytes in all)."""
        check_digest(digest)
        if chunk_sha256 is None or not DIGEST.match(chunk_sha256):
            raise StoreError(400, "chunk_digest_required", "send the chunk's sha256 in the X-Chunk-Sha256 header")
        if total < 0 or offset < 0:
            raise StoreError(400, "invalid_range", "offset and total must be non-negative")
        if total > self.max_blob:
            raise StoreError(413, "blob_too_large", f"a blob of {total} bytes exceeds this agent's limit of {self.max_blob} bytes")
        if offset + len(data) > total:
            raise StoreError(400, "invalid_range", f"the chunk ends at {offset + len(data)}, past the blob's {total} bytes")
        if hashlib.sha256(data).hexdigest() != chunk_sha256:
            raise StoreError(400, "chunk_digest_mismatch", "the chunk does not match its X-Chunk-Sha256 (damaged in transit); "
                             "nothing was written", offset=offset)
        with self.lock:
            if self.has(digest) is not None:
                return {"offset": total, "complete": True, "existed": True}
            up = self._resume(digest)
            if up is None:
                if offset != 0:
                    raise StoreError(409, "offset_mismatch", "no upload of this blob is in progress: start at offset 0", offset=0)
                self._make_room(total)
                (self.partial / f"{digest}.total").write_text(str(total))
                (self.partial / digest).write_bytes(b"")
                up = self.uploads[digest] = _Upload(hashlib.sha256(), 0, total)
            if up.total != total:
                raise StoreError(400, "total_mismatch", f"the upload in progress is of {up.total} bytes, not {total}")
            if offset != up.offset:
                raise StoreError(409, "offset_mismatch", f"the upload continues at offset {up.offset}", offset=up.offset)
            part = self.partial / digest
            with open(part, "ab") as fh:
                fh.write(data)
                if up.offset + len(data) == total:
                    fh.flush()
                    os.fsync(fh.fileno())
            up.hasher.update(data)
            up.offset += len(data)
            self.bytes_received += len(data)
            if up.offset < total:
                return {"offset": up.offset, "complete": False}
            del self.uploads[digest]
            (self.partial / f"{digest}.total").unlink(missing_ok=True)
            if up.hasher.hexdigest() != digest:
                part.unlink(missing_ok=True)
                raise StoreError(400, "digest_mismatch", "the uploaded bytes do not hash to the blob's name; the upload "
                                 "was discarded: send it again")
            os.replace(part, self.blobs / digest)
            return {"offset": total, "complete": True}

    # ------------------------------------------------------------------ quota

    def usage(self) -> int:
        return sum(p.stat().st_size for d in (self.blobs, self.partial) for p in d.iterdir()
                   if p.is_file() and not p.name.endswith(".total"))

    def _make_room(self, need: int) -> None:
        used = self.usage()
        if used + need <= self.quota:
            return
        now = time.time()
        for p in sorted(self.partial.glob("*")):  # abandoned uploads first
            if not p.name.endswith(".total") and p.name not in self.uploads and now - p.stat().st_mtime > STALE_PARTIAL_S:
                used -= p.stat().st_size
                p.unlink(missing_ok=True)
                (self.partial / f"{p.name}.total").unlink(missing_ok=True)
        pinned = {d for a in self.pins if self.pins[a] > 0 for d in self._artifact_blobs(a)}
        for p in sorted(self.blobs.iterdir(), key=lambda q: q.stat().st_mtime):  # least recently used first
            if used + need <= self.quota:
                break
            if p.name in pinned:
                continue
            used -= p.stat().st_size
            self._evict(p.name)
        if used + need > self.quota:
            raise StoreError(507, "storage_full", f"{need} more bytes do not fit this agent's storage quota of {self.quota} "
                             f"bytes ({used} in use by artifacts that running or queued jobs need)")

    def _evict(self, digest: str) -> None:
        (self.blobs / digest).unlink(missing_ok=True)
        for index in self.artifacts.glob("*.json"):  # an artifact without one of its blobs is gone too
            if digest in self._artifact_blobs(index.stem):
                shutil.rmtree(self.artifacts / index.stem, ignore_errors=True)
                index.unlink(missing_ok=True)

    def _artifact_blobs(self, artifact_id: str) -> set[str]:
        try:
            return {f["sha256"] for f in json.loads((self.artifacts / f"{artifact_id}.json").read_text())["files"]}
        except (OSError, ValueError, KeyError, TypeError):
            return set()

    # ------------------------------------------------------------------ artifacts

    def create_artifact(self, files: Any) -> dict[str, Any]:
        """Assemble an artifact directory from stored blobs; ``files``: [{"path", "sha256", "bytes"}]."""
        entries = self._check_index(files)
        key = json.dumps(sorted((e["path"], e["sha256"], e["bytes"]) for e in entries)).encode()
        artifact_id = hashlib.sha256(key).hexdigest()[:32]
        with self.lock:
            missing = [e["sha256"] for e in entries if self.has(e["sha256"]) is None]
            if missing:
                raise StoreError(409, "blobs_missing", f"{len(missing)} of the artifact's files are not stored: upload them first",
                                 missing=sorted(set(missing)))
            for e in entries:
                size = self.blob_path(e["sha256"]).stat().st_size
                if size != e["bytes"]:
                    raise StoreError(400, "size_mismatch", f"{e['path']} is said to be {e['bytes']} bytes; its blob has {size}")
            self._check_manifest(entries)
            final = self.artifacts / artifact_id
            if final.is_dir() and (self.artifacts / f"{artifact_id}.json").exists():
                return {"artifact": artifact_id, "files": len(entries), "existed": True}
            tmp = self.artifacts / f".tmp-{artifact_id}-{uuid.uuid4().hex[:8]}"
            try:
                for e in entries:
                    dest = tmp.joinpath(*e["path"].split("/"))
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.link(self.blob_path(e["sha256"]), dest)  # same bytes, no copy
                    except OSError:
                        shutil.copyfile(self.blob_path(e["sha256"]), dest)
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            (self.artifacts / f"{artifact_id}.json").write_text(json.dumps({"files": entries}))
            return {"artifact": artifact_id, "files": len(entries)}

    def _check_index(self, files: Any) -> list[dict[str, Any]]:
        if not isinstance(files, list) or not files:
            raise StoreError(400, "invalid_artifact", "an artifact is a non-empty list of files")
        if len(files) > MAX_FILES:
            raise StoreError(400, "invalid_artifact", f"an artifact has at most {MAX_FILES} files")
        entries, seen = [], set()
        for f in files:
            if not isinstance(f, dict) or set(f) != {"path", "sha256", "bytes"}:
                raise StoreError(400, "invalid_artifact", "each file is exactly {path, sha256, bytes}")
            path, digest, size = safe_relpath(f["path"]), check_digest(f["sha256"]), f["bytes"]
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise StoreError(400, "invalid_artifact", f"{path}: bytes must be a non-negative integer")
            if path in seen:
                raise StoreError(400, "invalid_artifact", f"{path} is listed twice")
            seen.add(path)
            entries.append({"path": path, "sha256": digest, "bytes": size})
        for p in seen:  # a name that is both a file and a folder cannot be laid out
            parts = p.split("/")
            if any("/".join(parts[:i]) in seen for i in range(1, len(parts))):
                raise StoreError(400, "invalid_artifact", f"{p} lies under another listed file")
        return entries

    def _check_manifest(self, entries: list[dict[str, Any]]) -> None:
        """The manifest names the artifact's files: each must be a plain name inside the directory and be
        among the pushed files with the same digest and size."""
        from edgekit.errors import InputError
        from edgekit.verify import listed_files

        m = next((e for e in entries if e["path"] == "manifest.json"), None)
        if m is None:
            return
        if m["bytes"] > MAX_MANIFEST_BYTES:
            raise StoreError(413, "manifest_too_large", f"manifest.json is over {MAX_MANIFEST_BYTES} bytes")
        try:
            manifest = json.loads(self.blob_path(m["sha256"]).read_bytes())
        except (ValueError, RecursionError):
            raise StoreError(400, "invalid_manifest", "manifest.json is not valid JSON") from None
        if not isinstance(manifest, dict):
            raise StoreError(400, "invalid_manifest", "manifest.json is not a JSON object")
        try:
            listed = listed_files(self.artifacts, manifest)
        except InputError as exc:
            raise StoreError(400, "unsafe_path", exc.message) from None
        by_path = {e["path"]: e for e in entries}
        for e in listed:
            got = by_path.get(e["path"])
            if got is None or got["sha256"] != e["sha256"].lower() or got["bytes"] != e["bytes"]:
                raise StoreError(400, "manifest_mismatch", f"manifest.json lists {e['path']}, which was not pushed with "
                                 "that sha256 and size")

    def artifact_dir(self, artifact_id: str) -> Path:
        if not isinstance(artifact_id, str) or not ARTIFACT_ID.match(artifact_id):
            raise StoreError(400, "invalid_artifact_id", "an artifact id is 32 lowercase hex digits")
        d = self.artifacts / artifact_id
        if not (d.is_dir() and (self.artifacts / f"{artifact_id}.json").exists()):
            raise StoreError(404, "artifact_not_found", f"no artifact {artifact_id} here (evicted or never pushed): push it again")
        for digest in self._artifact_blobs(artifact_id):
            self.has(digest)
        return d

    def summary(self) -> dict[str, Any]:
        with self.lock:
            return {"used_bytes": self.usage(), "quota_bytes": self.quota, "max_blob_bytes": self.max_blob,
                    "blobs": sum(1 for _ in self.blobs.iterdir()), "artifacts": sum(1 for _ in self.artifacts.glob("*.json")),
                    "uploads_in_progress": len(self.uploads), "bytes_received": self.bytes_received}
