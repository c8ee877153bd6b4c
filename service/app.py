"""The application factory: settings from the environment, then every part wired in one place.

Every setting, with its default, its check and its meaning, is declared in
core/settings.py (the table: docs/settings.md). `create_app()` reads them
once with `Settings.from_env()`, so a malformed value stops the start with a
message naming the variable rather than failing later on some request; they
then sit in `app.config` under their variable names (`app.config["MAX_BATCH"]`)
and the whole object in `app.extensions["settings"]`.

`create_app(config)` takes overrides by variable name, checked the same way
(the tests use it).
"""

from __future__ import annotations

import io
import time
from collections.abc import Mapping
from typing import IO, Any

from flask import Flask, Request, g
from werkzeug.middleware.proxy_fix import ProxyFix

from core.settings import Settings
from service import api, errors, feedback, logs, metrics, openapi, page, v2
from service.dataplane import DataPlane
from service.registry import ModelRegistry


class InMemoryRequest(Request):
    """Uploaded files stay in memory (the body is bounded by MAX_CONTENT_LENGTH): werkzeug would
    spool files over 500 kB to a temp file, and the container's root filesystem is read-only."""

    def _get_file_stream(self, *args: Any, **kwargs: Any) -> IO[bytes]:
        return io.BytesIO()


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """A ready Flask app: the first repository scan is done before it is returned."""
    app = Flask(__name__)
    app.request_class = InMemoryRequest
    settings = Settings.from_env(overrides=config)
    app.config.update(settings.as_env())
    app.extensions["settings"] = settings
    # A multipart batch has one part per image (Flask's default allows 1000 parts).
    app.config["MAX_FORM_PARTS"] = max(app.config.get("MAX_FORM_PARTS") or 0, app.config["MAX_BATCH"] + 16)
    app.config["MAX_FORM_MEMORY_SIZE"] = app.config["MAX_CONTENT_LENGTH"]

    registry = ModelRegistry(
        app.config["MODELS_DIR"],
        app.config["MODEL_NAME"],
        names=app.config["MODEL_NAMES"],
        pinned=app.config["MODEL_VERSION"],
        poll_seconds=app.config["MODEL_POLL_SECONDS"],
        policy=app.config["PROMOTION"],
        min_accuracy=app.config["MIN_ACCURACY"],
        tolerance=app.config["PROMOTION_TOLERANCE"],
    )
    registry.scan()
    app.extensions["registry"] = registry
    # Polling starts lazily in the process that serves: threads do not survive fork.
    app.before_request(registry.ensure_polling)
    app.before_request(_start_clock)

    errors.init_app(app)
    logs.init_app(app)  # request ids and the access line
    metrics.init_app(app)  # reads the model manager to initialise the gauges
    # What every protocol's routes call: model lookup, inference, prediction metrics.
    app.extensions["dataplane"] = DataPlane(registry, app.extensions["metrics"], app.config["MAX_BATCH"])
    openapi.init_app(app)
    app.register_blueprint(api.bp)
    app.register_blueprint(v2.bp)
    app.register_blueprint(page.bp)
    feedback.init_app(app)  # POST /feedback; its counter joins the metrics' registry

    if app.config["TRUSTED_PROXIES"]:
        hops = app.config["TRUSTED_PROXIES"]
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)
    return app


def _start_clock() -> None:
    """One clock for both the access log's duration and the latency histogram."""
    g.request_t0 = time.perf_counter()
