"""``edgekit serve``: an OpenAI-compatible HTTP server over any artifact edgekit can load.

Models are opened (after the memory-fit guard has checked that all of them, with every parallel
session's KV cache, fit the memory available) before the socket is bound, so a bad artifact is one
error line and no half-started server. Loopback only unless an API key protects it.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from edgekit.errors import EdgekitError, InputError, MissingDependencyError


@dataclass
class ServeConfig:
    artifacts: list[str]
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    parallel: int = 1
    queue: int = 64  # requests waiting per model before 429
    n_ctx: int | None = None
    threads: int | None = None  # per session; default: the cores shared among the parallel sessions
    max_tokens: int = 1024
    max_body_bytes: int = 1 << 20
    max_memory: int | str | None = None
    check_memory: bool = True
    allow_remote_without_key: bool = False
    names: list[str] = field(default_factory=list)
    verify: bool = True  # artifact files against their manifest's sha256 before serving
    body_timeout_s: float = 30.0  # a request body must arrive within this
    draft: str | None = None  # decoders decode speculatively with this draft ("prompt-lookup" or an artifact)
    kv_type: str | None = None  # llama.cpp KV-cache type (f16, q8_0, q4_0)
    batch_invariant: bool = False  # decoders: the same greedy text with and without a draft (see TextSession)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def model_name(path: Path, manifest: dict | None) -> str:
    """The id clients use: the artifact directory's name (what `edgekit convert -o` chose), else the file stem."""
    p = Path(path)
    return p.name if p.is_dir() else p.stem


def open_pools(cfg: ServeConfig, metrics):
    """Check memory for everything, then open each artifact's sessions: [ModelPool]."""
    from edgekit.serve.pool import ModelPool
    from edgekit.session import resolve_artifact, runtime_of

    if not cfg.artifacts:
        raise InputError("no artifact to serve", "pass one or more artifact directories or model files")
    if cfg.parallel < 1 or cfg.queue < 0:
        raise InputError("--parallel must be at least 1 and --queue at least 0", "e.g. --parallel 2 --queue 64")
    resolved, names = [], []
    for i, a in enumerate(cfg.artifacts):
        file, runtime, manifest = resolve_artifact(a, cfg.verify)  # a tampered artifact is not served
        rt = runtime_of(file, runtime)
        kind = rt.kind(file)
        name = cfg.names[i] if i < len(cfg.names) else model_name(Path(a), manifest)
        if name in names:
            raise InputError(f"two artifacts would both be served as '{name}'", "give each its own directory name")
        names.append(name)
        resolved.append((Path(a), file, rt, kind, manifest, name))
    if cfg.check_memory:
        from edgekit import memory_fit

        parts = [memory_fit.estimate(a, n_ctx=cfg.n_ctx if kind == "decoder" else None,
                                     parallel=cfg.parallel if kind == "decoder" else 1,
                                     kv_type=cfg.kv_type if kind == "decoder" else None)
                 for a, _, _, kind, _, _ in resolved]
        memory_fit.check_total(parts, [r[-1] for r in resolved], cfg.max_memory, bypass="pass --no-memory-check")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = cfg.threads or max(1, cores // cfg.parallel)
    pools = []
    try:
        for _path, file, rt, kind, manifest, name in resolved:
            opts = {"n_threads": threads}
            if kind == "decoder" and cfg.n_ctx:
                opts["n_ctx"] = cfg.n_ctx
            if kind == "decoder" and cfg.kv_type:
                opts["kv_type"] = cfg.kv_type
            # opened through the runtime itself: the guard above already counted every session
            first = rt.open(file, **opts)
            sessions = [first]
            for _ in range(cfg.parallel - 1 if kind == "decoder" else 0):
                sessions.append(first.sibling() or rt.open(file, **opts))
            if kind == "decoder" and cfg.batch_invariant:
                from edgekit.session import make_batch_invariant

                make_batch_invariant(sessions, rt.name)
            if kind == "decoder" and cfg.draft:  # each session drafts with its own draft cache
                for sess in sessions:
                    sess.use_draft(cfg.draft, n_threads=threads, check_memory=False,
                                   **({"n_ctx": cfg.n_ctx} if cfg.n_ctx else {}))
            pools.append(ModelPool(name, file, kind, sessions, cfg.queue, metrics, manifest))
    except BaseException:
        for p in pools:
            p.close()
        raise
    return pools


def serve(cfg: ServeConfig, ready=lambda url, pools: None) -> None:
    """Open the models, bind the socket, serve until interrupted; ``ready(url, pools)`` once listening."""
    try:
        import uvicorn  # noqa: F401 - only to say what is missing before any work

        from edgekit.serve.app import Limits, create_app
        from edgekit.serve.metrics import ServerMetrics
    except ImportError as exc:
        raise MissingDependencyError(f"edgekit serve needs {exc.name}", "pip install 'edgekit-ml[serve]'") from None
    key = cfg.api_key or os.environ.get("EDGEKIT_API_KEY") or None
    if not _is_loopback(cfg.host) and key is None and not cfg.allow_remote_without_key:
        raise InputError(f"serving on {cfg.host} would let anyone on the network use the models",
                         "set --api-key (or EDGEKIT_API_KEY), or bind 127.0.0.1")
    metrics = ServerMetrics()
    pools = open_pools(cfg, metrics)
    try:
        from edgekit.httpbody import bind, run_server

        sock, host, port = bind(cfg.host, cfg.port)
        app = create_app(pools, metrics, key, Limits(cfg.max_tokens, cfg.max_body_bytes,
                                                          body_timeout_s=cfg.body_timeout_s))
        url = f"http://{host}:{port}/v1"
        run_server(app, sock, lambda: ready(url, pools))
    finally:
        for p in pools:
            p.close()


def announce(url: str, pools) -> None:
    desc = ", ".join(f"{p.name} ({p.kind}, {len(p.sessions)} session{'s' * (len(p.sessions) > 1)})" for p in pools)
    print(f"edgekit serve: listening on {url} - models: {desc}", file=sys.stderr, flush=True)


__all__ = ["ServeConfig", "serve", "open_pools", "announce", "EdgekitError"]
