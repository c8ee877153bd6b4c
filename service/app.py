"""The application factory: configuration from the environment, then every part wired in one place.

Configuration (environment variable, default):

    MODELS_DIR          ./models     the model repository
    MODEL_NAME          mnist        the default model (of /predict, /readyz)
    MODEL_NAMES         (unset)      models served, comma-separated; unset = every folder
                                     under MODELS_DIR (MODEL_NAME always included)
    MODEL_VERSION       (unset)      pin one version of MODEL_NAME, above labels and policy
    PROMOTION           gate         which new version goes live: gate | latest | manual
                                     (docs/lifecycle.md)
    MIN_ACCURACY        0.98         gate: least recorded test accuracy to replace a version
    PROMOTION_TOLERANCE 0.001        gate: how far below the serving version's accuracy a new
                                     one may be (0.001 = 0.1 percentage points)
    MODEL_POLL_SECONDS  5            how often each worker rescans the repository (0 = never)
    MAX_BATCH           1024         most images in one /predict request (413 beyond)
    MAX_CONTENT_LENGTH  4194304      largest request body in bytes, 4 MiB (413 beyond)
    MAX_IMAGE_PIXELS    16000000     largest decoded image, width × height (413 beyond):
                                     a 4 MiB PNG can declare gigapixels (a decompression bomb)
    MAX_REQUEST_PIXELS  4000000      most decoded pixels in one request, all its images together
                                     (413 beyond), read from the headers before any decoding:
                                     a batch of 1024 small files must not cost 1024 large decodes
    FEEDBACK_DIR        (unset)      where POST /feedback stores corrections (docs/feedback.md);
                                     unset: the route answers 404 feedback_off
    FEEDBACK_MAX_BYTES  1073741824   the most the folder's feedback files may hold, 1 GiB (507 beyond)
    FEEDBACK_ROTATE_BYTES 67108864   a writer starts a new file past 64 MiB
    FEEDBACK_IMAGE_MAX_BYTES 262144  the largest image file kept as sent, 256 KiB (larger: its
                                     size and hash only; the 28x28 input is always kept)
    TRUSTED_PROXIES     0            reverse proxies in front (e.g. 1 behind nginx): the client
                                     address (request.remote_addr, the access log's `remote`) and
                                     scheme come from the last N X-Forwarded-For / -Proto hops;
                                     0 trusts no such header

`create_app(config)` takes overrides for any of these (the tests use it). Logging
is configured by environment variables of its own (see `service.logs`).
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Mapping
from typing import IO, Any

from flask import Flask, Request, g
from werkzeug.middleware.proxy_fix import ProxyFix

from core.modelstore import check_name, parse_version
from core.promotion import POLICIES
from service import api, errors, feedback, logs, metrics, openapi, page, v2
from service.dataplane import DataPlane
from service.registry import ModelRegistry

DEFAULTS: dict[str, Any] = {
    "MODELS_DIR": "./models",
    "MODEL_NAME": "mnist",
    "MODEL_NAMES": None,
    "MODEL_VERSION": None,
    "PROMOTION": "gate",
    "MIN_ACCURACY": 0.98,
    "PROMOTION_TOLERANCE": 0.001,
    "MODEL_POLL_SECONDS": 5.0,
    "MAX_BATCH": 1024,
    "MAX_CONTENT_LENGTH": 4 * 1024 * 1024,
    "MAX_IMAGE_PIXELS": 16_000_000,
    "MAX_REQUEST_PIXELS": 4_000_000,
    "TRUSTED_PROXIES": 0,
    "FEEDBACK_DIR": None,
    "FEEDBACK_MAX_BYTES": 1 << 30,
    "FEEDBACK_ROTATE_BYTES": 64 << 20,
    "FEEDBACK_IMAGE_MAX_BYTES": 256 << 10,
}
_TYPES = {
    "MODEL_POLL_SECONDS": float,
    "MAX_BATCH": int,
    "MAX_CONTENT_LENGTH": int,
    "MAX_IMAGE_PIXELS": int,
    "MAX_REQUEST_PIXELS": int,
    "TRUSTED_PROXIES": int,
    "MIN_ACCURACY": float,
    "PROMOTION_TOLERANCE": float,
    "FEEDBACK_MAX_BYTES": int,
    "FEEDBACK_ROTATE_BYTES": int,
    "FEEDBACK_IMAGE_MAX_BYTES": int,
}
_ZERO_ALLOWED = {"MODEL_POLL_SECONDS", "TRUSTED_PROXIES", "MIN_ACCURACY", "PROMOTION_TOLERANCE"}
_FRACTIONS = {"MIN_ACCURACY", "PROMOTION_TOLERANCE"}


def load_config(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """DEFAULTS overridden by environment variables, converted and checked.

    A bad value stops the start with a message naming the variable, rather
    than surfacing later as a confusing error on some request.
    """
    env = os.environ if env is None else env
    cfg = dict(DEFAULTS)
    for key in DEFAULTS:
        if env.get(key, "") != "":
            cfg[key] = env[key]
    return _checked(cfg)


def _checked(cfg: dict[str, Any]) -> dict[str, Any]:
    for key, kind in _TYPES.items():
        try:
            cfg[key] = kind(cfg[key])
        except (TypeError, ValueError):
            raise ValueError(f"{key} must be a number, got {cfg[key]!r}") from None
        if cfg[key] < 0 or (key not in _ZERO_ALLOWED and cfg[key] == 0):
            raise ValueError(f"{key} must be positive, got {cfg[key]!r}")
        if key in _FRACTIONS and not cfg[key] <= 1:
            raise ValueError(f"{key} is a fraction from 0 to 1 (0.98 = 98%), got {cfg[key]!r}")
    if cfg["PROMOTION"] not in POLICIES:
        raise ValueError(f"PROMOTION must be one of {', '.join(POLICIES)}, got {cfg['PROMOTION']!r}")
    cfg["MODEL_NAMES"] = _names(cfg["MODEL_NAMES"])
    cfg["FEEDBACK_DIR"] = str(cfg["FEEDBACK_DIR"]) if cfg["FEEDBACK_DIR"] not in (None, "") else None
    if cfg["MODEL_VERSION"] not in (None, ""):
        try:
            cfg["MODEL_VERSION"] = parse_version(cfg["MODEL_VERSION"])
        except ValueError as e:
            raise ValueError(f"MODEL_VERSION: {e}") from None
    else:
        cfg["MODEL_VERSION"] = None
    return cfg


def _names(value: Any) -> list[str] | None:
    """MODEL_NAMES as a list of checked names; None (every folder) when unset."""
    if value in (None, ""):
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(n).strip() for n in items if str(n).strip()]
    try:
        return [check_name(n) for n in names] or None
    except ValueError as e:
        raise ValueError(f"MODEL_NAMES: {e}") from None


class InMemoryRequest(Request):
    """Uploaded files stay in memory (the body is bounded by MAX_CONTENT_LENGTH): werkzeug would
    spool files over 500 kB to a temp file, and the container's root filesystem is read-only."""

    def _get_file_stream(self, *args: Any, **kwargs: Any) -> IO[bytes]:
        return io.BytesIO()


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """A ready Flask app: the first repository scan is done before it is returned."""
    app = Flask(__name__)
    app.request_class = InMemoryRequest
    cfg = load_config()
    cfg.update(config or {})
    app.config.update(_checked(cfg))
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
    # MODEL_NAME's manager, the one /readyz and the metrics' model gauge follow.
    app.extensions["models"] = registry.default
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
