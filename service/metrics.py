"""Prometheus metrics at GET /metrics, correct across gunicorn's worker processes.

Each gunicorn worker is its own process with its own counters, so a scrape
answered by one worker would see only its share. prometheus_client's
multiprocess mode fixes that: when `PROMETHEUS_MULTIPROC_DIR` is set (our
gunicorn.conf.py sets it to a fresh directory before the workers start) every
worker writes its values to memory-mapped files there, and /metrics sums them
with `MultiProcessCollector`. Without the variable (the Flask test client, a
single process) the app's own registry is served.

Metrics:
    http_requests_total{endpoint,method,status,model,version}   requests answered
    http_request_duration_seconds{endpoint,model,version}       latency histogram
    mnist_predictions_total{digit,model,version}    digits predicted (/predict, /explain, V2, gRPC)
    mnist_prediction_confidence{model,version}      the top probability of each prediction
    mnist_model_version{model}                      version each live worker serves (gauge, per pid)
    mnist_model_reloads_total{model}                new versions loaded by a worker
    mnist_model_rejected_versions_total{model}      versions a worker refused to load

`endpoint` is the route's rule (`/v2/models/<name>/infer`), never the raw
path, and `method` is one of HTTP's methods or `other`, so a scanner probing
random URLs or made-up methods cannot blow up the label set (every series
stays in every worker's files, and in every scrape, for good).
`model` and `version` name the version that answered (empty when none did,
e.g. /healthz or a 400), so a canary can be compared with stable; a version
that answered only because a request pinned it (`?version=N`), being neither
stable nor canary, is counted as `version="pinned"`, so that clients cycling
through a long history cannot add series for every version on disk. gRPC calls
(service/grpc_server.py) are counted in the same two series under their
method, `endpoint="/inference.GRPCInferenceService/ModelInfer"` and
`method="POST"` (gRPC's HTTP/2 method), with the HTTP status the same error
has over REST (400, 404, 413, 503; 200 for OK), so one query covers both;
their predictions carry the answering version like REST's.
"""

from __future__ import annotations

import os
import time
from collections import Counter as Tally
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

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

from core.modelstore import LoadedModel
from service.errors import ApiError
from service.registry import ModelRegistry

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONFIDENCE_BUCKETS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)
UNMATCHED = "<unmatched>"
# RFC 9110's methods and PATCH; any other method a client invents is counted as OTHER_METHOD.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
OTHER_METHOD = "other"
PINNED = "pinned"


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    predictions: Counter
    confidence: Histogram
    model_version: Gauge
    reloads: Counter
    rejected: Counter
    # (metric, label values) -> child; bounded like the series themselves (see above).
    _children: dict = field(default_factory=dict, repr=False, compare=False)

    def child(self, metric: Counter | Histogram, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once per label set: prometheus_client checks the
        values and takes a lock on every `labels` call, and /predict makes four of them."""
        try:
            return self._children[metric, labels]
        except KeyError:
            child = self._children[metric, labels] = metric.labels(*labels)
            return child


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
            ["endpoint", "method", "status", "model", "version"],
            registry=registry,
        ),
        latency=Histogram(
            "http_request_duration_seconds",
            "Time from the app receiving a request to its response, by route.",
            ["endpoint", "model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        ),
        predictions=Counter(
            "mnist_predictions",
            "Digits predicted, one per image, by the version that answered.",
            ["digit", "model", "version"],
            registry=registry,
        ),
        confidence=Histogram(
            "mnist_prediction_confidence",
            "The predicted digit's probability, one per image, by the version that answered.",
            ["model", "version"],
            buckets=CONFIDENCE_BUCKETS,
            registry=registry,
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


def version_label(registry: ModelRegistry | None, model: LoadedModel) -> str:
    """The `version` label of an answer: the number of a live version (stable or canary), else
    PINNED. Live versions are at most two per model, so the label set stays bounded."""
    try:
        live = registry.get(model.name).live() if registry is not None else None
    except ApiError:
        live = None
    if live is None or model.version in (live.stable.version, live.canary.version if live.canary else None):
        return str(model.version)
    return PINNED


def exposition(metrics: Metrics) -> bytes:
    """The text format: all workers' values in multiprocess mode, else this process's."""
    path = multiprocess_dir()
    if path:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=path)
        return generate_latest(registry)
    return generate_latest(metrics.registry)


def count_predictions(
    metrics: Metrics, name: str, version: str, digits: Sequence[int], confidences: Sequence[float]
) -> None:
    """One count per predicted image, by digit, and its confidence, under the version that answered:
    the data plane (service/dataplane.py) calls it for every protocol."""
    for digit, n in Tally(digits).items():
        metrics.child(metrics.predictions, str(digit), name, version).inc(n)
    histogram = metrics.child(metrics.confidence, name, version)
    for c in confidences:
        histogram.observe(c)


def init_app(app: Flask) -> None:
    """Create the metrics, count every request, follow the model manager, serve /metrics."""
    metrics = create_metrics()
    app.extensions["metrics"] = metrics
    registry = app.extensions.get("registry")
    if registry is not None:
        for manager in registry.managers():
            current = manager.current()
            metrics.model_version.labels(manager.name).set(current.version if current else 0)
            # Touch the counters so they read 0, not absent, before the first event.
            metrics.reloads.labels(manager.name)
            metrics.rejected.labels(manager.name)

        def on_model_event(event: str, model: str = "", **info: object) -> None:
            if event == "loaded":
                metrics.reloads.labels(model).inc()
                version = info.get("version")
                if not isinstance(version, int):
                    latest = registry.get(model).current()
                    version = latest.version if latest else 0
                metrics.model_version.labels(model).set(version)
            elif event == "rejected":
                metrics.rejected.labels(model).inc()

        registry.add_listener(on_model_event)

    @app.after_request
    def _count(response: Response) -> Response:
        req, ctx = request._get_current_object(), g._get_current_object()  # one proxy lookup each
        rule = req.url_rule
        endpoint = rule.rule if rule is not None else UNMATCHED
        model = ctx.get("answered_by")
        name, version = (model.name, version_label(registry, model)) if model is not None else ("", "")
        method = req.method if req.method in METHODS else OTHER_METHOD
        status = response.status_code
        metrics.child(metrics.requests, endpoint, method, str(status), name, version).inc()
        t0 = ctx.get("request_t0")  # set by service.app
        if t0 is not None:
            metrics.child(metrics.latency, endpoint, name, version).observe(time.perf_counter() - t0)
        return response

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        return Response(exposition(metrics), content_type=CONTENT_TYPE_LATEST)
