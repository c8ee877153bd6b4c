"""GET /openapi.json: the OpenAPI 3.1 document of every route the app serves.

The document is a static file, `service/openapi.json`, kept honest by tests
rather than generated: they check that it lists exactly the app's routes and
methods, validate it against the OpenAPI 3.1 schema, check real responses
against it, and let schemathesis fuzz the live server with it (no 5xx, no
response outside the document).

JSON rather than YAML: it is the format served, and reading it needs no
parser beyond the standard library in the image. The limits that depend on
configuration appear in it as `{MAX_BATCH}`, `{MAX_CONTENT_LENGTH}`,
`{MAX_IMAGE_PIXELS}` and `{MAX_REQUEST_PIXELS}` and are filled in from the
app's config, so the document describes the server that serves it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Flask, Response

DOCUMENT = Path(__file__).with_name("openapi.json")
PLACEHOLDERS = ("MAX_BATCH", "MAX_CONTENT_LENGTH", "MAX_IMAGE_PIXELS", "MAX_REQUEST_PIXELS")


def document_body(config: Mapping[str, Any]) -> str:
    """The document with this configuration's limits filled in, as compact JSON."""
    text = DOCUMENT.read_text(encoding="utf-8")
    for key in PLACEHOLDERS:
        text = text.replace("{" + key + "}", str(config[key]))
    return json.dumps(json.loads(text))


def init_app(app: Flask) -> None:
    """Serve the document, read once for this app's limits."""
    body = document_body(app.config)

    @app.get("/openapi.json")
    def openapi_json() -> Response:
        return Response(body, mimetype="application/json")
