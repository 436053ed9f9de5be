"""`edgekit sweep` on a tiny model (8 minutes here, so in `make test-slow` except the spec checks): the local
pool and a real local Ray cluster give the same table and fronts; a re-run converts only what is missing; a
sweep killed mid-way resumes; a failing candidate is recorded and the rest go on; a device reached through
`edgekit agent` is measured; the report page renders in headless Chromium."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli, tiny_model

EDGEKIT = str(Path(sys.executable).parent / "edgekit")

SPEC = """
[source]
model = "{model}"

[space]
quant = {quant}
format = ["gguf", "onnx"]
prune = [0.0, 0.25]
recover = [2]

[devices]
targets = ["host", "raspberry-pi-5"]

[objectives]
minimize = ["size_bytes", "kld_mean"]

[constraints]
min_decode_tok_s = 1

[measure]
reps = 1
eval_tokens = 512
decode_tokens = 8
calib_generated = 64
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    from edgekit.converters.gguf import GGUFExporter

    d = tmp_path_factory.mktemp("sweep-src")
    GGUFExporter().export(tiny_model(), d)
    return d / "model.gguf"


def write_spec(folder: Path, source: Path, quant=("q8_0", "nl4")) -> Path:
    p = folder / "spec.toml"
    p.write_text(SPEC.format(model=source, quant=json.dumps(list(quant))))
    return p


@pytest.fixture(scope="module")
def local_run(source, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep-local")
    spec = write_spec(root, source)
    r = run_cli("sweep", str(spec), "-o", str(root / "out"), "--workers", "2", "--json", timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    return root, spec, json.loads(r.stdout)


def _by_name(result: dict) -> dict:
    return {c["candidate"]: c for c in result["candidates"]}


@pytest.mark.slow
def test_the_local_sweep_writes_table_fronts_and_best_artifacts(local_run):
    root, _, result = local_run
    out = root / "out"
    cands = _by_name(result)
    assert len(cands) == 8
    # a candidate that cannot exist is recorded with its reason, and the rest go on
    for name in ("nl4-onnx", "nl4-onnx-prune25r2"):
        assert not cands[name]["ok"] and "onnx" in cands[name]["error"].lower() and "\n" not in cands[name]["error"]
    good = [c for c in cands.values() if c["ok"]]
    assert len(good) == 6 and all(set(c["devices"]) == {"host", "raspberry-pi-5"} for c in good)
    for c in good:
        assert c["devices"]["host"]["how"] == "measured" and c["devices"]["raspberry-pi-5"]["how"] == "predicted"
        assert c["devices"]["host"]["kld_mean"] == c["devices"]["raspberry-pi-5"]["kld_mean"] > 0
    st = result["stats"]
    assert st["prefixes"] == {"computed": 1, "cached": 0}  # the pruned + recovered model once for every storage pass
    assert st["conversions"] == {"computed": 8, "cached": 0} and st["measurements"]["computed"] == 6
    for dev in ("host", "raspberry-pi-5"):
        front = result["fronts"][dev]
        assert front and set(front) <= {c["candidate"] for c in good}
        best = result["best"][dev]
        chosen = out / "best" / dev
        assert (chosen / "manifest.json").exists() and json.loads((chosen / "sweep-choice.json").read_text())["candidate"] == best
        # nothing feasible has a lower KL divergence than the chosen one
        assert cands[best]["devices"][dev]["kld_mean"] == min(c["devices"][dev]["kld_mean"] for c in good
                                                              if c["devices"][dev]["feasible"])
    csv = (out / "sweep.csv").read_text().splitlines()
    assert csv[0].startswith("candidate,quant,format") and len(csv) == 1 + 6 * 2 + 2
    assert json.loads((out / "sweep.json").read_text())["fronts"] == result["fronts"]


@pytest.mark.slow
def test_a_rerun_converts_only_the_new_candidate(local_run, source, tmp_path):
    root, _, first = local_run
    spec = write_spec(tmp_path, source, quant=("q8_0", "nl4", "q4_0"))  # 4 more points: q4_0 x 2 formats x 2 prune levels
    t0 = time.perf_counter()
    r = run_cli("sweep", str(spec), "-o", str(root / "out"), "--workers", "2", "--json", timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    second = json.loads(r.stdout)
    assert second["stats"]["conversions"] == {"computed": 4, "cached": 8}
    assert second["stats"]["prefixes"] == {"computed": 0, "cached": 1}
    assert second["stats"]["measurements"] == {"computed": 4, "cached": 6}
    assert second["stats"]["wall_s"] < first["stats"]["wall_s"] + (time.perf_counter() - t0)  # recorded, for the note
    old, new = _by_name(first), _by_name(second)
    for name, c in old.items():  # cached candidates keep their figures exactly
        if c["ok"]:
            assert new[name]["devices"]["host"]["kld_mean"] == c["devices"]["host"]["kld_mean"]


@pytest.mark.slow
def test_a_ray_cluster_gives_the_same_table_and_fronts(local_run, tmp_path):
    pytest.importorskip("ray")
    root, spec, local = local_run
    r = run_cli("sweep", str(spec), "-o", str(tmp_path / "out"), "--ray", "auto", "--workers", "2", "--json", timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    ray = json.loads(r.stdout)
    assert ray["stats"]["executor"] == "ray" and ray["stats"]["conversions"]["computed"] == 8
    a, b = _by_name(local), _by_name(ray)
    assert set(a) == set(b)
    for name in a:
        assert a[name]["ok"] == b[name]["ok"]
        for dev, f in a[name]["devices"].items():
            g = b[name]["devices"][dev]
            assert g["size_bytes"] == f["size_bytes"]
            assert abs(g["kld_mean"] - f["kld_mean"]) <= 1e-9 * max(1, f["kld_mean"]), name
            assert g["decode_tok_s"] > 0
    assert ray["fronts"] == local["fronts"] and ray["best"] == local["best"]


@pytest.mark.slow
def test_a_killed_sweep_resumes(source, tmp_path):
    spec = write_spec(tmp_path, source, quant=("q8_0",))
    out = tmp_path / "out"
    proc = subprocess.Popen([EDGEKIT, "sweep", str(spec), "-o", str(out), "--json"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and len(list(out.glob("cache/cand-*/result.json"))) < 2:
        assert proc.poll() is None, "the sweep ended before it could be killed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(out.glob("cache/cand-*/result.json")))
    assert 2 <= done_before < 4
    r = run_cli("sweep", str(spec), "-o", str(out), "--json", timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    assert result["stats"]["conversions"]["cached"] >= done_before
    assert all(c["ok"] for c in result["candidates"]) and len(result["candidates"]) == 4


def test_bad_specs_are_one_line(source, tmp_path):
    cases = {
        "unknown key": SPEC.format(model=source, quant='["q8_0"]').replace("[measure]", "[measure]\nrepz = 2"),
        "unknown pass": SPEC.format(model=source, quant='["q9_0"]'),
        "unknown device": SPEC.format(model=source, quant='["q8_0"]').replace('"raspberry-pi-5"', '"toaster"'),
        "missing source": SPEC.format(model=tmp_path / "nope.gguf", quant='["q8_0"]'),
        "bad prune": SPEC.format(model=source, quant='["q8_0"]').replace("[0.0, 0.25]", "[1.5]"),
    }
    for what, text in cases.items():
        p = tmp_path / "bad.toml"
        p.write_text(text)
        r = run_cli("sweep", str(p), "-o", str(tmp_path / f"out-{len(what)}"))
        assert r.returncode != 0 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, (what, r.stderr)
        assert not (tmp_path / f"out-{len(what)}").exists(), what


@pytest.mark.slow
def test_the_sweep_report_renders_in_headless_chromium(local_run, tmp_path):
    from tests.test_report_html import _chromium

    root, _, result = local_run
    page = root / "out" / "report.html"
    dom = _chromium(["--dump-dom", page.as_uri()], tmp_path, "sweep").stdout
    assert "Sweep: fronts per device" in dom
    for dev in ("host", "raspberry-pi-5"):
        assert f"<h3>{dev}</h3>" in dom
    assert result["best"]["host"] in dom


@pytest.mark.slow
def test_a_sweep_measures_on_an_agent_device(source, tmp_path):
    from tests.test_agent import start_agent, stop

    proc, url, token = start_agent(tmp_path / "storage", tmp_path / "agent.log")
    env = {"EDGEKIT_CONFIG_DIR": str(tmp_path / "config")}
    try:
        assert run_cli("devices", "add", "loop", url, "--token", token, env=env).returncode == 0
        spec = write_spec(tmp_path, source, quant=("q8_0",))
        text = spec.read_text().replace('format = ["gguf", "onnx"]', 'format = ["gguf"]').replace("prune = [0.0, 0.25]", "prune = [0.0]")
        spec.write_text(text.replace('targets = ["host", "raspberry-pi-5"]', 'targets = ["host", "agent:loop"]'))
        r = run_cli("sweep", str(spec), "-o", str(tmp_path / "out"), "--json", env=env, timeout=1500)
        assert r.returncode == 0, r.stderr[-3000:]
    finally:
        stop(proc)
    (c,) = json.loads(r.stdout)["candidates"]
    host, dev = c["devices"]["host"], c["devices"]["agent:loop"]
    assert host["how"] == dev["how"] == "measured" and dev["decode_tok_s"] > 0
    assert abs(host["kld_mean"] - dev["kld_mean"]) <= 1e-6  # the device scores against the same reference statistics


def test_a_task_thread_budget_reaches_the_runtimes(monkeypatch):
    """llama.cpp and ONNX Runtime sessions opened inside a sweep task keep to the task's share of the cores."""
    from edgekit.runtimes import default_threads
    from edgekit.sweep.tasks import thread_budget

    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "EDGEKIT_THREADS"):
        monkeypatch.setenv(var, "")
    import torch

    before = torch.get_num_threads()
    assert default_threads() >= 1
    try:
        thread_budget(1)
        assert default_threads() == 1
        monkeypatch.setenv("EDGEKIT_THREADS", "3")
        assert default_threads() == 3
    finally:
        torch.set_num_threads(before)  # the rest of the suite keeps its threads
