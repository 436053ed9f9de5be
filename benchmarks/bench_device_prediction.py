"""How well a device calibrated through `edgekit calibrate --device` predicts a recipe it never measured.

Starts `edgekit agent` on loopback (a real agent process, its own storage and token), calibrates it on the
embedded model's f16 / q8_0 / q4_0 GGUFs (`edgekit calibrate ... --device URL`), converts the data-aware int4
recipe (not among them), measures it on the agent with the same speed harness, and compares that with the
device's calibrated prediction: predicted / measured for decode tok/s, prefill tok/s and peak memory.
The device profile goes into a temporary config directory; nothing of the user's is touched.

Prints a table and writes benchmarks/results/device_prediction.json. About 15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
EDGEKIT = str(Path(sys.executable).parent / "edgekit")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_agent(storage: Path, log: Path) -> tuple[subprocess.Popen, str, str]:
    port = _free_port()
    proc = subprocess.Popen([EDGEKIT, "agent", "--storage", str(storage), "--port", str(port)], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"error: the agent exited {proc.returncode}: {log.read_text()[-500:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url, (storage / "token").read_text().strip()
        except OSError:
            time.sleep(0.2)
    proc.kill()
    sys.exit("error: the agent did not answer /health in 120 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("out/bench-device-prediction"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from edgekit.agent.remote import connect, measure_on_device
    from edgekit.harness.quality import read_text
    from edgekit.pipeline import ConvertRequest, convert
    from edgekit.targets.calibrate import CALIBRATION_CONFIG, default_artifacts
    from edgekit.targets.device_calibration import predict_for_device
    from edgekit.targets.facts import artifact_facts

    console = Console()
    held_out = args.out / "int4"
    if not (held_out / "manifest.json").exists():
        console.print("converting the held-out recipe (data-aware int4 GGUF)")
        convert(ConvertRequest(None, "gguf", "int4", held_out, force=True))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["EDGEKIT_CONFIG_DIR"] = str(root / "config")
        proc, url, token = start_agent(root / "storage", args.out / "agent.log")
        try:
            calib = [str(p) for p in default_artifacts(lambda s: None, lambda d, a, b: None, ("gguf",))]
            t0 = time.perf_counter()
            r = subprocess.run([EDGEKIT, "calibrate", *calib, "--device", url, "--token", token, "--json"],
                               capture_output=True, text=True, timeout=3600)
            if r.returncode != 0:
                sys.exit(f"error: calibrate --device failed: {r.stderr.strip()[-500:]}")
            calibrate_s = time.perf_counter() - t0
            name = Path(json.loads(r.stdout)["profile"]).stem
            _, client = connect(url, token)
            _, job = measure_on_device(client, held_out, read_text(None)[0], CALIBRATION_CONFIG, ["speed"], None)
            speed = job["speed"]
            st = speed["settings"]
            pred = predict_for_device(name, artifact_facts(held_out / "model.gguf"),
                                      int(st["prompt_tokens"] + st["decode_tokens"] / 2), st["prompt_tokens"], speed["n_ctx"])
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    if pred is None or not pred.get("calibrated"):
        sys.exit("error: the calibrated device gave no calibrated prediction")
    rows = {"decode_tok_s": (pred["decode_tok_s"], speed["decode_tok_s"]),
            "prefill_tok_s": (pred["prefill_tok_s"], speed["prefill_tok_s"]),
            "peak_memory_bytes": (pred["peak_memory_bytes"], speed["peak_rss_bytes"])}
    t = Table(title=f"held-out int4 on the calibrated loopback device '{name}' (calibrated in {calibrate_s:.0f} s)")
    for c in ("figure", "predicted", "measured", "predicted / measured"):
        t.add_column(c)
    for k, (p, m) in rows.items():
        t.add_row(k, f"{p:,.1f}", f"{m:,.1f}", f"{p / m:.3f}")
    console.print(t)
    result = {"device": name, "calibrate_s": calibrate_s,
              "figures": {k: {"predicted": p, "measured": m, "ratio": p / m} for k, (p, m) in rows.items()},
              "within_15_percent": all(0.85 <= p / m <= 1.15 for k, (p, m) in rows.items() if k != "prefill_tok_s")}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "device_prediction.json").write_text(json.dumps(result, indent=2))
    console.print(f"decode and peak memory within 15%: {result['within_15_percent']}")


if __name__ == "__main__":
    main()
