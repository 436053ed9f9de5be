"""Devices the user has added (``edgekit devices add NAME URL --token T``): names, agent URLs and tokens, kept in
the user's config (``$EDGEKIT_CONFIG_DIR`` or ~/.config/edgekit), readable by the user only."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from edgekit.errors import InputError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def config_dir() -> Path:
    base = os.environ.get("EDGEKIT_CONFIG_DIR") or os.path.join(os.environ.get("XDG_CONFIG_HOME") or "~/.config", "edgekit")
    return Path(base).expanduser()


def _path() -> Path:
    return config_dir() / "devices.json"


def load_all() -> dict[str, dict[str, Any]]:
    p = _path()
    if not p.exists():
        return {}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        raise InputError(f"{p} is not a readable devices file", "fix it, or delete it and add the devices again") from None
    return data if isinstance(data, dict) else {}


def _save(data: dict[str, Any]) -> None:
    p = _path()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # tokens inside: the owner only
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
    os.replace(tmp, p)


def add(name: str, url: str, token: str | None) -> dict[str, Any]:
    if not NAME.match(name):
        raise InputError(f"{name!r} is not a device name", "use letters, digits, '.', '_' and '-' (e.g. pi5)")
    data = load_all()
    data[name] = {"url": url.rstrip("/"), "token": token}
    _save(data)
    return data[name]


def remove(name: str) -> None:
    data = load_all()
    if name not in data:
        raise InputError(f"no device called {name!r}", f"known: {', '.join(sorted(data)) or 'none'}")
    del data[name]
    _save(data)


def resolve(device: str, token: str | None = None) -> tuple[str, str, str | None]:
    """(name, url, token) for a device name or an agent URL; a URL's token comes from --token or
    $EDGEKIT_AGENT_TOKEN, a name's from the devices file unless given."""
    token = token or os.environ.get("EDGEKIT_AGENT_TOKEN") or None
    if "://" in device:
        known = {v["url"]: (k, v.get("token")) for k, v in load_all().items()}
        name, saved = known.get(device.rstrip("/"), (None, None))
        from urllib.parse import urlparse

        u = urlparse(device)
        label = name or (f"{u.hostname}:{u.port}" if u.port else str(u.hostname))
        return label, device, token or saved
    data = load_all()
    if device not in data:
        raise InputError(f"no device called {device!r}", f"add it with `edgekit devices add {device} URL --token T`"
                         f" (known: {', '.join(sorted(data)) or 'none'})")
    return device, data[device]["url"], token or data[device].get("token")
