"""service/logs.py: request ids and the JSON line formats, in process, then on a real gunicorn's stdout."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest
import requests

from service import logs
from service.app import create_app


def test_request_id_is_echoed_or_generated(client):
    r = client.get("/healthz", headers={"X-Request-ID": "client-abc.1"})
    assert r.headers["X-Request-ID"] == "client-abc.1"
    generated = {client.get("/healthz").headers["X-Request-ID"] for _ in range(3)}
    assert len(generated) == 3 and all(len(g) == 32 for g in generated)
    for unsafe in ("has space", "x" * 129, "new\nline", 'quote"s'):
        rid = logs.request_id_from(unsafe)
        assert rid != unsafe and len(rid) == 32
    # Errors carry it too.
    assert client.get("/nope", headers={"X-Request-ID": "e-1"}).headers["X-Request-ID"] == "e-1"


def test_app_lines_inside_a_request_carry_its_id(app):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.RequestIdFilter())
    log = logging.getLogger("test.logs")
    log.addHandler(handler)
    try:

        @app.get("/_log_probe")
        def probe():
            log.warning("inside %s", "request", extra={"k": 1})
            try:
                1 / 0  # noqa: B018
            except ZeroDivisionError:
                log.exception("failed")
            return "ok"

        app.test_client().get("/_log_probe", headers={"X-Request-ID": "probe-1"})
    finally:
        log.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "inside request" and first["request_id"] == "probe-1" and first["k"] == 1
    assert first["level"] == "WARNING" and first["logger"] == "test.logs" and first["ts"].endswith("Z")
    assert "ZeroDivisionError" in second["exception"]


def _access_line(app, formatter: logging.Formatter, url: str, **headers: str) -> str:
    """What the stdout handler writes for the access record of one request, through `formatter`."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(logs.RequestIdFilter())
    logs.access_log.addHandler(handler)
    try:
        app.test_client().get(url, headers=headers)
    finally:
        logs.access_log.removeHandler(handler)
    return stream.getvalue()


def test_access_line_shapes(app):
    doc = json.loads(_access_line(app, logs.AccessFormatter(), "/x", **{"X-Request-ID": "r"}))
    assert doc["logger"] == "access" and doc["message"] == "GET /x 404" and doc["request_id"] == "r"
    assert {"ts", "level", "pid", "method", "path", "status", "duration_ms", "bytes", "remote"} <= set(doc)
    text = _access_line(app, logging.Formatter(logs.TEXT_FORMAT), "/x")
    assert text.rstrip().endswith("access: GET /x 404") and not text.startswith("{")


def test_gunicorn_logconfig_is_a_valid_dictconfig(monkeypatch):
    import logging.config

    monkeypatch.setenv("LOG_LEVEL", "WARNING")
    cfg = logs.gunicorn_logconfig()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logging.config.dictConfig(cfg)
        assert logging.getLogger("gunicorn.error").level == logging.WARNING
        assert logging.getLogger("gunicorn.access").level == logging.CRITICAL  # the app writes access lines
        assert [h.get_name() for h in root.handlers] == ["mnist-json-stdout"]
        assert isinstance(root.handlers[0].formatter, logs.JsonFormatter)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


@pytest.mark.parametrize("hops", [0, 1])
def test_access_line_remote_is_the_client_behind_trusted_proxies(random_models_dir, hops):
    """Behind nginx (TRUSTED_PROXIES=1) the client is the X-Forwarded-For address; with 0 the header
    is not trusted, so a client cannot pick the address its requests are logged under."""
    app = create_app({"MODELS_DIR": str(random_models_dir), "MODEL_POLL_SECONDS": 0, "TRUSTED_PROXIES": hops})
    forwarded = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
    doc = json.loads(_access_line(app, logs.AccessFormatter(), "/healthz", **forwarded))
    if hops:
        assert doc["remote"] == "203.0.113.7"
    else:
        assert doc["remote"] != "203.0.113.7"


def test_access_log_errors_writes_lines_only_for_failed_requests(random_models_dir, monkeypatch):
    """Behind nginx (compose's ACCESS_LOG=errors) nginx logs every request; the api only failures."""
    monkeypatch.setenv("ACCESS_LOG", "errors")
    app = create_app({"MODELS_DIR": str(random_models_dir), "MODEL_POLL_SECONDS": 0})
    assert _access_line(app, logs.AccessFormatter(), "/healthz") == ""
    doc = json.loads(_access_line(app, logs.AccessFormatter(), "/nope", **{"X-Request-ID": "e-2"}))
    assert doc["status"] == 404 and doc["request_id"] == "e-2"
    monkeypatch.setenv("ACCESS_LOG", "0")
    app = create_app({"MODELS_DIR": str(random_models_dir), "MODEL_POLL_SECONDS": 0})
    assert _access_line(app, logs.AccessFormatter(), "/nope") == ""
    monkeypatch.setenv("ACCESS_LOG", "sometimes")
    with pytest.raises(ValueError, match="ACCESS_LOG"):
        create_app({"MODELS_DIR": str(random_models_dir), "MODEL_POLL_SECONDS": 0})


def test_gunicorn_builds_access_atoms_only_when_its_access_log_is_on():
    """gunicorn takes any logconfig_dict as a wish for access lines; GunicornLogger does not."""
    from gunicorn.config import Config

    cfg = Config()
    cfg.set("logconfig_dict", logs.gunicorn_logconfig())
    logger = logs.GunicornLogger(cfg)
    built: list[int] = []
    logger.atoms = lambda *args: built.append(1) or {}  # type: ignore[method-assign]
    logger.access(None, None, {}, None)
    assert built == []
    cfg.set("accesslog", "-")
    logger.setup(cfg)  # what gunicorn does on a configuration reload (HUP)
    logger.access(None, None, {}, None)
    assert built == [1]


# --- against a real gunicorn (2 workers) ---------------------------------------------------------


def test_every_line_on_stdout_is_json(served):
    requests.get(served.url + "/healthz", headers={"X-Request-ID": "bad id with spaces"}, timeout=5)
    lines = [line for line in served.lines() if line.strip()]
    assert lines
    docs = [json.loads(line) for line in lines]  # raises on any non-JSON line
    assert {"ts", "level", "logger", "message", "pid"} <= set(docs[-1])
    assert any(d.get("logger") == "gunicorn.error" for d in docs)
    # One access line per request: the app's (with the request id), not gunicorn's as well.
    assert not any(d.get("logger") == "gunicorn.access" for d in docs)
    health = [d for d in docs if d.get("logger") == "access" and d.get("path") == "/healthz"]
    # An unsafe client id is replaced by a generated one, not echoed into logs and headers.
    assert health and re.fullmatch(r"[0-9a-f]{32}", health[-1]["request_id"])
