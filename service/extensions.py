"""Hook for the protocol, metrics, OpenAPI and page modules (issue 5)."""

from __future__ import annotations

from flask import Flask


def init_app(app: Flask) -> None:
    """Register the optional extras on the app. Empty until they exist."""
