"""The agent's token: created on first start (random, 256 bits), stored readable by its owner only,
printed once; every request but ``/health`` must carry it as ``Authorization: Bearer TOKEN``."""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from pathlib import Path

from edgekit.errors import InputError


def load_or_create(path: Path) -> tuple[str, bool]:
    """(token, created now). A token file others can read is refused: anyone on the device could use it."""
    path = Path(path)
    if path.exists():
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise InputError(f"the agent token file {path} is readable by other users (mode {stat.S_IMODE(mode):o})",
                             f"chmod 600 {path}, or delete it to have a new token made")
        token = path.read_text(encoding="utf-8").strip()
        if len(token) < 16:
            raise InputError(f"the agent token file {path} holds no usable token (under 16 characters)",
                             "delete it to have a new token made")
        return token, False
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    # created with 0600 from the start (no window in which the umask's mode applies); O_EXCL: never
    # overwrite a token another agent wrote meanwhile
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token + "\n")
    return token, True


def authorized(header: str | None, token: str) -> bool:
    """Constant-time comparison of ``Authorization: Bearer ...`` with the token."""
    header = header or ""
    given = header[7:] if header[:7].lower() == "bearer " else ""
    return hmac.compare_digest(given.encode(), token.encode())
