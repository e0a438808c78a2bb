"""Prometheus metrics of one server process, in a registry of its own (two apps in one process never clash)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServeMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("reco_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.errors = Counter("reco_request_errors", "HTTP requests answered with a 4xx or 5xx, by route",
                              ["route"], registry=r)
        self.disconnects = Counter("reco_client_disconnects", "Requests whose client went away before the answer "
                                   "(status 499 in reco_requests_total), by route", ["route"], registry=r)
        self.latency = Histogram("reco_request_seconds", "Request latency by route", ["route"], buckets=_LATENCY,
                                 registry=r)
        self.stage = Histogram("reco_stage_seconds", "Time per batch in each stage (encode, search, fuse)",
                               ["model", "stage"], buckets=_LATENCY, registry=r)
        self.batch_size = Histogram("reco_batch_size", "Items per backbone batch", ["model", "side"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.memory_version = Gauge("reco_memory_version", "Memory version the model's last batch read",
                                    ["model", "memory"], registry=r)
