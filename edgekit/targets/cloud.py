"""Cloud baselines: simulated from a cloud profile, or measured against an OpenAI-compatible endpoint."""

from __future__ import annotations

import json
import statistics
import time
import urllib.error
import urllib.request
from typing import Any

from edgekit.errors import InputError
from edgekit.targets.facts import ArtifactFacts
from edgekit.targets.predict import UNCALIBRATED_EFFICIENCY

# Small models on a datacenter GPU are launch-bound, not bandwidth-bound: a few microseconds per
# kernel and about ten kernels per layer even with fusion (assumption; CUDA graphs lower it).
GPU_SECONDS_PER_LAYER = 20e-6


def simulate(facts: ArtifactFacts, profile, prompt_tokens: int, reference_bytes_per_weight: float = 2.0) -> dict[str, Any]:
    """The unquantized (fp16) reference served from ``profile``: network + server queue + roofline."""
    params = sum(facts.params_by_type.values())
    bytes_per_token = params * reference_bytes_per_weight
    layers = facts.extra.get("num_layers", 1)
    t_token = max(bytes_per_token / (profile.peak_bandwidth_bytes_s() * UNCALIBRATED_EFFICIENCY),
                  layers * GPU_SECONDS_PER_LAYER)
    t_prefill = 2 * params * prompt_tokens / (profile.compute_flops("f16") * UNCALIBRATED_EFFICIENCY)
    rtt = profile.get("network_rtt").value / 1000
    server = profile.get("server_ttft").value / 1000
    price_in = profile.get("price_input").value
    price_out = profile.get("price_output").value
    return {
        "source": "simulated",
        "ttft_ms": (rtt + server + t_prefill + t_token) * 1000,
        "decode_tok_s": 1 / t_token,
        "rtt_ms": rtt * 1000,
        "usd_per_1k_tokens": price_out / 1000,
        "usd_per_1k_prompt_tokens": price_in / 1000,
        "quality": "reference (unquantized)",
        "notes": [f"efficiency {UNCALIBRATED_EFFICIENCY} of roofline assumed; at least {GPU_SECONDS_PER_LAYER * 1e6:.0f} us per layer per token"],
    }


def _stream(url: str, prompt: str, max_tokens: int, model: str | None, timeout: float) -> tuple[float, list[float], int | None]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
    if model:
        body["model"] = model
    req = urllib.request.Request(url.rstrip("/") + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    stamps: list[float] = []
    usage = None
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        for raw in resp:
            line = raw.decode("utf-8", errors="replace").strip()
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            chunk = json.loads(payload)
            if chunk.get("usage"):
                usage = chunk["usage"].get("completion_tokens")
            if any(c.get("text") for c in chunk.get("choices", [])):
                stamps.append(time.perf_counter())
    return t0, stamps, usage


def measure_endpoint(url: str, prompt: str, max_tokens: int = 64, runs: int = 5, model: str | None = None,
                     timeout: float = 120) -> dict[str, Any]:
    """TTFT and streamed tokens/s of an OpenAI-compatible ``/v1/completions`` endpoint (median and spread)."""
    ttft, rates = [], []
    try:
        _stream(url, prompt, 4, model, timeout)  # warm-up (model load, connection)
        for _ in range(runs):
            t0, stamps, _ = _stream(url, prompt, max_tokens, model, timeout)
            if len(stamps) < 2:
                raise InputError(f"{url} streamed {len(stamps)} chunks", "check that the endpoint streams completions")
            ttft.append((stamps[0] - t0) * 1000)
            rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError) as exc:
        raise InputError(f"cloud endpoint {url} failed ({exc})", "check --cloud-url (an OpenAI-compatible server)") from None

    def spread(v):
        return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}

    return {"source": f"measured {url}", "ttft_ms": statistics.median(ttft), "decode_tok_s": statistics.median(rates),
            "spread": {"ttft_ms": spread(ttft), "decode_tok_s": spread(rates)}, "usd_per_1k_tokens": None,
            "max_tokens": max_tokens}
