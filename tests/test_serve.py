"""`edgekit serve` driven by the official `openai` client (max_retries=0) over loopback, as real processes:
server A serves a tiny GGUF decoder (2 parallel sessions) and a tiny ONNX encoder behind an API key;
server B serves the packaged SmolLM2 (fast enough to answer, slow enough to keep one session busy) with
one session and a queue of one, for the full-queue and cancellation cases."""

from __future__ import annotations

import base64
import json
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import urllib.error
import urllib.request

import openai

KEY = "test-key-0123456789"
EDGEKIT = str(Path(sys.executable).parent / "edgekit")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cli(verb: str, args: list[str], log: Path, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """``edgekit VERB ARGS --port P`` as a process, once its /health answers: (process, base URL)."""
    import os

    port = _free_port()
    proc = subprocess.Popen([EDGEKIT, verb, *args, "--port", str(port)], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"edgekit {verb} exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, base
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.2)
    proc.kill()
    pytest.fail(f"edgekit {verb} did not answer /health in 120 s: {log.read_text()[-2000:]}")


def _start(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    return start_cli("serve", args, log)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def _raw(base: str, path: str, body: bytes | None = None, key: str | None = KEY, method: str | None = None):
    req = urllib.request.Request(base + path, data=body, method=method or ("POST" if body is not None else "GET"),
                                 headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture(scope="module")
def tiny_artifacts(tmp_path_factory):
    from tests.conftest import tiny_model
    from tests.test_targets import build_tiny_encoder

    from edgekit.converters.gguf import GGUFExporter

    root = tmp_path_factory.mktemp("serve")
    (root / "tiny-chat").mkdir()
    GGUFExporter().export(tiny_model(), root / "tiny-chat")
    enc = build_tiny_encoder(root / "bert", root / "tiny-embed")[1]
    return root / "tiny-chat", enc


@pytest.fixture(scope="module")
def server_a(tiny_artifacts, tmp_path_factory):
    dec, enc = tiny_artifacts
    proc, base = _start([str(dec), str(enc), "--api-key", KEY, "--parallel", "2", "--max-body-bytes", "65536",
                         "--max-tokens", "256", "--n-ctx", "512"], tmp_path_factory.mktemp("logs") / "a.log")
    yield base
    _stop(proc)


@pytest.fixture(scope="module")
def client(server_a):
    return openai.OpenAI(base_url=server_a + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tiny_session(tiny_artifacts):
    import edgekit

    with edgekit.load(tiny_artifacts[0], n_ctx=512) as s:
        yield s


def test_models_list_and_health(client, server_a):
    ids = {m.id: m for m in client.models.list().data}
    assert set(ids) == {"tiny-chat", "tiny-embed"}
    assert all(m.object == "model" and m.owned_by == "edgekit" for m in ids.values())
    status, _, body = _raw(server_a, "/health", key=None)  # open without the key
    assert status == 200 and json.loads(body)["models"]["tiny-chat"]["sessions"] == 2


def test_chat_matches_the_runtime_and_reports_usage(client, tiny_session):
    r = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Hello there"}],
                                       max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "tiny-chat"
    c = r.choices[0]
    assert c.index == 0 and c.message.role == "assistant" and c.finish_reason in ("stop", "length")
    # greedy: the same text edgekit.load gives for the same chat template and prompt
    prompt = tiny_session.chat_prompt([{"role": "user", "content": "Hello there"}])
    ids = tiny_session.tokenize(prompt, special=True)
    assert c.message.content == "".join(tiny_session.decode_stream(tiny_session.stream_tokens(ids, 12)))
    assert r.usage.prompt_tokens == len(ids) and r.usage.total_tokens == len(ids) + r.usage.completion_tokens
    assert (r.usage.completion_tokens == 12) == (c.finish_reason == "length")


def test_streaming_chat_with_and_without_usage(client, server_a):
    chunks = list(client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=8, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.object == "chat.completion.chunk" and ch.usage is None for ch in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    full = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                          temperature=0)
    assert text == full.choices[0].message.content
    with_usage = list(client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=8, temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(ch.usage is None for ch in with_usage[:-1])
    # the wire format: server-sent events ending in [DONE]
    body = json.dumps({"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                       "stream": True}).encode()
    status, headers, raw = _raw(server_a, "/v1/chat/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_completions_sampling_seed_and_stop(client):
    r = client.completions.create(model="tiny-chat", prompt="Once upon a time", max_tokens=10, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny-chat", prompt="Once upon a time", max_tokens=10, temperature=0, stream=True))
    assert streamed == r.choices[0].text
    # sampled with a seed: repeatable; another seed (almost surely) differs
    a, b, c = (client.completions.create(model="tiny-chat", prompt="Once upon a time", max_tokens=16, temperature=1.0,
                                         top_p=0.9, seed=s).choices[0].text for s in (7, 7, 8))
    assert a == b and a != c
    # a stop string cuts the text before it and finishes with "stop"
    words = re.findall(r"\S{3,}", r.choices[0].text)
    assert words, r.choices[0].text
    cut = client.completions.create(model="tiny-chat", prompt="Once upon a time", max_tokens=10, temperature=0,
                                    stop=[words[-1]])
    assert cut.choices[0].finish_reason == "stop" and words[-1] not in cut.choices[0].text
    assert r.choices[0].text.startswith(cut.choices[0].text)


def test_parallel_sessions_answer_concurrent_requests_alike(client):
    def ask(_):
        return client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Count"}],
                                              max_tokens=24, temperature=0).choices[0].message.content

    with ThreadPoolExecutor(6) as ex:
        answers = list(ex.map(ask, range(6)))
    assert len(set(answers)) == 1 and answers[0]


def test_embeddings_float_and_base64(client, tiny_artifacts):
    import edgekit

    texts = ["the cat sat on the mat", "quarterly revenue grew"]
    with edgekit.load(tiny_artifacts[1]) as s:
        want = s.embed(texts)
    as_float = client.embeddings.create(model="tiny-embed", input=texts, encoding_format="float")
    default = client.embeddings.create(model="tiny-embed", input=texts)  # the client asks for base64 and decodes
    for r in (as_float, default):
        got = np.array([d.embedding for d in r.data], dtype=np.float32)
        assert [d.index for d in r.data] == [0, 1] and np.allclose(got, want, atol=1e-6)
        assert r.usage.prompt_tokens > 0
    raw = client.embeddings.with_raw_response.create(model="tiny-embed", input="x", encoding_format="base64")
    vec = np.frombuffer(base64.b64decode(json.loads(raw.text)["data"][0]["embedding"]), "<f4")
    assert vec.shape == (want.shape[1],)


def test_errors_are_openai_envelopes_with_the_right_status(client, server_a):
    bad = openai.OpenAI(base_url=server_a + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.BadRequestError) as e:  # prompt + max_tokens beyond n_ctx 512
        client.completions.create(model="tiny-chat", prompt="word " * 600, max_tokens=8)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-chat", prompt="hi", max_tokens=100_000)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):  # an encoder does not chat
        client.chat.completions.create(model="tiny-embed", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}], temperature=5)
    status, _, body = _raw(server_a, "/v1/chat/completions", b"x" * 100_000)  # over --max-body-bytes
    err = json.loads(body)["error"]
    assert status == 400 and "limit" in err["message"] and set(err) == {"message", "type", "param", "code"}
    status, _, body = _raw(server_a, "/v1/chat/completions", b"{not json")
    assert status == 400 and json.loads(body)["error"]["message"]
    status, _, _ = _raw(server_a, "/metrics", key=None)
    assert status == 401
    status, _, body = _raw(server_a, "/metrics")
    text = body.decode()
    assert status == 200 and 'edgekit_requests_total{endpoint="/v1/chat/completions",model="tiny-chat",status="200"}' in text
    assert "edgekit_time_to_first_token_seconds_bucket" in text and "edgekit_queue_depth" in text


# ---------------------------------------------------------------------- one busy session: queue and cancel


@pytest.fixture(scope="module")
def server_b(tmp_path_factory):
    from edgekit.sources import default_model_path

    proc, base = _start([str(default_model_path()), "--parallel", "1", "--queue", "1", "--name", "smollm2"],
                        tmp_path_factory.mktemp("logs") / "b.log")
    yield base
    _stop(proc)


def _metric(base: str, name: str) -> float:
    text = _raw(base, "/metrics")[2].decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_a_full_queue_answers_429_with_retry_after(server_b):
    c = openai.OpenAI(base_url=server_b + "/v1", api_key="unused", max_retries=0, timeout=120)
    ask = lambda n: c.chat.completions.create(  # noqa: E731
        model="smollm2", messages=[{"role": "user", "content": "Count from 1 to 500, one number per line."}],
        max_tokens=n, temperature=0)
    gauge = lambda name: _metric(server_b, name + "{")  # noqa: E731
    with ThreadPoolExecutor(2) as ex:
        # wait for each state itself (one generating, then one queued) instead of guessing it with sleeps
        running = ex.submit(ask, 200)
        deadline = time.monotonic() + 60
        while gauge("edgekit_running") != 1:
            assert time.monotonic() < deadline and not running.done(), "the first request never ran"
            time.sleep(0.05)
        waiting = ex.submit(ask, 8)
        while gauge("edgekit_queue_depth") != 1:
            assert time.monotonic() < deadline and not running.done(), "the second request never queued"
            time.sleep(0.05)
        with pytest.raises(openai.RateLimitError) as e:
            ask(8)
        assert int(e.value.response.headers["retry-after"]) >= 1
        assert running.result().choices[0].message.content and waiting.result().choices[0].message.content


def test_a_disconnected_stream_cancels_its_generation(server_b):
    before = _metric(server_b, "edgekit_tokens_total{kind=\"completion\"")
    body = json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "Write a long essay."}],
                       "max_tokens": 1000, "stream": True, "temperature": 0}).encode()
    host, port = server_b.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    got = b""
    while got.count(b"data: ") < 5:
        data = sock.recv(4096)
        assert data, f"the server closed the stream: {got[-500:]!r}"
        got += data
    assert got.startswith(b"HTTP/1.1 200"), got[:300]
    sock.close()  # the client goes away after a few tokens
    deadline = time.monotonic() + 30
    while _metric(server_b, "edgekit_cancelled_total") < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _metric(server_b, "edgekit_cancelled_total") == 1
    done = _metric(server_b, "edgekit_tokens_total{kind=\"completion\"") - before
    assert 0 < done < 1000  # stopped long before max_tokens
    # the session is free again: a new request is answered at once
    c = openai.OpenAI(base_url=server_b + "/v1", api_key="unused", max_retries=0, timeout=30)
    assert c.completions.create(model="smollm2", prompt="Hi", max_tokens=2).choices[0].text is not None


def test_bad_invocations_fail_in_one_line(tiny_artifacts, tmp_path):
    from tests.conftest import run_cli

    r = run_cli("serve", str(tmp_path / "missing"), "--port", "0")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("serve", str(tiny_artifacts[0]), "--host", "0.0.0.0", "--port", "0")
    assert r.returncode == 2 and "api-key" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("serve", str(tiny_artifacts[0]), "--port", "0", "--max-memory", "1MB")
    assert r.returncode == 2 and "needs" in r.stderr and len(r.stderr.strip().splitlines()) == 1



def test_batch_invariant_serving_with_a_draft_answers_the_plain_greedy_text(tmp_path):
    """Plumbing: the flag reaches the sessions and serving still answers what ``load`` decodes (the tiny model has no
    near-ties, so the kernels' row-count effect itself is tested in test_speculative)."""
    import edgekit
    from tests.conftest import tiny_model

    from edgekit.converters.gguf import GGUFExporter
    from edgekit.passes import PassContext
    from edgekit.passes.rtn import Q4_0Pass

    m = tiny_model(intermediate_size=256)
    Q4_0Pass().apply(m, PassContext())
    (tmp_path / "q4").mkdir()
    GGUFExporter().export(m, tmp_path / "q4")
    prompt = "The capital of France is Paris, and the capital of Italy is Rome. The capital of France is"
    with edgekit.load(tmp_path / "q4", n_ctx=512, batch_invariant=True) as s:
        want = s.generate(prompt, max_tokens=40)
    proc, base = _start([str(tmp_path / "q4"), "--n-ctx", "512", "--batch-invariant", "--draft", "prompt-lookup"],
                        tmp_path / "serve.log")
    try:
        body = json.dumps({"model": "q4", "prompt": prompt, "max_tokens": 40, "temperature": 0}).encode()
        status, _, raw = _raw(base, "/v1/completions", body, key=None)
        assert status == 200, raw
        assert json.loads(raw)["choices"][0]["text"] == want
    finally:
        _stop(proc)
