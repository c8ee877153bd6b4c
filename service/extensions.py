"""The extras of issue 5, wired onto the base app: logs, metrics, V2 protocol, OpenAPI, the page.

`service.app.create_app` calls `init_app` last, so every route exists by then
(the OpenAPI test checks that the document lists each one) and the model
manager can be read to initialise the gauges.
"""

from __future__ import annotations

import time

from flask import Flask, Response, g

from service import logs, metrics, openapi, v2


def init_app(app: Flask) -> None:
    """Register the extras on the app; logs first, so every line has a request id."""

    @app.before_request
    def _start_clock() -> None:
        # One clock for both the access log's duration and the latency histogram.
        g.request_t0 = time.perf_counter()

    logs.init_app(app)
    metrics.init_app(app)
    v2.init_app(app)
    openapi.init_app(app)

    @app.get("/")
    def page() -> Response:
        """The draw-a-digit page: one self-contained file in service/static/."""
        return app.send_static_file("index.html")
