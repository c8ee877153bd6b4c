"""GET /: the draw-a-digit page, one self-contained file in service/static/."""

from __future__ import annotations

from flask import Blueprint, Response, current_app

bp = Blueprint("page", __name__)


@bp.get("/")
def page() -> Response:
    return current_app.send_static_file("index.html")
