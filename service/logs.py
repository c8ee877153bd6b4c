"""Logs as one JSON object per line on stdout, each request tagged with a request id.

Log collectors (Docker, Kubernetes, Loki, CloudWatch) read stdout and parse
JSON lines without a grok pattern. Every line written while a request is
being served carries that request's id: the client's `X-Request-ID` when it
sends a sane one, otherwise a fresh one; the response echoes it, so a user's
bug report can be matched to the server's lines.

The access log is written here, by the app, rather than by gunicorn: the app
knows the request id and the route, and gunicorn's access format cannot
escape JSON. `gunicorn.conf.py` therefore turns gunicorn's own access log off
(`GunicornLogger`) and routes its error log through `JsonFormatter` with
`gunicorn_logconfig()`.

Behind nginx, which writes one JSON line per request with the same request id,
status and the replica's time, a second line per request from the api is
redundant and costs about a tenth of a request's CPU, in the worker and again
in Docker's log driver (docs/benchmarks.md): compose and Swarm set
ACCESS_LOG=errors, so the api adds its own line only for requests that failed.

Settings (core/settings.py, read by the caller and passed in): LOG_FORMAT (json, or text
for a human at a terminal), LOG_LEVEL (access lines are written at any level) and
ACCESS_LOG (1: every request; errors: answers of 400 and above; 0: none).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import sys
import time
from typing import Any

from flask import Flask, Response, g, has_request_context, request
from gunicorn.glogging import Logger as _GunicornLogger
from pythonjsonlogger.json import JsonFormatter as _BaseJsonFormatter

from core.settings import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"

REQUEST_ID_HEADER = "X-Request-ID"
# Ids from clients are echoed into headers and logs, so only a safe alphabet is taken.
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
_HANDLER_NAME = "mnist-json-stdout"
_ACCESS_HANDLER_NAME = "mnist-access-stdout"
access_log = logging.getLogger("access")
# No line shows where a log call was made, so the logging module need not walk the stack for it
# (the logging HOWTO's "Optimization" section): about 8 us of every record, the access line's too.
logging._srcfile = None
logging.logThreads = False
logging.logMultiprocessing = False


class JsonFormatter(_BaseJsonFormatter):
    """A record as one JSON line: ts, level, logger, message, pid, then any `extra` fields
    (the request id among them, from `RequestIdFilter`) and the exception if there is one."""

    # logging.Formatter.formatTime's knobs: UTC ISO 8601 with milliseconds, e.g. 2026-11-28T04:13:06.775Z
    converter = time.gmtime
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"

    def __init__(self) -> None:
        super().__init__(
            ["asctime", "levelname", "name", "message", "process"],
            rename_fields={
                "asctime": "ts",
                "levelname": "level",
                "name": "logger",
                "process": "pid",
                "exc_info": "exception",
            },
            json_default=str,
        )


class AccessFormatter(JsonFormatter):
    """The access line: the keys of every JSON line plus the request's fields, nothing scanned.

    It is the one line every request pays for. python-json-logger's generic
    path inspects every attribute of the record to find the extras, which
    costs about 30 us more per line, a few per cent of a /predict
    (`python -m bench.access_line`, docs/benchmarks.md); here the fields travel
    in one attribute, `access`, instead.
    """

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if hasattr(record, "request_id"):
            doc["request_id"] = record.request_id
        doc.update(record.access)
        return json.dumps(doc)  # str, int, float and None only: the default encoder, cached


class TextFormatter(logging.Formatter):
    """LOG_FORMAT=text: one line per record that a client cannot forge.

    A message may carry client text (a request path is decoded, so `%0A` is a
    newline), so CR, LF and the other control characters in it are escaped;
    a traceback keeps its lines, each indented, so none of them can pass for
    a record of its own."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        return super().formatMessage(record).translate(_ESCAPES)

    def formatException(self, ei: Any) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))


# Control characters (C0, DEL, and the Unicode line breaks str.splitlines knows) as Python
# escapes: a backslash and an n rather than a line break.
_ESCAPES = {c: ascii(chr(c))[1:-1] for c in (*range(32), 127, 0x85, 0x2028, 0x2029)}


def _indented(text: str) -> str:
    return "\n".join("    " + line.translate(_ESCAPES) for line in text.splitlines())


class RequestIdFilter(logging.Filter):
    """Tags each record written while a request is served with that request's id."""

    def filter(self, record: logging.LogRecord) -> bool:
        if has_request_context() and "request_id" in g:
            record.request_id = g.request_id
        return True


def make_formatter(log_format: str) -> logging.Formatter:
    return TextFormatter() if log_format == "text" else JsonFormatter()


def configure_logging(settings: Settings) -> None:
    """Send the root logger to stdout through the chosen formatter, once per process."""
    logging.captureWarnings(True)  # Python warnings as JSON lines too, not bare stderr text
    access_log.setLevel(logging.INFO)  # one line per request whatever LOG_LEVEL says
    if settings.log_format != "text" and not access_log.handlers:
        access = logging.StreamHandler(sys.stdout)
        access.set_name(_ACCESS_HANDLER_NAME)
        access.setFormatter(AccessFormatter())
        access.addFilter(RequestIdFilter())
        access_log.addHandler(access)
        access_log.propagate = False
    root = logging.getLogger()
    if any(h.get_name() == _HANDLER_NAME for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(make_formatter(settings.log_format))
    handler.addFilter(RequestIdFilter())
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())


def gunicorn_logconfig(settings: Settings | None = None) -> dict[str, Any]:
    """A logging.dictConfig for gunicorn.conf.py (`logconfig_dict`): its error log as JSON lines.

    `settings` defaults to the environment's, as gunicorn.conf.py reads them."""
    settings = Settings.from_env() if settings is None else settings
    level = settings.log_level.upper()
    access_level = "INFO" if settings.gunicorn_access_log else "CRITICAL"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}, "text": {"()": TextFormatter}},
        "filters": {"request_id": {"()": RequestIdFilter}},
        # Named like configure_logging's handler, so the app does not add a second one.
        "handlers": {
            _HANDLER_NAME: {
                "class": "logging.StreamHandler",
                "formatter": "text" if settings.log_format == "text" else "json",
                "filters": ["request_id"],
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


class GunicornLogger(_GunicornLogger):
    """gunicorn's logger, building access lines only when GUNICORN_ACCESS_LOG asks for them.

    gunicorn takes any `logconfig_dict` as a wish for access lines, so with ours it built the
    atoms of every request (about 8% of a /predict's CPU under py-spy) for a logger set to drop
    them. gunicorn.conf.py names this class as its `logger_class`.
    """

    def setup(self, cfg) -> None:  # type: ignore[no-untyped-def]
        super().setup(cfg)
        self._writes_access = bool(cfg.accesslog)  # read once: cfg's attribute lookup is not free

    def access(self, resp, req, environ, request_time) -> None:  # type: ignore[no-untyped-def]
        if self._writes_access:
            super().access(resp, req, environ, request_time)


# ACCESS_LOG (its choices are checked by core.settings) -> the least status written (None: off).
ACCESS_LOG_MODES = {"1": 0, "errors": 400, "0": None}


def access_threshold(mode: str) -> int | None:
    """The least status that gets an access line under ACCESS_LOG `mode`, or None when it is off."""
    return ACCESS_LOG_MODES[mode]


def request_id_from(header: str | None) -> str:
    """The client's id when it is safe to echo, else a new random 128-bit one in hex."""
    if header and _SAFE_ID.match(header):
        return header
    return secrets.token_hex(16)


def init_app(app: Flask) -> None:
    """Tag requests with an id, echo it, and write one access line per request."""
    configure_logging(app.extensions["settings"])
    threshold = access_threshold(app.config["ACCESS_LOG"])

    @app.before_request
    def _start() -> None:
        g.request_id = request_id_from(request.headers.get(REQUEST_ID_HEADER))

    @app.after_request
    def _finish(response: Response) -> Response:
        if "request_id" not in g:  # an earlier before_request hook failed
            g.request_id = request_id_from(request.headers.get(REQUEST_ID_HEADER))
        response.headers[REQUEST_ID_HEADER] = g.request_id
        status = response.status_code
        if threshold is not None and status >= threshold:
            t0 = g.get("request_t0")  # set by service.app
            method, path = request.method, request.path
            fields = {
                "method": method,
                "path": path,
                "status": status,
                "duration_ms": round((time.perf_counter() - t0) * 1000, 3) if t0 else None,
                "bytes": response.calculate_content_length(),
                "remote": request.remote_addr,
            }
            access_log.info("%s %s %s", method, path, status, extra={"access": fields})
        return response
