"""Prometheus metrics at GET /metrics, correct across gunicorn's worker processes.

Each gunicorn worker is its own process with its own counters, so a scrape
answered by one worker would see only its share. prometheus_client's
multiprocess mode fixes that: when `PROMETHEUS_MULTIPROC_DIR` is set (our
gunicorn.conf.py sets it to a fresh directory before the workers start) every
worker writes its values to memory-mapped files there, and /metrics sums them
with `MultiProcessCollector`. Without the variable (the Flask test client, a
single process) the app's own registry is served.

Metrics:
    http_requests_total{endpoint,method,status}     requests answered
    http_request_duration_seconds{endpoint}         latency histogram
    mnist_predictions_total{digit}                  digits predicted (/predict, V2 infer, gRPC ModelInfer)
    mnist_model_version{model}                      version each live worker serves (gauge, per pid)
    mnist_model_reloads_total{model}                new versions loaded by a worker
    mnist_model_rejected_versions_total{model}      versions a worker refused to load

`endpoint` is the route's rule (`/v2/models/<name>/infer`), never the raw
path, so a scanner probing random URLs cannot blow up the label set. gRPC
calls (service/grpc_server.py) are counted in the same two series under their
method, `endpoint="/inference.GRPCInferenceService/ModelInfer"` and
`method="POST"` (gRPC's HTTP/2 method), with the HTTP status the same error
has over REST (400, 404, 413, 503; 200 for OK), so one query covers both.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
from flask import Flask, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
UNMATCHED = "<unmatched>"


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    predictions: Counter
    model_version: Gauge
    reloads: Counter
    rejected: Counter


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR")


def create_metrics() -> Metrics:
    """The metric objects, registered in a registry of their own.

    A registry per app (not the global one) lets tests build many apps in one
    process; in multiprocess mode the values go to the shared files anyway.
    """
    registry = CollectorRegistry(auto_describe=True)
    return Metrics(
        registry=registry,
        requests=Counter(
            "http_requests",
            "HTTP requests answered, by route, method and status.",
            ["endpoint", "method", "status"],
            registry=registry,
        ),
        latency=Histogram(
            "http_request_duration_seconds",
            "Time from the app receiving a request to its response, by route.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        ),
        predictions=Counter(
            "mnist_predictions", "Digits predicted, one per image.", ["digit"], registry=registry
        ),
        # liveall: one series per live worker (label pid), so a worker stuck on an
        # old version is visible; max(mnist_model_version) is the newest served.
        model_version=Gauge(
            "mnist_model_version",
            "Model version served by each live worker (0: none).",
            ["model"],
            multiprocess_mode="liveall",
            registry=registry,
        ),
        reloads=Counter(
            "mnist_model_reloads",
            "New model versions loaded after startup, summed over workers.",
            ["model"],
            registry=registry,
        ),
        rejected=Counter(
            "mnist_model_rejected_versions",
            "Model versions refused as invalid, summed over workers.",
            ["model"],
            registry=registry,
        ),
    )


def exposition(metrics: Metrics) -> bytes:
    """The text format: all workers' values in multiprocess mode, else this process's."""
    path = multiprocess_dir()
    if path:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=path)
        return generate_latest(registry)
    return generate_latest(metrics.registry)


def count_predictions(metrics: Metrics, digits: object) -> None:
    """One count per predicted image, by digit: REST's after_request and gRPC's ModelInfer both call it."""
    for digit, n in enumerate(np.bincount(np.asarray(digits, dtype=np.int64), minlength=10)):
        if n:
            metrics.predictions.labels(str(digit)).inc(int(n))


def init_app(app: Flask) -> None:
    """Create the metrics, count every request, follow the model manager, serve /metrics."""
    metrics = create_metrics()
    app.extensions["metrics"] = metrics
    models = app.extensions.get("models")
    if models is not None:
        name = models.name
        current = models.current()
        metrics.model_version.labels(name).set(current.version if current else 0)
        # Touch the counters so they read 0, not absent, before the first event.
        metrics.reloads.labels(name)
        metrics.rejected.labels(name)

        def on_model_event(event: str, **info: object) -> None:
            if event == "loaded":
                metrics.reloads.labels(name).inc()
                version = info.get("version")
                if not isinstance(version, int):
                    latest = models.current()
                    version = latest.version if latest else 0
                metrics.model_version.labels(name).set(version)
            elif event == "rejected":
                metrics.rejected.labels(name).inc()

        models.add_listener(on_model_event)

    @app.after_request
    def _count(response: Response) -> Response:
        rule = request.url_rule
        endpoint = rule.rule if rule is not None else UNMATCHED
        metrics.requests.labels(endpoint, request.method, str(response.status_code)).inc()
        t0 = g.get("request_t0")  # set by service.app
        if t0 is not None:
            metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        digits = g.get("predicted_digits")
        if digits is not None and response.status_code == 200:
            count_predictions(metrics, digits)
        return response

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        return Response(exposition(metrics), content_type=CONTENT_TYPE_LATEST)
