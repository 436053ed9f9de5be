"""Prometheus metrics of one server (its own registry, so two apps in one process do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("edgekit_requests", "Requests answered, by endpoint and HTTP status",
                                ["model", "endpoint", "status"], registry=r)
        self.tokens = Counter("edgekit_tokens", "Tokens processed, prompt or completion", ["model", "kind"], registry=r)
        self.queue_depth = Gauge("edgekit_queue_depth", "Requests waiting for a free session", ["model"], registry=r)
        self.running = Gauge("edgekit_running", "Requests being generated or embedded now", ["model"], registry=r)
        self.ttft = Histogram("edgekit_time_to_first_token_seconds", "Arrival to first generated token", ["model"],
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.tok_s = Histogram("edgekit_decode_tokens_per_second", "Completion tokens per second after the first",
                               ["model"], buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000), registry=r)
        self.cancelled = Counter("edgekit_cancelled", "Generations cancelled by a disconnected client", ["model"], registry=r)

    def text(self) -> bytes:
        return generate_latest(self.registry)
