"""JSON responses, and the one error layer every route goes through.

Clients (and the tests) parse a single shape per route family whatever went
wrong, whether the error came from our own validation, from werkzeug (404,
405, 413, 415), or from a bug:

    /v2/...       {"error": "<message>"}, as the Open Inference Protocol requires
    every other   {"error": {"code": "...", "message": "..."}}

A bug is logged with its traceback but answered with a generic 500, so no
stack trace ever reaches a client. 404 and 405 are raised while routing,
before any blueprint is chosen, so the family is told by the path, not by
blueprint-level handlers.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Flask, Response, current_app, request
from werkzeug.exceptions import HTTPException

V2_PREFIX = "/v2"
# Short, stable codes for werkzeug's own errors, in the style of the ones we raise.
_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    411: "length_required",
    413: "payload_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    431: "headers_too_large",
}
Headers = list[tuple[str, str]] | None


class ApiError(Exception):
    """A client-visible error: HTTP status, machine-readable code, human message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def json_response(obj: Any, status: int = 200, headers: Headers = None) -> Response:
    """Compact JSON without Flask's key sorting: the one way the service answers JSON."""
    body = json.dumps(obj, separators=(",", ":"))
    return Response(body, status=status, mimetype="application/json", headers=headers)


def is_v2_request() -> bool:
    return request.path == V2_PREFIX or request.path.startswith(V2_PREFIX + "/")


def error_response(status: int, code: str, message: str, headers: Headers = None) -> Response:
    """The error in the shape of the request's route family (see the module docstring)."""
    error = message if is_v2_request() else {"code": code, "message": message}
    return json_response({"error": error}, status, headers)


def _handle_api_error(e: ApiError) -> Response:
    return error_response(e.status, e.code, e.message)


def _handle_http_exception(e: HTTPException) -> Response:
    status = e.code or 500
    if status >= 500:
        return _handle_unexpected(e)
    message = e.description or e.name
    if status == 404:
        message = f"no route {request.method} {request.path}"
    elif status == 405:
        message = f"method {request.method} not allowed for {request.path}"
    elif status == 413:
        limit = request.max_content_length
        message = f"request body too large (limit {limit} bytes)" if limit else "request body too large"
    # Keep werkzeug's headers (e.g. Allow on a 405), replace only the body.
    headers = [(k, v) for k, v in e.get_headers() if k.lower() not in ("content-type", "content-length")]
    return error_response(status, _HTTP_CODES.get(status, f"http_{status}"), message, headers)


def _handle_unexpected(e: BaseException) -> Response:
    current_app.logger.exception("unhandled error on %s %s", request.method, request.path, exc_info=e)
    return error_response(500, "internal_error", "internal server error")


def init_app(app: Flask) -> None:
    """Install the JSON error handlers on `app`, for every route and blueprint."""
    app.register_error_handler(ApiError, _handle_api_error)
    app.register_error_handler(HTTPException, _handle_http_exception)
    app.register_error_handler(Exception, _handle_unexpected)
