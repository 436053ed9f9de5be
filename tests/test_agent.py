"""`edgekit agent` as a real process on loopback with its own storage directory, standing in for a device, and the
host side (`edgekit profile --device`, `edgekit devices`, `edgekit calibrate --device`) talking to it.

Every refusal the agent makes is checked for its status code, its one-line error and that nothing was written
outside the storage directory."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest

from tests.conftest import run_cli, tiny_model
from tests.test_serve import _free_port, start_cli
from tests.test_serve import _stop as stop

EDGEKIT = str(Path(sys.executable).parent / "edgekit")
MB = 1 << 20


def start_agent(storage: Path, log: Path, *extra: str, env: dict | None = None) -> tuple[subprocess.Popen, str, str]:
    proc, url = start_cli("agent", ["--storage", str(storage), *extra], log, env)
    return proc, url, (storage / "token").read_text().strip()


def raw(url: str, path: str, body: bytes | None = None, token: str | None = None, method: str | None = None,
        headers: dict | None = None) -> tuple[int, dict]:
    h = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
    req = urllib.request.Request(url + path, data=body, method=method or ("POST" if body is not None else "GET"), headers=h)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            data = r.read()
            return r.status, json.loads(data) if data else {}
    except urllib.error.HTTPError as e:
        data = e.read()
        try:
            return e.code, json.loads(data) if data else {}
        except ValueError:
            return e.code, {"raw": data[:200]}


@pytest.fixture(scope="module")
def tiny_art(tmp_path_factory):
    """A q8_0 GGUF artifact with its manifest, converted from a tiny float GGUF (its quality reference)."""
    from edgekit.converters.gguf import GGUFExporter
    from edgekit.pipeline import ConvertRequest, convert

    root = tmp_path_factory.mktemp("agent-art")
    (root / "f32").mkdir()
    GGUFExporter().export(tiny_model(), root / "f32")
    convert(ConvertRequest(str(root / "f32" / "model.gguf"), "gguf", "q8_0", root / "q8", eval_tokens=512))
    return root / "q8", root / "f32" / "model.gguf"


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    root = tmp_path_factory.mktemp("agent")
    storage = root / "storage"
    # the device side never needs torch: here `import torch` fails in the agent and every job it runs
    fake = tmp_path_factory.mktemp("no-torch")
    (fake / "torch").mkdir()
    (fake / "torch" / "__init__.py").write_text('raise ImportError("the agent must not import torch")\n')
    proc, url, token = start_agent(storage, root / "agent.log", "--max-storage", "0.2", "--max-blob", "0.05",
                                   "--max-chunk", "4", "--body-timeout", "2", env={"PYTHONPATH": str(fake)})
    yield {"url": url, "token": token, "storage": storage, "root": root, "proc": proc}
    stop(proc)


@pytest.fixture(scope="module")
def client(agent):
    from edgekit.agent.client import AgentClient

    return AgentClient(agent["url"], agent["token"])


def _outside_untouched(agent) -> None:
    """The agent's working folder holds its storage and log and nothing else."""
    assert sorted(p.name for p in agent["root"].iterdir()) == ["agent.log", "storage"]


# ---------------------------------------------------------------------------------------------- auth and binding


def test_health_is_open_and_everything_else_needs_the_token(agent):
    assert raw(agent["url"], "/health") == (200, {"status": "ok", "agent": "edgekit", "protocol": 1,
                                                   "version": raw(agent["url"], "/health")[1]["version"]})
    for token in (None, "wrong-token-" + "x" * 30, agent["token"][:-1]):
        status, body = raw(agent["url"], "/v1/device", token=token)
        assert status == 401 and body["error"]["code"] == "invalid_token"
    # refused before the body is read: a 100 MB announcement without the token costs nothing
    status, body = raw(agent["url"], "/v1/blobs/" + "0" * 64 + "?offset=0&total=1", b"x", method="PUT",
                       headers={"Content-Length": "1"})
    assert status == 401
    status, facts = raw(agent["url"], "/v1/device", token=agent["token"])
    assert status == 200 and facts["ram_total_bytes"] > 0 and "llamacpp" in facts["runtimes"]
    assert {"os", "cpu", "accelerators", "energy_meter", "now"} <= set(facts)


def test_token_file_is_private_and_a_readable_one_is_refused(agent, tmp_path):
    token_file = agent["storage"] / "token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    shared = tmp_path / "token"
    shared.write_text("a-token-others-can-read-0123456789\n")
    shared.chmod(0o644)
    r = subprocess.run([EDGEKIT, "agent", "--storage", str(tmp_path / "s"), "--token-file", str(shared), "--port", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "readable by other users" in r.stderr, r.stderr


def test_listening_beyond_loopback_needs_an_explicit_flag(tmp_path):
    r = subprocess.run([EDGEKIT, "agent", "--storage", str(tmp_path / "s"), "--host", "0.0.0.0", "--port", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and r.stderr.startswith("error: ") and "--allow-remote" in r.stderr and r.stderr.count("\n") == 1
    r = subprocess.run([EDGEKIT, "agent", "--storage", str(tmp_path / "s"), "--tls-cert", str(tmp_path / "c.pem"), "--port", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--tls-key" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").rglob("*.gguf"))


# ---------------------------------------------------------------------------------------------- uploads


def test_a_second_push_of_the_same_artifact_sends_no_weight_bytes(agent, client, tiny_art):
    art, _ = tiny_art
    size = sum(p.stat().st_size for p in art.iterdir())
    before = client.storage()["bytes_received"]
    first = client.push_artifact(art)
    after_first = client.storage()["bytes_received"]
    second = client.push_artifact(art)
    after_second = client.storage()["bytes_received"]
    assert first["sent_bytes"] + first["skipped_bytes"] == size
    assert after_first - before == first["sent_bytes"]
    assert second == {"artifact": first["artifact"], "sent_bytes": 0, "skipped_bytes": size, "files": 2}
    assert after_second == after_first  # the agent received nothing the second time
    stored = agent["storage"] / "artifacts" / first["artifact"]
    assert sorted(p.name for p in stored.iterdir()) == ["manifest.json", "model.gguf"]
    _outside_untouched(agent)


def test_an_interrupted_upload_resumes_where_it_stopped(agent, client, tmp_path):
    data = np.random.default_rng(1).bytes(3 * MB + 123)
    f = tmp_path / "blob.bin"
    f.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    first = data[:MB]
    status, body = raw(agent["url"], f"/v1/blobs/{digest}?offset=0&total={len(data)}", first, agent["token"], "PUT",
                       {"X-Chunk-Sha256": hashlib.sha256(first).hexdigest(), "Content-Type": "application/octet-stream"})
    assert status == 200 and body == {"offset": MB, "complete": False}
    status, st = raw(agent["url"], f"/v1/uploads/{digest}", token=agent["token"])
    assert status == 200 and st == {"offset": MB, "total": len(data), "complete": False}
    before = client.storage()["bytes_received"]
    sent = client.upload(f, digest, chunk=MB)  # the "host crashed" and pushes again
    assert sent == len(data) - MB
    assert client.storage()["bytes_received"] - before == len(data) - MB
    assert client.has_blob(digest)
    assert (agent["storage"] / "blobs" / digest).read_bytes() == data


def test_an_upload_resumes_after_the_agent_restarts(tmp_path):
    from edgekit.agent.store import BlobStore

    data = np.random.default_rng(2).bytes(2 * MB)
    digest = hashlib.sha256(data).hexdigest()
    a = BlobStore(tmp_path, 10 * MB)
    a.put_chunk(digest, 0, len(data), data[:MB], hashlib.sha256(data[:MB]).hexdigest())
    b = BlobStore(tmp_path, 10 * MB)  # a new process: the hash state is rebuilt from the partial file
    assert b.upload_status(digest) == {"offset": MB, "total": len(data), "complete": False}
    assert b.put_chunk(digest, MB, len(data), data[MB:], hashlib.sha256(data[MB:]).hexdigest())["complete"]
    assert (tmp_path / "blobs" / digest).read_bytes() == data


def test_a_corrupted_chunk_and_a_wrong_digest_are_refused(agent, client):
    data = np.random.default_rng(3).bytes(MB)
    digest = hashlib.sha256(data).hexdigest()
    damaged = bytearray(data[: MB // 2])
    damaged[100] ^= 0x01
    status, body = raw(agent["url"], f"/v1/blobs/{digest}?offset=0&total={len(data)}", bytes(damaged), agent["token"], "PUT",
                       {"X-Chunk-Sha256": hashlib.sha256(data[: MB // 2]).hexdigest()})  # the header of the good chunk
    assert status == 400 and body["error"]["code"] == "chunk_digest_mismatch"
    assert raw(agent["url"], f"/v1/uploads/{digest}", token=agent["token"])[0] == 404  # nothing was written
    # consistent chunks whose whole does not hash to the name: discarded at the end
    other = np.random.default_rng(4).bytes(MB)
    status, body = raw(agent["url"], f"/v1/blobs/{digest}?offset=0&total={MB}", other, agent["token"], "PUT",
                       {"X-Chunk-Sha256": hashlib.sha256(other).hexdigest()})
    assert status == 400 and body["error"]["code"] == "digest_mismatch"
    assert not client.has_blob(digest) and not (agent["storage"] / "partial" / digest).exists()
    # a chunk without its digest, an offset that skips ahead, a name that is not a digest
    assert raw(agent["url"], f"/v1/blobs/{digest}?offset=0&total={MB}", data, agent["token"], "PUT")[1]["error"]["code"] \
        == "chunk_digest_required"
    status, body = raw(agent["url"], f"/v1/blobs/{digest}?offset=4096&total={MB}", data[:10], agent["token"], "PUT",
                       {"X-Chunk-Sha256": hashlib.sha256(data[:10]).hexdigest()})
    assert status == 409 and body["error"]["offset"] == 0
    assert raw(agent["url"], "/v1/blobs/..%2F..%2Fetc?offset=0&total=1", b"x", agent["token"], "PUT",
               {"X-Chunk-Sha256": hashlib.sha256(b"x").hexdigest()})[0] in (400, 404)
    _outside_untouched(agent)


def test_oversized_uploads_and_bodies_are_refused(agent):
    digest = "a" * 64
    # a blob over --max-blob (50 MB), announced in its first chunk
    status, body = raw(agent["url"], f"/v1/blobs/{digest}?offset=0&total={60 * 10**6}", b"x", agent["token"], "PUT",
                       {"X-Chunk-Sha256": hashlib.sha256(b"x").hexdigest()})
    assert status == 413 and body["error"]["code"] == "blob_too_large"
    # one request over --max-chunk (4 MB) and a JSON body over 1 MiB: refused from their Content-Length, before a
    # byte of the body is read (the client announces and sends nothing)
    reply = announce(agent, f"PUT /v1/blobs/{digest}?offset=0&total={5 * 10**6}", 5 * 10**6)
    assert reply.startswith("HTTP/1.1 413") and "request_too_large" in reply
    assert announce(agent, "POST /v1/jobs", 2 * MB).startswith("HTTP/1.1 413")
    # a 2 MB chunked JSON body: refused once the limit is passed while it streams in
    host, port = agent["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall((f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {agent['token']}\r\n"
                   "Transfer-Encoding: chunked\r\n\r\n").encode())
        try:
            for _ in range(32):
                s.sendall(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")
        except OSError:
            pass  # the agent answered and closed while we were still sending
        assert s.recv(4096).decode(errors="replace").startswith("HTTP/1.1 413")
    assert not any((agent["storage"] / "partial").iterdir())


def announce(agent, request_line: str, length: int) -> str:
    """Send only the headers of a request announcing ``length`` bytes; return the first bytes of the reply."""
    host, port = agent["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall((f"{request_line} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {agent['token']}\r\n"
                   f"Content-Type: application/json\r\nX-Chunk-Sha256: {'0' * 64}\r\nContent-Length: {length}\r\n\r\n").encode())
        reply = b""
        while not reply.rstrip().endswith(b"}"):
            part = s.recv(4096)
            if not part:
                break
            reply += part
        return reply.decode(errors="replace")


def test_a_trickling_body_gets_408(agent):
    host, port = agent["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall((f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {agent['token']}\r\n"
                   "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{").encode())
        t0 = time.monotonic()
        reply = s.recv(4096).decode(errors="replace")
    assert " 408 " in reply.splitlines()[0] and time.monotonic() - t0 < 8


def test_storage_quota_evicts_the_least_recently_used_blobs(tmp_path):
    from edgekit.agent.store import BlobStore, StoreError

    store = BlobStore(tmp_path, 3 * MB + 10)
    blobs = [np.random.default_rng(10 + i).bytes(MB) for i in range(4)]
    names = [hashlib.sha256(b).hexdigest() for b in blobs]
    for d, b in zip(names[:3], blobs[:3]):
        store.put_chunk(d, 0, MB, b, hashlib.sha256(b).hexdigest())
    art = store.create_artifact([{"path": "model.gguf", "sha256": names[1], "bytes": MB}])["artifact"]
    for i, d in enumerate(names[:3]):  # used in this order, long ago
        os.utime(tmp_path / "blobs" / d, (1000 + i, 1000 + i))
    store.has(names[0])  # used again: now the most recent, so names[1] is the least recently used
    store.put_chunk(names[3], 0, MB, blobs[3], hashlib.sha256(blobs[3]).hexdigest())
    assert store.has(names[1]) is None and store.has(names[0]) == MB and store.has(names[2]) == MB
    assert not (tmp_path / "artifacts" / art).exists()  # the artifact made of the evicted blob went with it
    # blobs a queued job needs are never evicted: with everything pinned, the upload is refused
    for d in names[2:]:
        a = store.create_artifact([{"path": "m.gguf", "sha256": d, "bytes": MB}])["artifact"]
        store.pins[a] += 1
    a0 = store.create_artifact([{"path": "m.gguf", "sha256": names[0], "bytes": MB}])["artifact"]
    store.pins[a0] += 1
    extra = np.random.default_rng(99).bytes(MB)
    with pytest.raises(StoreError) as e:
        store.put_chunk(hashlib.sha256(extra).hexdigest(), 0, MB, extra, hashlib.sha256(extra).hexdigest())
    assert e.value.status == 507


# ---------------------------------------------------------------------------------------------- artifacts


@pytest.mark.parametrize("path", ["../../escape.gguf", "/etc/escape.gguf", "a/../../escape.gguf", "a\\..\\escape", "", ".",
                                  "a//b", "x\0y"])
def test_path_traversal_in_the_file_list_is_refused(agent, client, path, tmp_path):
    digest = client.upload_bytes(b"weights", tmp_path)  # a stored blob to point at
    status, body = raw(agent["url"], "/v1/artifacts", json.dumps({"files": [{"path": path, "sha256": digest, "bytes": 7}]}).encode(),
                       agent["token"])
    assert status == 400 and body["error"]["code"] == "unsafe_path", body
    _outside_untouched(agent)


def test_a_manifest_naming_a_file_outside_the_artifact_is_refused(agent, client, tmp_path):
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"GGUF-ish bytes")
    w = hashlib.sha256(weights.read_bytes()).hexdigest()
    manifest = {"artifact": {"file": "model.gguf"}, "files": [{"path": "../../../tmp/evil.gguf", "bytes": 14, "sha256": w}]}
    m = json.dumps(manifest).encode()
    md = client.upload_bytes(m, tmp_path)
    client.upload(weights, w)
    status, body = raw(agent["url"], "/v1/artifacts", json.dumps({"files": [
        {"path": "manifest.json", "sha256": md, "bytes": len(m)}, {"path": "model.gguf", "sha256": w, "bytes": 14}]}).encode(),
        agent["token"])
    assert status == 400 and body["error"]["code"] == "unsafe_path", body
    assert not Path("/tmp/evil.gguf").exists()
    # a manifest listing a file that was not pushed with that digest
    manifest["files"] = [{"path": "model.gguf", "bytes": 14, "sha256": "b" * 64}]
    m = json.dumps(manifest).encode()
    md = client.upload_bytes(m, tmp_path)
    status, body = raw(agent["url"], "/v1/artifacts", json.dumps({"files": [
        {"path": "manifest.json", "sha256": md, "bytes": len(m)}, {"path": "model.gguf", "sha256": w, "bytes": 14}]}).encode(),
        agent["token"])
    assert status == 400 and body["error"]["code"] == "manifest_mismatch"
    # blobs not uploaded: the agent says which
    status, body = raw(agent["url"], "/v1/artifacts", json.dumps({"files": [{"path": "x.gguf", "sha256": "c" * 64, "bytes": 1}]}).encode(),
                       agent["token"])
    assert status == 409 and body["error"]["missing"] == ["c" * 64]
    _outside_untouched(agent)


# ---------------------------------------------------------------------------------------------- jobs


def test_job_specs_are_validated_before_anything_runs(agent, client, tiny_art):
    art = client.push_artifact(tiny_art[0])["artifact"]
    cases = [
        ({"artifact": art, "command": "rm -rf /"}, 400),  # unknown keys are errors: nothing runs user code
        ({"artifact": art, "measure": ["quality"]}, 400),  # quality without its inputs
        ({"artifact": art, "measure": ["speed", "shell"]}, 400),
        ({"artifact": art, "threads": 0}, 400),
        ({"artifact": art, "timeout_s": -1}, 400),
        ({"artifact": art, "backend": {"execution_provider": "../../lib.so"}}, 400),
        ({"artifact": "0" * 32}, 404),
        ({"artifact": "../../etc"}, 400),
        ({"artifact": art, "text_blob": "d" * 64}, 409),
    ]
    for spec, want in cases:
        status, body = raw(agent["url"], "/v1/jobs", json.dumps(spec).encode(), agent["token"])
        assert status == want and body["error"]["message"], (spec, status, body)
    assert raw(agent["url"], "/v1/jobs/" + "e" * 32, token=agent["token"])[0] == 404


def _no_worker_left(timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in psutil.process_iter(["cmdline"]) if "edgekit.agent.worker" in " ".join(p.info["cmdline"] or [])
                 or "edgekit.harness.speed" in " ".join(p.info["cmdline"] or [])]
        if not alive:
            return True
        time.sleep(0.2)
    return False


def test_a_job_past_its_timeout_or_memory_limit_is_stopped(agent, client, tiny_art):
    art = client.push_artifact(tiny_art[0])["artifact"]
    job = client.submit({"artifact": art, "measure": ["speed"], "reps": 100, "decode_tokens": 1000, "timeout_s": 3})
    st = client.wait(job, poll_s=0.2)
    assert st["state"] == "timeout" and "timeout of 3 s" in st["error"] and st["result"] is None
    assert st["finished"] - st["started"] < 15
    assert _no_worker_left()  # the whole process group went, the speed harness's child included
    job = client.submit({"artifact": art, "measure": ["speed"], "max_memory_bytes": 20 * MB})
    st = client.wait(job, poll_s=0.2)
    assert st["state"] == "memory" and "over its limit" in st["error"]
    assert _no_worker_left()
    # the agent goes on: the next job runs
    job = client.submit({"artifact": art, "measure": ["speed"], "reps": 1, "load_reps": 1, "decode_tokens": 8,
                         "prefill_tokens": 64, "prompt_tokens": 16})
    st = client.wait(job, poll_s=0.2)
    assert st["state"] == "done" and st["result"]["speed"]["decode_tok_s"] > 0
    assert len(st["result"]["speed"]["repetitions"]["decode_tok_s"]) == 1


def test_job_progress_streams_as_server_sent_events(agent, client, tiny_art):
    art = client.push_artifact(tiny_art[0])["artifact"]
    job = client.submit({"artifact": art, "measure": ["speed"], "reps": 1, "load_reps": 1, "decode_tokens": 4,
                         "prefill_tokens": 32, "prompt_tokens": 8, "backend": {"execution_provider": "CUDAExecutionProvider"}})
    req = urllib.request.Request(agent["url"] + f"/v1/jobs/{job}/events", headers={"Authorization": f"Bearer {agent['token']}"})
    with urllib.request.urlopen(req, timeout=120) as r:
        text = r.read().decode()
    events = [ln.split(": ", 1)[1] for ln in text.splitlines() if ln.startswith("event: ")]
    assert events[-1] == "failed"  # this edgekit ONNX/llama.cpp session has no CUDA provider: one line, not a crash
    last = json.loads(text.strip().splitlines()[-1].split("data: ", 1)[1])
    assert "not supported" in last["error"] and "\n" not in last["error"]


# ---------------------------------------------------------------------------------------------- host side


def test_profile_on_the_device_matches_a_local_profile(agent, tiny_art, tmp_path):
    art, ref = tiny_art
    env = {"EDGEKIT_CONFIG_DIR": str(tmp_path / "config")}
    common = ["--reps", "2", "--decode-tokens", "16", "--reference", str(ref), "--json"]
    local = run_cli("profile", str(art), *common, env=env)
    assert local.returncode == 0, local.stderr[-2000:]
    r = run_cli("devices", "add", "loop", agent["url"], "--token", agent["token"], env=env)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE((tmp_path / "config" / "devices.json").stat().st_mode) == 0o600
    remote = run_cli("profile", str(art), *common, "--device", "loop", env=env)
    assert remote.returncode == 0, remote.stderr[-2000:]
    lq, rq = json.loads(local.stdout), json.loads(remote.stdout)
    assert set(rq) == set(lq) | {"device"}
    for k in ("kld_mean", "kld_p99", "top1_agreement", "ppl", "ref_ppl"):
        assert abs(rq["quality"][k] - lq["quality"][k]) <= 1e-6 * max(1.0, abs(lq["quality"][k])), k
    assert rq["quality"]["tokens"] == lq["quality"]["tokens"] and rq["quality"]["reference"] == lq["quality"]["reference"]
    d = rq["device"]
    assert d["name"] == "loop" and d["facts"]["runtimes"]["llamacpp"] and d["before"]["ram_available_bytes"] > 0
    assert d["energy"]["available"] in (True, False) and (d["energy"]["available"] or d["energy"]["why"])
    assert d["machine"]["read_bandwidth_bytes_s"] > 0 and rq["roofline_percent"]["decode"] > 0
    assert len(rq["repetitions"]["decode_tok_s"]) == 2
    # `edgekit report` lists the device's measurement next to the host's
    from edgekit.report_html import render_html
    from edgekit.targets.report_data import collect

    page = render_html(collect([str(art)], ["raspberry-pi-5"]))
    assert "Measured on devices (edgekit agent)" in page and ">loop" in page
    # a wrong token is one line
    bad = run_cli("profile", str(art), "--device", agent["url"], "--token", "nope-" * 8, "--json", env=env)
    assert bad.returncode != 0 and bad.stderr.startswith("error: ") and "401" in bad.stderr and bad.stderr.count("\n") == 1


def test_a_tampered_artifact_is_not_pushed(agent, tiny_art, tmp_path):
    import shutil

    copy = tmp_path / "q8"
    shutil.copytree(tiny_art[0], copy)
    gguf = copy / "model.gguf"
    data = bytearray(gguf.read_bytes())
    data[-100] ^= 0x01
    gguf.write_bytes(bytes(data))
    r = run_cli("profile", str(copy), "--device", agent["url"], "--token", agent["token"], "--no-quality", "--json")
    assert r.returncode != 0 and "sha256" in r.stderr and r.stderr.count("\n") == 1


def test_energy_meters_read_rapl_with_wraparound_and_battery_power(tmp_path):
    from edgekit.agent import energy

    zone = tmp_path / "powercap" / "intel-rapl:0"
    zone.mkdir(parents=True)
    (zone / "name").write_text("package-0\n")
    (zone / "max_energy_range_uj").write_text("1000000\n")
    (zone / "energy_uj").write_text("900000\n")
    (tmp_path / "powercap" / "intel-rapl:0:0").mkdir()  # a sub-domain: part of the package, not added
    (tmp_path / "powercap" / "intel-rapl:0:0" / "energy_uj").write_text("5\n")
    m = energy.meter(tmp_path)
    assert isinstance(m, energy.Rapl) and len(m.zones) == 1
    m.start()
    (zone / "energy_uj").write_text("400000\n")  # wrapped: 100,000 + 400,000 uJ
    got = m.stop()
    assert got["joules"] == pytest.approx(0.5) and got["domains"] == ["package-0"]
    speed = {"decode_tok_s": 50.0, "ttft_ms": 100.0, "settings": {"decode_tokens": 11, "prompt_tokens": 8}}
    per = energy.per_token(got | {"seconds": 1.0}, speed)
    assert per["joules_per_token"] == pytest.approx(0.5 / 50) and per["joules_per_request"] == pytest.approx(0.5 * (0.1 + 10 / 50))
    assert energy.per_token(None, speed)["available"] is False
    bat = tmp_path / "ps" / "battery"
    bat.mkdir(parents=True)
    for k, v in {"type": "Battery", "status": "Discharging", "current_now": "500000", "voltage_now": "4000000"}.items():
        (bat / k).write_text(v + "\n")
    b = energy.Battery(tmp_path / "ps", period_s=0.01)
    b.start()
    time.sleep(0.2)
    got = b.stop()
    assert got["joules"] == pytest.approx(2.0 * (got["seconds"]), rel=0.3)  # 0.5 A x 4 V = 2 W


# ---------------------------------------------------------------------------------------------- calibrate --device


def _q4(tiny_art, root: Path) -> Path:
    from edgekit.pipeline import ConvertRequest, convert

    out = root / "q4"
    if not (out / "manifest.json").exists():
        convert(ConvertRequest(str(tiny_art[1]), "gguf", "q4_0", out, eval_tokens=512, force=True))
    return out


@pytest.mark.slow
def test_calibrate_device_writes_a_measured_profile_that_predictions_use(agent, tiny_art, tmp_path):
    env = {"EDGEKIT_CONFIG_DIR": str(tmp_path / "config")}
    q4 = _q4(tiny_art, tmp_path)
    r = run_cli("calibrate", str(tiny_art[0]), str(q4), "--device", agent["url"], "--token", agent["token"], "--json", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    done = json.loads(r.stdout)
    name = Path(done["profile"]).stem
    assert Path(done["profile"]).parent == tmp_path / "config" / "profiles"
    from edgekit.targets.profiles import load_profile

    prof = load_profile(done["profile"])
    assert prof.measured["device"] == name and prof.runtimes == ("llamacpp",) and prof.formats == ("gguf",)
    assert all(f.source.startswith(f"measured on {name}") for k, f in prof.figures.items() if k != "memory_budget")
    assert done["calibrations"][0]["device"] == name and len(done["calibrations"][0]["points"]) == 2
    # the profile is found by name, and predictions for it rest on the device's own factors
    t = run_cli("targets", env=env)
    assert t.returncode == 0 and name in t.stdout
    p = run_cli("profile", str(tiny_art[0]), "--no-quality", "--reps", "2", "--target", name, "--json", env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    pred = json.loads(p.stdout)["targets"][name]
    assert pred["calibrated"] and f"measured on device {name}" in pred["calibration"]
    # a profile on the device itself shows the device's calibrated prediction next to its measurement
    d = run_cli("profile", str(q4), "--no-quality", "--reps", "2", "--device", agent["url"], "--token", agent["token"],
                "--json", env=env)
    assert d.returncode == 0, d.stderr[-2000:]
    own = json.loads(d.stdout)["predicted_device"]
    assert own["calibrated"] and own["decode_tok_s"] > 0


# The held-out prediction accuracy of a calibrated device (minutes of calibration on the embedded model) is
# measured by benchmarks/bench_device_prediction.py in `make bench`.


def test_a_well_behaved_client_is_answered_during_attacks(agent):
    """Slow-header connections held open and random bodies on every route: the agent answers 4xx (never 5xx) and
    keeps serving a well-behaved client meanwhile."""
    import random
    import threading

    host, port = agent["url"].removeprefix("http://").split(":")
    held = []
    for _ in range(80):  # request lines that never finish
        s = socket.create_connection((host, int(port)), timeout=10)
        s.sendall(b"GET /v1/device HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        held.append(s)
    rng = random.Random(0)
    routes = [("POST", "/v1/jobs"), ("POST", "/v1/artifacts"), ("PUT", "/v1/blobs/" + "f" * 64 + "?offset=0&total=10"),
              ("GET", "/v1/jobs/zz"), ("GET", "/v1/uploads/xyz"), ("DELETE", "/v1/jobs/" + "0" * 32)]
    statuses: list[int] = []

    def attack():
        for i in range(120):
            method, path = routes[i % len(routes)]
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) if i % 3 else \
                json.dumps({"artifact": rng.choice([None, 1, "x" * 40, [], {}]), "measure": rng.choice([[], "speed", [1]])}).encode()
            statuses.append(raw(agent["url"], path, body, agent["token"], method)[0])

    t = threading.Thread(target=attack)
    t.start()
    good = []
    while t.is_alive():
        good.append(raw(agent["url"], "/v1/device", token=agent["token"])[0])
    t.join()
    for s in held:
        s.close()
    assert good and set(good) == {200}
    assert len(statuses) == 120 and all(400 <= st < 500 for st in statuses), sorted(set(statuses))
    assert raw(agent["url"], "/health")[0] == 200


def test_tls_serves_https_with_a_verified_certificate(tmp_path):
    from edgekit.agent.client import AgentClient

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    port = _free_port()
    proc = subprocess.Popen([EDGEKIT, "agent", "--storage", str(tmp_path / "s"), "--port", str(port), "--tls-cert", str(cert),
                             "--tls-key", str(key)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"https://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                c = AgentClient(url, (tmp_path / "s" / "token").read_text().strip(), cafile=str(cert))
                assert c.device()["protocol"] == 1
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.3)
        from edgekit.errors import InputError

        with pytest.raises(InputError, match="cannot reach"):  # an unknown certificate is not trusted
            AgentClient(url, "x" * 20).health()
    finally:
        stop(proc)
