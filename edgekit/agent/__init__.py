"""``edgekit agent``: runs on the device (phone under Termux, board, laptop) and measures artifacts the host
pushes, with the same harness ``edgekit profile`` uses on the host. No torch on this path.

Loopback by default. Listening on another interface needs ``--allow-remote``; without ``--tls-cert`` /
``--tls-key`` the token then travels in clear text, and the agent says so when it starts.
"""

from __future__ import annotations

import ipaddress
import sys
from dataclasses import dataclass
from pathlib import Path

from edgekit.errors import InputError, MissingDependencyError

DEFAULT_PORT = 8765


@dataclass
class AgentConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    storage: Path = Path("~/.cache/edgekit-agent")
    token_file: Path | None = None  # default: STORAGE/token
    max_storage_bytes: int = 20 * 10**9
    max_blob_bytes: int | None = None  # default: the storage quota
    max_chunk_bytes: int = 16 << 20
    max_queue: int = 8
    max_job_memory_bytes: int | None = None  # default: 90% of RAM
    max_job_timeout_s: float = 6 * 3600
    allow_remote: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    body_timeout_s: float = 60.0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_agent(cfg: AgentConfig, ready=None) -> None:
    """Open the storage, bind the socket, serve until interrupted; ``ready(url, token, created)`` once listening."""
    try:
        import uvicorn  # noqa: F401 - only to say what is missing before any work

        from edgekit.agent.app import AgentLimits, create_app
    except ImportError as exc:
        raise MissingDependencyError(f"edgekit agent needs {exc.name}", "pip install 'edgekit-ml[agent]'") from None
    from edgekit.agent import auth
    from edgekit.agent.jobs import JobRunner
    from edgekit.agent.store import BlobStore

    if not is_loopback(cfg.host) and not cfg.allow_remote:
        raise InputError(f"listening on {cfg.host} would expose the agent beyond this device",
                         "pass --allow-remote (and --tls-cert/--tls-key so the token is not sent in clear), or bind 127.0.0.1")
    if (cfg.tls_cert is None) != (cfg.tls_key is None):
        raise InputError("--tls-cert and --tls-key go together", "pass both, or neither")
    for p in (cfg.tls_cert, cfg.tls_key):
        if p is not None and not Path(p).is_file():
            raise InputError(f"{p} does not exist", "pass the PEM certificate and key files")
    storage = Path(cfg.storage).expanduser()
    try:
        storage.mkdir(parents=True, exist_ok=True)
        store = BlobStore(storage, cfg.max_storage_bytes, cfg.max_blob_bytes)
    except OSError as exc:
        raise InputError(f"cannot use {storage} as the agent's storage ({exc.strerror or exc})", "pass --storage DIR") from None
    token, created = auth.load_or_create(Path(cfg.token_file).expanduser() if cfg.token_file else storage / "token")
    runner = JobRunner(store, cfg.max_queue, cfg.max_job_memory_bytes, cfg.max_job_timeout_s)
    app = create_app(store, runner, token, AgentLimits(1 << 20, cfg.max_chunk_bytes, cfg.body_timeout_s))
    from edgekit.httpbody import bind, run_server

    sock, host, port = bind(cfg.host, cfg.port)
    tls = cfg.tls_cert is not None
    url = f"{'https' if tls else 'http'}://{host}:{port}"
    run_server(app, sock, lambda: (ready or announce)(url, token, created, cfg, tls), timeout_keep_alive=30,
               ssl_certfile=str(cfg.tls_cert) if tls else None, ssl_keyfile=str(cfg.tls_key) if tls else None)


def announce(url: str, token: str, created: bool, cfg: AgentConfig, tls: bool) -> None:
    print(f"edgekit agent: listening on {url} - storage {Path(cfg.storage).expanduser()}", file=sys.stderr, flush=True)
    where = cfg.token_file or Path(cfg.storage).expanduser() / "token"
    if created:  # shown once: later starts read it from the file (mode 0600)
        print(f"edgekit agent: token (shown once; stored in {where}): {token}", file=sys.stderr, flush=True)
        print(f"edgekit agent: on the host: edgekit devices add NAME {url} --token {token}", file=sys.stderr, flush=True)
    else:
        print(f"edgekit agent: token in {where}", file=sys.stderr, flush=True)
    if not is_loopback(cfg.host) and not tls:
        print("edgekit agent: warning: no TLS (--tls-cert/--tls-key): the token and artifacts travel in clear text on "
              "this network", file=sys.stderr, flush=True)
