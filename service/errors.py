"""One error format for every failure: {"error": {"code": "...", "message": "..."}}.

Clients (and the tests) parse a single shape whatever went wrong, whether the
error came from our own validation, from werkzeug (404, 405, 413, 415), or
from a bug. A bug is logged with its traceback but answered with a generic
500, so no stack trace ever reaches a client.
"""

from __future__ import annotations

import json

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

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


class ApiError(Exception):
    """A client-visible error: HTTP status, machine-readable code, human message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> Response:
    body = json.dumps({"error": {"code": code, "message": message}})
    return Response(body, status=status, mimetype="application/json", headers=headers)


def _handle_api_error(e: ApiError) -> Response:
    return error_response(e.status, e.code, e.message)


def _handle_http_exception(e: HTTPException) -> Response:
    status = e.code or 500
    if status >= 500:
        return _handle_unexpected(e)
    code = _HTTP_CODES.get(status, "http_" + str(status))
    message = e.description or e.name
    if status == 404:
        message = f"no route {request.method} {request.path}"
    elif status == 405:
        message = f"method {request.method} not allowed for {request.path}"
    elif status == 413:
        limit = request.max_content_length
        message = f"request body too large (limit {limit} bytes)" if limit else "request body too large"
    # Keep werkzeug's headers (e.g. Allow on a 405), replace only the body.
    headers = {k: v for k, v in e.get_headers() if k.lower() not in ("content-type", "content-length")}
    return error_response(status, code, message, headers)


def _handle_unexpected(e: BaseException) -> Response:
    from flask import current_app

    current_app.logger.exception("unhandled error on %s %s", request.method, request.path, exc_info=e)
    return error_response(500, "internal_error", "internal server error")


def register(app: Flask) -> None:
    """Install the JSON handlers on `app`."""
    app.register_error_handler(ApiError, _handle_api_error)
    app.register_error_handler(HTTPException, _handle_http_exception)
    app.register_error_handler(Exception, _handle_unexpected)
