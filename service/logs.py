"""Logs as one JSON object per line on stdout, each request tagged with a request id.

Log collectors (Docker, Kubernetes, Loki, CloudWatch) read stdout and parse
JSON lines without a grok pattern. Every line written while a request is
being served carries that request's id: the client's `X-Request-ID` when it
sends a sane one, otherwise a fresh one; the response echoes it, so a user's
bug report can be matched to the server's lines.

The access log is written here, by the app, rather than by gunicorn: the app
knows the request id and the route, and gunicorn's access format cannot
escape JSON. `gunicorn.conf.py` therefore turns gunicorn's own access log off
and routes its error log through `JsonFormatter` with `gunicorn_logconfig()`.

Settings (environment):
    LOG_FORMAT  json (default) or text: text is for a human at a terminal.
    LOG_LEVEL   INFO (default), DEBUG, WARNING, ...
    ACCESS_LOG  1 (default) writes one access line per request; 0 turns it off.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import sys
import threading
import time

from flask import Flask, Response, g, has_request_context, request

REQUEST_ID_HEADER = "X-Request-ID"
# Ids from clients are echoed into headers and logs, so only a safe alphabet is taken.
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
_HANDLER_NAME = "mnist-json-stdout"


class JsonFormatter(logging.Formatter):
    """A record as one JSON line: time, level, logger, message, pid, request id, fields.

    Structured fields travel in one `extra={"fields": {...}}` dict, so formatting
    never scans the record's attributes: this runs once per request.
    """

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": _timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if has_request_context() and "request_id" in g:
            doc["request_id"] = g.request_id
        fields = getattr(record, "fields", None)
        if fields:
            doc.update(fields)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def _timestamp(created: float) -> str:
    """UTC ISO 8601 with milliseconds, e.g. 2026-11-28T04:13:06.775Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


def make_formatter(fmt: str | None = None) -> logging.Formatter:
    if (fmt or os.environ.get("LOG_FORMAT", "json")).lower() == "text":
        return logging.Formatter("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
    return JsonFormatter()


def configure_logging() -> None:
    """Send the root logger to stdout through the chosen formatter, once per process."""
    logging.captureWarnings(True)  # Python warnings as JSON lines too, not bare stderr text
    root = logging.getLogger()
    if any(h.get_name() == _HANDLER_NAME for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(make_formatter())
    root.addHandler(handler)
    root.setLevel(os.environ.get("LOG_LEVEL", "INFO").upper())


def gunicorn_logconfig() -> dict:
    """A logging.dictConfig for gunicorn.conf.py (`logconfig_dict`): its error log as JSON lines."""
    formatter = "text" if os.environ.get("LOG_FORMAT", "json").lower() == "text" else "json"
    level = os.environ.get("LOG_LEVEL", "INFO").upper()
    access_level = "INFO" if os.environ.get("GUNICORN_ACCESS_LOG") else "CRITICAL"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "json": {"()": JsonFormatter},
            "text": {"format": "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"},
        },
        # Named like configure_logging's handler, so the app does not add a second one.
        "handlers": {
            _HANDLER_NAME: {
                "class": "logging.StreamHandler",
                "formatter": formatter,
                "stream": "ext://sys.stdout",
            }
        },
        "root": {"level": level, "handlers": [_HANDLER_NAME]},
        "loggers": {
            "gunicorn.error": {"handlers": [_HANDLER_NAME], "level": level, "propagate": False},
            # The app writes the access lines; gunicorn's own only when GUNICORN_ACCESS_LOG asks.
            "gunicorn.access": {"handlers": [_HANDLER_NAME], "level": access_level, "propagate": False},
        },
    }


def request_id_from(header: str | None) -> str:
    """The client's id when it is safe to echo, else a new random 128-bit one in hex."""
    if header and _SAFE_ID.match(header):
        return header
    return secrets.token_hex(16)


class AccessLog:
    """One access line per request, written straight to stdout.

    It is the one line every request pays for, so it skips the logging
    module's records, handler chain and locks (about 5x the cost of the line
    itself) and writes the same JSON shape JsonFormatter produces, under a lock
    so threads never interleave lines.
    """

    def __init__(self, stream=None, text: bool = False) -> None:
        self.stream = stream
        self.text = text
        self._lock = threading.Lock()

    def write(self, method: str, path: str, status: int, fields: dict) -> None:
        now = time.time()
        if self.text:
            line = (
                f"{time.strftime('%Y-%m-%d %H:%M:%S')} INFO [{os.getpid()}] access: {method} {path} {status}"
            )
        else:
            doc = {
                "ts": _timestamp(now),
                "level": "INFO",
                "logger": "access",
                "message": f"{method} {path} {status}",
                "pid": os.getpid(),
                **fields,
            }
            line = json.dumps(doc, default=str)
        stream = self.stream or sys.stdout
        with self._lock:
            stream.write(line + "\n")
            stream.flush()


def init_app(app: Flask) -> None:
    """Tag requests with an id, echo it, and write one access line per request."""
    configure_logging()
    access = AccessLog(text=os.environ.get("LOG_FORMAT", "json").lower() == "text")
    access_on = os.environ.get("ACCESS_LOG", "1") != "0"

    @app.before_request
    def _start() -> None:
        g.request_id = request_id_from(request.headers.get(REQUEST_ID_HEADER))

    @app.after_request
    def _finish(response: Response) -> Response:
        ctx_g = g._get_current_object()  # one proxy lookup, not one per attribute
        rid = getattr(ctx_g, "request_id", None) or request_id_from(request.headers.get(REQUEST_ID_HEADER))
        response.headers[REQUEST_ID_HEADER] = rid
        if access_on:
            req = request._get_current_object()
            t0 = getattr(ctx_g, "request_t0", None)  # set by service.extensions
            status = response.status_code
            fields = {
                "request_id": rid,
                "method": req.method,
                "path": req.path,
                "status": status,
                "duration_ms": round((time.perf_counter() - t0) * 1000, 3) if t0 else None,
                "bytes": response.calculate_content_length(),
                "remote": req.remote_addr,
            }
            access.write(req.method, req.path, status, fields)
        return response
