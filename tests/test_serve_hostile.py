"""`edgekit serve` under hostile clients (loopback only, bounded counts and durations): malformed JSON and wrong
types, missing / wrong keys, huge bodies, slow clients holding connections, many concurrent connections and
path traversal. During every attack a well-behaved client must still be answered, and the server's memory
must stay bounded."""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from tests.conftest import tiny_model
from tests.test_serve import KEY, _raw, _start, _stop


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from edgekit.converters.gguf import GGUFExporter

    d = tmp_path_factory.mktemp("hostile") / "tiny"
    d.mkdir()
    GGUFExporter().export(tiny_model(), d)
    proc, base = _start([str(d / "model.gguf"), "--api-key", KEY, "--parallel", "1", "--queue", "8",
                         "--max-body-bytes", "65536", "--body-timeout", "2", "--name", "tiny"], tmp_path_factory.mktemp("logs") / "s.log")
    yield proc, base
    _stop(proc)


def _chat_body(**kw) -> bytes:
    return json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kw}).encode()


def _good(base: str) -> None:
    """What a well-behaved client gets while the attack runs."""
    status, _, body = _raw(base, "/v1/chat/completions", _chat_body())
    assert status == 200, body[:300]
    assert json.loads(body)["choices"][0]["message"]["role"] == "assistant"


def _during(base: str, attack, n_good: int = 3) -> None:
    """Run ``attack`` in a thread and the good client meanwhile."""
    done = threading.Event()
    errors: list[BaseException] = []

    def run():
        try:
            attack()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            done.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    for _ in range(n_good):
        _good(base)
    t.join(timeout=120)
    assert done.is_set(), "the attack did not end"
    assert not errors, errors[0]


def _envelope(status: int, body: bytes, want: int) -> None:
    assert status == want, (status, body[:300])
    err = json.loads(body)["error"]
    assert isinstance(err["message"], str) and err["message"]


MALFORMED = [b"", b"{", b"[]", b"null", b"\xff\xfe\x00", b'{"model": 3}', b'{"model": "tiny", "messages": "hi"}',
             b'{"model": "tiny", "messages": [], "max_tokens": -5}',
             b'{"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}',
             _chat_body(max_tokens=10**30), _chat_body(temperature="hot"), _chat_body(stop=[1, 2]), _chat_body(seed=1.5),
             _chat_body(top_p=float("nan")), b'{"model": "tiny", "messages": [{"role": "user", "content": {"x": 1}}]}',
             b"[" * 50000 + b"]" * 50000, b'{"model": "' + b"\\ud800" * 100 + b'"}']


def test_malformed_bodies_get_4xx_envelopes_while_others_are_served(server):
    _, base = server
    rng = random.Random(0)

    def attack():
        for k in range(120):
            body = MALFORMED[k % len(MALFORMED)] if k < 60 else bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
            path = rng.choice(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
            status, _, out = _raw(base, path, body)
            assert 400 <= status < 500, (body[:80], status, out[:200])
            _envelope(status, out, status)

    _during(base, attack)


def test_missing_and_wrong_keys_are_401_in_constant_shape(server):
    _, base = server

    def attack():
        for key in [None, "", "wrong", KEY[:-1], KEY + "x", "Bearer " + KEY, "\u00e9" * 40] * 5:
            status, _, out = _raw(base, "/v1/chat/completions", _chat_body(), key=key)
            _envelope(status, out, 401)
        assert _raw(base, "/metrics", key="wrong")[0] == 401

    _during(base, attack)


def test_huge_bodies_are_refused_and_memory_stays_bounded(server):
    proc, base = server
    rss0 = psutil.Process(proc.pid).memory_info().rss

    port = int(base.rsplit(":", 1)[1])

    def attack():
        for size in (70_000, 5_000_000, 20_000_000):  # announced, then refused before the body is read
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                      + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(size).encode() + b"\r\n\r\n"
                      + b'{"model": "tiny", "pad": "' + b"a" * 1000)
            reply = b""
            while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                reply += chunk
            s.close()
            head, _, body = reply.partition(b"\r\n\r\n")
            assert b" 400 " in head.split(b"\r\n", 1)[0], reply[:300]
            assert json.loads(body)["error"]["code"] == "request_too_large"
        # a chunked body without Content-Length, cut off at the limit while it streams
        s = socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])), timeout=30)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                  + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            for _ in range(200):
                s.sendall(b"4000\r\n" + b"a" * 0x4000 + b"\r\n")
        except OSError:
            pass  # the server answered and closed: what it should do
        reply = s.recv(4096)
        s.close()
        assert b" 400 " in reply.split(b"\r\n", 1)[0], reply[:200]

    _during(base, attack)
    grown = psutil.Process(proc.pid).memory_info().rss - rss0
    assert grown < 100 * 2**20, f"the server grew by {grown / 2**20:.0f} MiB"


def test_slow_clients_holding_connections_do_not_block_others(server):
    proc, base = server
    port = int(base.rsplit(":", 1)[1])
    held: list[socket.socket] = []

    def attack():
        for k in range(150):  # slowloris: headers that never end
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow-" + str(k).encode() + b": ")
            held.append(s)
        for _ in range(20):  # bodies that trickle in after honest headers
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                      + b"\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{\"mo")
            held.append(s)
        time.sleep(1.0)
        for s in held[:40]:
            s.sendall(b"a")

    try:
        _during(base, attack, n_good=4)
        _good(base)  # with all of them still held
        # the trickling bodies were answered 408 once --body-timeout (2 s) passed
        for s in held[150:155]:
            s.settimeout(10)
            assert b" 408 " in s.recv(4096).split(b"\r\n", 1)[0]
    finally:
        for s in held:
            s.close()
    _good(base)


def test_many_concurrent_connections_are_all_answered(server):
    _, base = server

    def one(k: int) -> int:
        path = ("/health", "/v1/models")[k % 2]
        return _raw(base, path)[0]

    def attack():
        with ThreadPoolExecutor(48) as ex:
            statuses = list(ex.map(one, range(300)))
        assert set(statuses) == {200}, sorted(set(statuses))

    _during(base, attack)


def test_path_traversal_reaches_no_file(server):
    _, base = server
    for path in ("/v1/models/..%2F..%2F..%2Fetc%2Fpasswd", "/../../../../etc/passwd", "/v1/models/%2e%2e/%2e%2e/etc/passwd",
                 "/static/../../etc/passwd", "/v1/models/tiny/../../../../etc/passwd", "//etc/passwd"):
        status, _, body = _raw(base, path)
        assert status in (401, 404, 405), (path, status)
        assert b"root:" not in body
    _good(base)
